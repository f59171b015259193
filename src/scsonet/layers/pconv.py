"""Partial convolution.

`Run, Don't Walk: Chasing Higher FLOPS for Faster Neural Networks` (Chen et al.; CVPR 2023),
https://arxiv.org/abs/2303.03667
"""
from __future__ import annotations

import torch
import torch.nn as nn


class PConv(nn.Module):
    """A k x k convolution over the first C/n_div channels; the other channels pass through.

    Eq. 9: FLOPs = h * w * k^2 * c_p^2, with c_p = C / n_div (1/4 of a full conv for n_div = 2).

    Args:
        channels: C.
        n_div: the convolved part is C // n_div channels (2, as in SCSONet).
        kernel_size: k (3).

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, n_div: int = 2, kernel_size: int = 3):
        super().__init__()
        self.conv_chs = channels // n_div
        self.pass_chs = channels - self.conv_chs
        self.conv = nn.Conv2d(self.conv_chs, self.conv_chs, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.conv_chs, self.pass_chs], dim=1)
        return torch.cat([self.conv(x1), x2], dim=1)


__all__ = ["PConv"]
