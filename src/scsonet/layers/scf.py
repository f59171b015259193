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

    Shape:
        (B, in_chs, H, W) -> (B, out_chs, H, W)
    """

    def __init__(self, in_chs: int, out_chs: int, decoder: bool = False, gate: str = "soft", ema_groups: int = 8):
        super().__init__()
        inner = out_chs if decoder else in_chs
        conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        refine = [SCConv(inner, gate=gate), PConv(inner)]
        layers = [conv, *reversed(refine)] if decoder else [*refine, conv]
        self.body = nn.Sequential(*layers, EMA(out_chs, ema_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


__all__ = ["SCFBlock"]
