"""Build the ONNX model the base (torch-free) install segments with, and check that it is fresh.

    .venv/bin/python scripts/shipped_onnx.py            # export when missing or stale, else do nothing
    .venv/bin/python scripts/shipped_onnx.py --check    # exit 1 when missing or stale (tests/test_light_install.py)

The model, src/scsonet/weights/scsonet_isic2017_v1.onnx, is `scsonet export --weights scsonet-isic2017`
(the reparameterised graph: the fastest on CPUs; the reliability model rides in its metadata).
Its sidecar, scsonet_isic2017_v1.onnx.json, records the SHA-256 of the shipped weights, of the card
fields the export reads (as scripts/web_model.py does), of the reliability JSON, and of the ONNX
file; the model is stale when any of them differs. Needs the torch extra (it exports).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "scsonet-isic2017"
MODEL = ROOT / "src" / "scsonet" / "weights" / "scsonet_isic2017_v1.onnx"
SIDECAR = MODEL.with_name(MODEL.name + ".json")
EXPORT_ARGS: list[str] = []  # the default export: reparameterised, checked against PyTorch


def _web_model():
    """scripts/web_model.py, for its hashes of the weights and of the card's exported fields."""
    spec = importlib.util.spec_from_file_location("web_model", ROOT / "scripts" / "web_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources() -> dict[str, str]:
    return _web_model().sources(WEIGHTS)  # weights, exported card fields and reliability JSON


def problems(model: Path = MODEL, sidecar: Path = SIDECAR, expected: dict[str, str] | None = None) -> list[str]:
    """Why the shipped ONNX model does not match the shipped weights (empty: it is fresh)."""
    return _web_model().sidecar_problems(model, sidecar, EXPORT_ARGS, sources() if expected is None else expected)


def build() -> None:
    command = f"python scripts/shipped_onnx.py (scsonet export --weights {WEIGHTS} --format onnx {' '.join(EXPORT_ARGS)})"
    _web_model().export_with_sidecar(MODEL, SIDECAR, EXPORT_ARGS, command.replace(" )", ")"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when missing or stale")
    parser.add_argument("--force", action="store_true", help="export even when fresh")
    args = parser.parse_args(argv)
    found = problems()
    if args.check:
        for line in found:
            print(f"shipped_onnx: stale: {line}; run `.venv/bin/python scripts/shipped_onnx.py`", file=sys.stderr)
        return 1 if found else 0
    if found or args.force:
        build()
        left = problems()
        if left:
            print(f"shipped_onnx: error: {left[0]}", file=sys.stderr)
            return 2
    print(f"shipped_onnx: {MODEL.relative_to(ROOT)} is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
