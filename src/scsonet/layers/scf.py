"""The spatial-channel fusion (SCF) block of SCSONet.

`SCSONet: spatial-channel synergistic optimization net for skin lesion segmentation`
(Chen et al.; Frontiers in Physics 2024), https://doi.org/10.3389/fphy.2024.1388364
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .ema import EMA
from .pconv import PConv
from .scconv import SCConv


MIXERS = ("pconv", "dwsep", "dilated", "none")


def _spatial_mixer(mixer: str, channels: int) -> nn.Module | None:
    """The spatial convolution beside SCConv; the alternatives are those of Table 3 of the paper."""
    if mixer == "pconv":
        return PConv(channels)
    if mixer == "dwsep":  # depthwise 3x3 then pointwise 1x1
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.Conv2d(channels, channels, 1))
    if mixer == "dilated":
        return nn.Conv2d(channels, channels, 3, padding=2, dilation=2)
    return None


class SCFBlock(nn.Module):
    """SCConv + PConv + a 3x3 channel-changing conv + EMA.

    Eq. 4 (encoder): F = EMA(Conv3x3(PConv(SCConv(X)))); the decoder order is
    EMA(SCConv(PConv(Conv3x3(X)))), so SCConv and PConv always act on the narrower side.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        decoder: use the decoder order (False).
        gate: SCConv's SRU gate, ``'soft'`` or ``'hard'`` (``'soft'``).
        ema_groups: EMA channel groups (8).
        mixer: spatial conv beside SCConv: ``'pconv'``, ``'dwsep'`` (depthwise-separable),
            ``'dilated'`` (full 3x3, dilation 2) or ``'none'`` (``'pconv'``).
        use_ema: end with EMA (True).

    Shape:
        (B, in_chs, H, W) -> (B, out_chs, H, W)

    Note:
        ``mixer`` and ``use_ema`` exist for the paper's SCF micro-ablation (Table 3); the paper
        does not describe its depthwise-separable and dilated variants, these are our reading.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        decoder: bool = False,
        gate: str = "soft",
        ema_groups: int = 8,
        mixer: str = "pconv",
        use_ema: bool = True,
    ):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        inner = out_chs if decoder else in_chs
        conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        refine = [SCConv(inner, gate=gate), _spatial_mixer(mixer, inner)]
        refine = [m for m in refine if m is not None]
        layers = [conv, *reversed(refine)] if decoder else [*refine, conv]
        if use_ema:
            layers.append(EMA(out_chs, ema_groups))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


__all__ = ["SCFBlock", "MIXERS"]
