"""Efficient multi-scale attention.

`Efficient Multi-Scale Attention Module with Cross-Spatial Learning` (Ouyang et al.; ICASSP 2023),
https://arxiv.org/abs/2305.13563
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class EMA(nn.Module):
    """Channels folded into groups as batch; a 1x1 branch (pooled along H and W) and a 3x3
    branch re-weight each other through cross-spatial softmax attention.

    Out = X * sigmoid(softmax(GAP(X1)) X2 + softmax(GAP(X2)) X1), per group, where X1 is the
    1x1 (coordinate-attention) branch and X2 the 3x3 branch.

    Args:
        channels: C, divisible by ``groups``.
        groups: number of channel groups folded into the batch (8).

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        if channels % groups:
            raise ValueError(f"EMA needs channels ({channels}) divisible by groups ({groups})")
        self.groups = groups
        gc = channels // groups
        self.gn = nn.GroupNorm(gc, gc)
        self.conv1x1 = nn.Conv2d(gc, gc, 1)
        self.conv3x3 = nn.Conv2d(gc, gc, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        pooled_h = g.mean(dim=3, keepdim=True)  # (bg, gc, h, 1)
        pooled_w = g.mean(dim=2, keepdim=True).transpose(2, 3)  # (bg, gc, w, 1)
        hw = self.conv1x1(torch.cat([pooled_h, pooled_w], dim=2))
        att_h, att_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(g * att_h.sigmoid() * att_w.transpose(2, 3).sigmoid())
        x2 = self.conv3x3(g)
        q1 = torch.softmax(F.adaptive_avg_pool2d(x1, 1).flatten(1), dim=-1).unsqueeze(1)  # (bg, 1, gc)
        q2 = torch.softmax(F.adaptive_avg_pool2d(x2, 1).flatten(1), dim=-1).unsqueeze(1)
        weights = torch.matmul(q1, x2.flatten(2)) + torch.matmul(q2, x1.flatten(2))  # (bg, 1, hw)
        return (g * weights.reshape(b * self.groups, 1, h, w).sigmoid()).reshape(b, c, h, w)


__all__ = ["EMA"]
