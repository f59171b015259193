"""The ``scsonet`` command: one subcommand per module in ``scsonet.cli``."""
from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import ScsonetError

# Each module defines ``register(subparsers)``, which adds its parser and sets ``func``.
SUBCOMMAND_MODULES = ["models", "complexity", "evaluate", "predict", "data", "train", "export", "weights", "benchmark"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scsonet", description="SCSONet skin-lesion segmentation")
    parser.add_argument("--version", action="version", version=f"scsonet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"scsonet.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
    except ScsonetError as err:
        print(f"scsonet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scsonet {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
