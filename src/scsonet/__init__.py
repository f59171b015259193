"""SCSONet: lightweight skin-lesion segmentation.

Public names are imported lazily, so that torch-free submodules (the ONNX Runtime path) can be
used without PyTorch installed.
"""
from __future__ import annotations

import importlib

# The one version source: pyproject.toml reads it (statically, without importing scsonet).
__version__ = "0.1.0"

_LAZY = {
    "ScsonetError": "scsonet.errors",
    "SCSONet": "scsonet.models",
    "SCSONet_Weights": "scsonet.models",
    "create_model": "scsonet.models",
    "list_models": "scsonet.models",
    "list_pretrained": "scsonet.models",
    "load_model": "scsonet.models",
    "load_pretrained": "scsonet.models",
    "segment": "scsonet.inference",
    "sample_images": "scsonet.inference",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'scsonet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
