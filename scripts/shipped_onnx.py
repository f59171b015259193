"""Build the ONNX models the base (torch-free) install segments with, and check that they are fresh.

    .venv/bin/python scripts/shipped_onnx.py            # export what is missing or stale, else do nothing
    .venv/bin/python scripts/shipped_onnx.py --check    # exit 1 when any is missing or stale (tests/test_light_install.py)

One model per shipped version in ``scsonet.inference.SHIPPED_VERSIONS``, e.g.
src/scsonet/weights/scsonet_isic2017_v1.onnx is `scsonet export --weights scsonet-isic2017-v1`
(the reparameterised graph: the fastest on CPUs; the reliability model rides in its metadata).
Its sidecar, scsonet_isic2017_v1.onnx.json, records the SHA-256 of the shipped weights, of the card
fields the export reads (as scripts/web_model.py does), of the reliability JSON, and of the ONNX
file; the model is stale when any of them differs. Needs the torch extra (it exports).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

from scsonet.inference import SHIPPED_VERSIONS

ROOT = Path(__file__).resolve().parents[1]

WEIGHTS_DIR = ROOT / "src" / "scsonet" / "weights"
MODELS = {name: WEIGHTS_DIR / filename for name, filename in SHIPPED_VERSIONS.items()}
V1 = "scsonet-isic2017-v1"
MODEL = MODELS[V1]
EXPORT_ARGS: list[str] = []  # the default export: reparameterised, checked against PyTorch


def sidecar_of(model: Path) -> Path:
    return model.with_name(model.name + ".json")


@functools.lru_cache(maxsize=None)  # one load of the module, not one per check
def _web_model():
    """scripts/web_model.py, for its hashes of the weights and of the card's exported fields."""
    spec = importlib.util.spec_from_file_location("web_model", ROOT / "scripts" / "web_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sources(name: str = V1) -> dict[str, str]:
    return _web_model().sources(name)  # weights, exported card fields and reliability JSON


def problems(model: Path | None = None, expected: dict[str, str] | None = None) -> list[str]:
    """Why a shipped ONNX model (``model``, or each of them) does not match its shipped weights
    (empty: fresh). A ``model`` that is not one of MODELS is checked as v1's, by v1's sidecar."""
    web = _web_model()
    if model is not None:
        name = next((n for n, m in MODELS.items() if m == model), V1)
        return web.sidecar_problems(model, sidecar_of(MODELS[name]), EXPORT_ARGS, expected, name)
    return [line for name, path in MODELS.items()
            for line in web.sidecar_problems(path, sidecar_of(path), EXPORT_ARGS, expected, name)]


def build(name: str) -> None:
    command = f"python scripts/shipped_onnx.py (scsonet export --weights {name} --format onnx {' '.join(EXPORT_ARGS)})"
    _web_model().export_with_sidecar(MODELS[name], sidecar_of(MODELS[name]), EXPORT_ARGS,
                                     command.replace(" )", ")"), name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when any is missing or stale")
    parser.add_argument("--force", action="store_true", help="export even when fresh")
    args = parser.parse_args(argv)
    web = _web_model()
    status = 0
    for name, model in MODELS.items():
        status = max(status, web.check_or_build(
            "shipped_onnx", ".venv/bin/python scripts/shipped_onnx.py", model.relative_to(ROOT),
            lambda model=model: problems(model), lambda name=name: build(name), args.check, args.force))
        if status == 2:
            break
    return status


if __name__ == "__main__":
    sys.exit(main())
