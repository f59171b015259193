"""The ``scsonet`` command: one subcommand per module in ``scsonet.cli``."""
from __future__ import annotations

import argparse
import os
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


# Packages of the ``scsonet[torch]`` extra, and what each command needs them for (the base install
# segments with ONNX Runtime only).
TORCH_EXTRA = {"torch", "torchvision", "safetensors", "scipy", "thop"}
NEEDS_TORCH = {"train": "training", "evaluate": "evaluation", "export": "export", "complexity": "counting MACs",
               "benchmark": "benchmarking", "data": "data preparation", "weights": "the weights commands",
               "models": "the model registry", "predict": "--backend torch"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe fails here, where it is caught, not at exit
    except ScsonetError as err:
        print(f"scsonet {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TORCH_EXTRA:
            raise
        what = NEEDS_TORCH.get(args.command, f"scsonet {args.command}")
        print(f"scsonet {args.command}: error: {what} needs PyTorch: pip install 'scsonet[torch]' "
              f"(no module {err.name!r})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"scsonet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `scsonet ... | head` closed our stdout: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
