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
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "scsonet-isic2017"
MODEL = ROOT / "src" / "scsonet" / "weights" / "scsonet_isic2017_v1.onnx"
SIDECAR = MODEL.with_name(MODEL.name + ".json")
RELIABILITY = MODEL.with_name("scsonet_isic2017_v1.reliability.json")
EXPORT_ARGS: list[str] = []  # the default export: reparameterised, checked against PyTorch


def _web_model():
    """scripts/web_model.py, for its hashes of the weights and of the card's exported fields."""
    spec = importlib.util.spec_from_file_location("web_model", ROOT / "scripts" / "web_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources() -> dict[str, str]:
    web = _web_model()
    return {**web.sources(WEIGHTS), "reliability_sha256": web.sha256(RELIABILITY)}


def problems(model: Path = MODEL, sidecar: Path = SIDECAR, expected: dict[str, str] | None = None) -> list[str]:
    """Why the shipped ONNX model does not match the shipped weights (empty: it is fresh)."""
    import json

    if not model.is_file() or not sidecar.is_file():
        return [f"{model} or {sidecar.name} is missing"]
    try:
        recorded = json.loads(sidecar.read_text())
    except ValueError as err:
        return [f"{sidecar}: not JSON ({err})"]
    expected = sources() if expected is None else expected
    found = [f"{sidecar.name}: {key} is {recorded.get(key)!r}, the shipped file's is {value!r}"
             for key, value in expected.items() if recorded.get(key) != value]
    if recorded.get("onnx_sha256") != _web_model().sha256(model):
        found.append(f"{model.name} is not the file that {sidecar.name} describes (onnx_sha256 differs)")
    if recorded.get("export_args") != EXPORT_ARGS:
        found.append(f"{sidecar.name}: exported with {recorded.get('export_args')}, expected {EXPORT_ARGS}")
    return found


def build() -> None:
    from scsonet._io import write_json_atomic

    scsonet = Path(sys.executable).with_name("scsonet")
    subprocess.run([str(scsonet), "export", "--weights", WEIGHTS, "--format", "onnx", *EXPORT_ARGS,
                    "--out", str(MODEL)], check=True)
    write_json_atomic(SIDECAR, {**sources(), "onnx_sha256": _web_model().sha256(MODEL), "export_args": EXPORT_ARGS,
                                "command": "python scripts/shipped_onnx.py (scsonet export --weights "
                                           f"{WEIGHTS} --format onnx {' '.join(EXPORT_ARGS)})".replace(" )", ")")})


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
