"""``scsonet complexity``: exact parameters and MACs of one model, and the paper's convention."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("complexity", help="parameters and multiply-accumulates of a model",
                              description="Count one model's parameters and multiply-accumulates exactly, at "
                                          "a square input of --size, beside the paper's convention (thop's "
                                          "counts, in units of 1024^2 and 1024^3) and its printed figures.")
    p.add_argument("--model", default="scsonet", help="registered model name (scsonet)")
    p.add_argument("--size", type=int, default=256, help="square input side (256)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


# Sides the counters can trace in a few seconds; the models pad any side up to a multiple of 32.
MAX_SIZE = 4096


def run(args) -> int:
    from ..complexity import format_complexity, measure
    from ..errors import ScsonetError
    from ..models import create_model

    if not 1 <= args.size <= MAX_SIZE:
        raise ScsonetError(f"--size {args.size}: expected a side in 1..{MAX_SIZE}")
    result = measure(args.model, create_model(args.model), args.size)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_complexity(result))
    return 0
