"""Weight averaging of fine-tuned models ("model soups", WiSE-FT): one network whose weights are a
weighted mean of several networks of the same architecture fine-tuned from one starting point.

Fine-tunes of one set of weights stay in one basin of the loss, so their weighted mean is itself a
good network and often better than each of them: interpolating the shipped weights with a
fine-tune on harder augmentation keeps much of what the original did well on the benchmark's
crops while keeping the fine-tune's robustness (Wortsman et al., "Robust fine-tuning of zero-shot
models", CVPR 2022; "Model soups", ICML 2022). The coefficients are a choice: make it on val.

    scsonet weights average scsonet-isic2017 runs/robust/best.pt --coefficients 0.5 0.5 --out soup.pt

The result is a plain checkpoint (what ``scsonet evaluate``, ``predict`` and ``weights pack``
read) that records its sources and coefficients. Batch-norm statistics are averaged like every
other buffer; integer buffers (batch counters) are taken from the last source.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .errors import ScsonetError


def _model_args(spec: str, loaded) -> dict[str, Any]:
    """The constructor arguments a source was built with: its card's, or its checkpoint's."""
    if "model_args" in loaded.meta:  # a card
        return dict(loaded.meta["model_args"])
    from .models._loading import read_checkpoint

    return dict(read_checkpoint(spec).get("model_args", {}))


def check_coefficients(coefficients: Sequence[float], n_sources: int) -> list[float]:
    """One finite, non-negative coefficient per source, summing to 1 (within 1e-6)."""
    if len(coefficients) != n_sources:
        raise ScsonetError(f"--coefficients: {len(coefficients)} given for {n_sources} sources")
    if any(not math.isfinite(c) or c < 0 for c in coefficients):
        raise ScsonetError(f"--coefficients {' '.join(map(str, coefficients))}: expected finite values >= 0")
    if abs(sum(coefficients) - 1.0) > 1e-6:
        raise ScsonetError(f"--coefficients {' '.join(map(str, coefficients))}: they must sum to 1")
    return [float(c) for c in coefficients]


def average_weights(sources: Sequence[str], coefficients: Sequence[float]) -> dict[str, Any]:
    """The checkpoint dict of ``sum(c_i * weights_i)``, every source loaded and checked first.

    Sources are pretrained names, ``.pt`` checkpoints or ``.safetensors`` files; they must share
    the architecture, its arguments and the preprocessing (a soup of networks fed differently
    would be fed wrongly). Bookkeeping (epoch, config, protocol, split of selection) comes from the
    last source, the fine-tune a soup is usually made around.
    """
    import torch

    from .models import load_model
    from .models._loading import read_checkpoint

    if len(sources) < 2:
        raise ScsonetError("weights average: give at least two sources")
    coefficients = check_coefficients(coefficients, len(sources))
    loaded = [load_model(spec) for spec in sources]
    first = loaded[0]
    first_args = _model_args(sources[0], first)
    for spec, other in zip(sources[1:], loaded[1:]):
        if other.name != first.name or _model_args(spec, other) != first_args:
            raise ScsonetError(f"{spec}: a {other.name} {_model_args(spec, other)}, not a {first.name} "
                               f"{first_args} like {sources[0]}: only one architecture can be averaged")
        if other.preset != first.preset:
            raise ScsonetError(f"{spec}: its preprocessing differs from {sources[0]}'s ({other.preset} "
                               f"against {first.preset})")
    states = [m.model.state_dict() for m in loaded]
    averaged = {}
    for key, value in states[-1].items():
        if value.is_floating_point():
            averaged[key] = sum(c * s[key].double() for c, s in zip(coefficients, states)).to(value.dtype)
        else:
            averaged[key] = value.clone()
    last = sources[-1]
    meta = read_checkpoint(last) if Path(last).suffix == ".pt" else {}
    preset = first.preset
    ckpt: dict[str, Any] = {
        "model": averaged,
        "model_name": first.name,
        "model_args": first_args,
        "preprocessing": {"resize_size": list(preset.resize_size), "mean": list(preset.mean),
                          "std": list(preset.std)},
        "averaged_from": [{"source": str(s), "coefficient": c} for s, c in zip(sources, coefficients)],
    }
    for key in ("epoch", "config", "protocol", "select_split"):  # not best_val_dsc: the soup's is unmeasured
        if key in meta:
            ckpt[key] = meta[key]
    ckpt.setdefault("epoch", 0)
    return ckpt


def write_average(sources: Sequence[str], coefficients: Sequence[float], out: str | Path) -> Path:
    """``average_weights`` saved atomically as a ``.pt`` checkpoint at ``out``."""
    from ._io import torch_save_atomic

    out = Path(out)
    if out.suffix != ".pt":
        raise ScsonetError(f"{out}: the averaged checkpoint must end in .pt")
    if not out.parent.is_dir():
        raise ScsonetError(f"{out.parent}: no such directory")
    torch_save_atomic(average_weights(sources, coefficients), out)
    return out


__all__ = ["average_weights", "check_coefficients", "write_average"]
