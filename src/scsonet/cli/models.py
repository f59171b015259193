"""``scsonet models``: list the registered models, optionally with their complexity."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list registered models",
                              description="List the names create_model and --model accept (SCSONet and the "
                                          "paper's baselines); with --complexity, a table of their exact "
                                          "parameters and MACs beside the paper's printed figures.")
    p.add_argument("--filter", default="", help="fnmatch pattern, e.g. 'scsonet*'")
    p.add_argument("--complexity", action="store_true", help="also count parameters and MACs")
    p.add_argument("--size", type=int, default=256, help="square input side for --complexity (256)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..complexity import measure
    from ..models import create_model, list_models

    names = list_models(args.filter)
    if not args.complexity:
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    rows = [measure(n, create_model(n), args.size) for n in names]
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    print(f"| model | parameters | MACs (M) | paper params (M) | paper GFLOPs |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.model} | {r.params:,} | {r.macs / 1e6:.1f} | {r.paper_params_m} | {r.paper_gflops} |")
    return 0
