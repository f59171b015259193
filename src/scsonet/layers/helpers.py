"""Small factories shared by the blocks: activation and normalisation lookup, group counts."""
from __future__ import annotations

from typing import Callable, Union

import torch.nn as nn

LayerType = Union[str, Callable[..., nn.Module]]

_ACT_LAYERS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "identity": nn.Identity}


def get_act_layer(act_layer: LayerType) -> Callable[..., nn.Module]:
    """Resolve an activation given as a class or a name such as ``'gelu'``."""
    if isinstance(act_layer, str):
        try:
            return _ACT_LAYERS[act_layer.lower()]
        except KeyError:
            raise ValueError(f"unknown activation {act_layer!r}; choose from {sorted(_ACT_LAYERS)}") from None
    return act_layer


def largest_divisor_at_most(channels: int, limit: int) -> int:
    """The largest group count <= ``limit`` that divides ``channels`` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(limit, channels) + 1) if channels % g == 0)
