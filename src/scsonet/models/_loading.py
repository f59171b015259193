"""Load a ready-to-run model from a weights name, a training checkpoint or a safetensors file.

A training checkpoint (``.pt``) is a dict with ``model`` (state dict without wrapper prefixes),
``model_name``, ``model_args`` and ``preprocessing`` (``resize_size``, ``mean``, ``std``), plus
optimiser state and bookkeeping that loading ignores. A ``.safetensors`` file needs its model
card beside it (same stem, ``.json``) with ``arch``, ``model_args`` and ``preprocessing``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ScsonetError
from ..transforms import SegmentationPreset
from ._registry import create_model
from ._weights import SCSONet_Weights

# Names accepted by ``--weights`` / ``load_pretrained``, mapped to weights members.
PRETRAINED = {"scsonet-isic2017": SCSONet_Weights.ISIC2017_V1}


@dataclass
class LoadedModel:
    model: nn.Module
    preset: SegmentationPreset
    name: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def _from_card(weights_path: Path, card: dict[str, Any], source: str) -> LoadedModel:
    from safetensors.torch import load_file

    pre = card["preprocessing"]
    model = create_model(card["arch"], **card.get("model_args", {}))
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return LoadedModel(model.eval(), SegmentationPreset.from_stats(pre["mean"], pre["std"], pre["resize_size"]),
                       card["arch"], source, card)


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve ``spec`` (pretrained name, ``.pt`` checkpoint or ``.safetensors``) into an eval-mode model."""
    spec_str = str(spec)
    if spec_str in PRETRAINED:
        weights = PRETRAINED[spec_str]
        if not weights.path.exists() or not weights.value.card_path.exists():
            raise ScsonetError(f"pretrained weights {spec_str!r} are not in this installation ({weights.path})")
        loaded = _from_card(weights.path, weights.meta, spec_str)
    else:
        path = Path(spec_str)
        if not path.exists():
            names = ", ".join(PRETRAINED)
            raise ScsonetError(f"weights {spec_str!r}: no such file, and not a pretrained name ({names})")
        if path.suffix == ".safetensors":
            card_path = path.with_suffix(".json")
            if not card_path.exists():
                raise ScsonetError(f"{path}: needs its model card {card_path.name} beside it")
            loaded = _from_card(path, json.loads(card_path.read_text()), str(path))
        else:
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=False)
                model = create_model(ckpt["model_name"], **ckpt["model_args"])
                model.load_state_dict(ckpt["model"], strict=True)
                pre = ckpt["preprocessing"]
            except ScsonetError:
                raise
            except Exception as err:  # corrupt or foreign file: say which, in one line
                raise ScsonetError(f"{path}: not a scsonet checkpoint ({type(err).__name__}: {err})") from None
            meta = {k: ckpt[k] for k in ("epoch", "best_val_dsc", "config", "protocol") if k in ckpt}
            loaded = LoadedModel(model.eval(), SegmentationPreset.from_stats(pre["mean"], pre["std"], pre["resize_size"]),
                                 ckpt["model_name"], str(path), meta)
    loaded.model.to(device)
    return loaded


def load_pretrained(name: str = "scsonet-isic2017", device: str | torch.device = "cpu") -> LoadedModel:
    """The shipped weights by name, ready for inference, with their preprocessing."""
    if name not in PRETRAINED:
        raise ScsonetError(f"unknown pretrained weights {name!r}; choose from {', '.join(PRETRAINED)}")
    return load_model(name, device)
