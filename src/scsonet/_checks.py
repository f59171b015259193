"""Checks of values read from model files (checkpoint, model card, ONNX metadata) before use.

A model file may come from anyone, so each value is checked against what a scsonet model can
mean, and a bad one is a one-line ``ScsonetError`` that names the file and the value. No torch
import: ``scsonet.onnx_runtime`` runs without PyTorch and uses the same checks.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from .errors import ScsonetError

# Sides of the network input. The models pad to multiples of 32 inside, so any side runs; the
# bounds only keep out values no real model has: below 8 pixels nothing of a lesion is left,
# and at 4096 one float32 input is already 200 MB with activations of several GB (a 60000x60000
# resize would need 43 GB for the input alone).
MIN_SIDE, MAX_SIDE = 8, 4096
# Normalisation acts on pixels divided by 255, so a channel mean lies in 0..1 and its std in
# (0, 1]; a std below 1e-3 (or 0) blows the inputs up by 1000x or more, and the model then
# silently finds nothing.
MIN_STD = 1e-3


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, shortened: an error line stays one readable line whatever the file holds."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message as one line (its type when empty), for wrapping foreign errors."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    """A real number (not a bool, not NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(source: str, key: str, value: Any, expected: str) -> ScsonetError:
    return ScsonetError(f"{source}: {key}={show(value)}: expected {expected}")


def check_resize_size(value: Any, source: str, key: str = "preprocessing resize_size") -> list[int]:
    """``N`` or ``[H, W]`` with sides in MIN_SIDE..MAX_SIDE -> ``[H, W]``."""
    size = [value, value] if is_int(value) else value
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(is_int(s) and MIN_SIDE <= s <= MAX_SIDE for s in size)):
        raise _fail(source, key, value, f"two integers in {MIN_SIDE}..{MAX_SIDE}")
    return [int(s) for s in size]


def check_threshold(value: Any, source: str, key: str = "threshold") -> float:
    """A probability threshold strictly between 0 and 1 (as ``scsonet evaluate --threshold``)."""
    if not (is_finite(value) and 0.0 < value < 1.0):
        raise _fail(source, key, value, "a number strictly between 0 and 1")
    return float(value)


def _channels(pre: Mapping[str, Any], key: str, source: str, low: float, expected: str) -> list[float]:
    value = pre[key]
    if not (isinstance(value, (list, tuple)) and len(value) == 3
            and all(is_finite(v) and low <= v <= 1.0 for v in value)):
        raise _fail(source, f"preprocessing {key}", value, expected)
    return [float(v) for v in value]


def check_preprocessing(pre: Any, source: str) -> dict[str, Any]:
    """``pre`` (``resize_size``, ``mean``, ``std``, optional ``threshold``) checked, as plain lists.

    ``source`` names the file in the error. Shared by checkpoints, model cards and ONNX metadata.
    """
    if not isinstance(pre, Mapping):
        raise ScsonetError(f"{source}: preprocessing={show(pre)}: expected a mapping with resize_size, mean and std")
    missing = [key for key in ("resize_size", "mean", "std") if key not in pre]
    if missing:
        raise ScsonetError(f"{source}: preprocessing lacks {', '.join(missing)}")
    checked: dict[str, Any] = {
        "resize_size": check_resize_size(pre["resize_size"], source),
        "mean": _channels(pre, "mean", source, 0.0, "3 finite numbers in 0..1 (pixels are divided by 255 first)"),
        "std": _channels(pre, "std", source, MIN_STD, f"3 finite numbers in {MIN_STD}..1"),
    }
    if "threshold" in pre:
        checked["threshold"] = check_threshold(pre["threshold"], source, "preprocessing threshold")
    return checked
