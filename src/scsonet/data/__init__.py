"""Datasets: preparation of raw ISIC / folder data, the prepared-data reader, loader and augmentation.

Names are imported lazily: preparation needs no PyTorch, and its worker processes stay light.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "prepare_dataset": "scsonet.data.prepare",
    "PreparedData": "scsonet.data.dataset",
    "SplitArrays": "scsonet.data.dataset",
    "PaperAugment": "scsonet.data.augment",
    "RobustAugment": "scsonet.data.robust_augment",
    "TrainLoader": "scsonet.data.loader",
    "make_grid": "scsonet.data.show",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'scsonet.data' has no attribute {name!r}")
