"""Spatial and channel reconstruction convolution.

`SCConv: Spatial and Channel Reconstruction Convolution for Feature Redundancy`
(Li, Zhao, Wang; CVPR 2023), https://openaccess.thecvf.com/content/CVPR2023/html/Li_SCConv_Spatial_and_Channel_Reconstruction_Convolution_for_Feature_Redundancy_CVPR_2023_paper.html
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import largest_divisor_at_most

GATES = ("soft", "hard")


class SRU(nn.Module):
    """Spatial reconstruction unit: separate informative from redundant positions, then cross-add.

    Eq. 5-6: W = Gate(Sigmoid(W_gamma(GN(X)))); X1 = W1*X, X2 = W2*X; X = [X11+X22, X12+X21]

    Args:
        channels: C, split in two halves for the cross reconstruction (must be even).
        group_num: GroupNorm groups; the largest divisor of C up to this (16).
        gate_threshold: the gate's threshold on the sigmoid weight (0.5).
        gate: ``'soft'`` (SCConv paper: W1 = 1 above the threshold else w; W2 = 0 above it else w)
            or ``'hard'`` (published SCSONet code: boolean masks; GroupNorm gets no gradient).

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, group_num: int = 16, gate_threshold: float = 0.5, gate: str = "soft"):
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if channels % 2:
            raise ValueError(f"SRU needs an even channel count, got {channels}")
        self.gn = nn.GroupNorm(largest_divisor_at_most(channels, group_num), channels)
        self.gate_threshold = gate_threshold
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gn.weight
        w_gamma = (gamma / gamma.sum()).view(1, -1, 1, 1)
        w = torch.sigmoid(self.gn(x) * w_gamma)
        informative = w > self.gate_threshold
        if self.gate == "soft":
            w1 = torch.where(informative, torch.ones_like(w), w)
            w2 = torch.where(informative, torch.zeros_like(w), w)
        else:
            w1 = informative.to(x.dtype)
            w2 = (~informative).to(x.dtype)
        x1, x2 = w1 * x, w2 * x
        x11, x12 = x1.chunk(2, dim=1)
        x21, x22 = x2.chunk(2, dim=1)
        return torch.cat([x11 + x22, x12 + x21], dim=1)


class CRU(nn.Module):
    """Channel reconstruction unit: split, transform cheaply, fuse with channel soft attention.

    Eq. 7-8: Y1 = M_G X_up + M_P1 X_up; Y2 = [M_P2 X_low, X_low]; beta = softmax(GAP([Y1, Y2]));
    Y = beta1*Y1 + beta2*Y2

    Args:
        channels: C.
        alpha: fraction of channels in the upper (rich) part (1/2).
        squeeze_ratio: squeeze of each part by 1x1 convolutions (2).
        group_size: groups of the group-wise convolution (2).
        group_kernel_size: its kernel size (3).

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(
        self, channels: int, alpha: float = 0.5, squeeze_ratio: int = 2, group_size: int = 2, group_kernel_size: int = 3
    ):
        super().__init__()
        self.up_chs = int(alpha * channels)
        self.low_chs = channels - self.up_chs
        up_sq, low_sq = self.up_chs // squeeze_ratio, self.low_chs // squeeze_ratio
        self.squeeze_up = nn.Conv2d(self.up_chs, up_sq, 1, bias=False)
        self.squeeze_low = nn.Conv2d(self.low_chs, low_sq, 1, bias=False)
        self.gwc = nn.Conv2d(up_sq, channels, group_kernel_size, padding=group_kernel_size // 2, groups=group_size)
        self.pwc_up = nn.Conv2d(up_sq, channels, 1, bias=False)
        self.pwc_low = nn.Conv2d(low_sq, channels - low_sq, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, low = torch.split(x, [self.up_chs, self.low_chs], dim=1)
        up, low = self.squeeze_up(up), self.squeeze_low(low)
        y1 = self.gwc(up) + self.pwc_up(up)
        y2 = torch.cat([self.pwc_low(low), low], dim=1)
        y = torch.cat([y1, y2], dim=1)
        y = torch.softmax(F.adaptive_avg_pool2d(y, 1), dim=1) * y
        y1, y2 = y.chunk(2, dim=1)
        return y1 + y2


class SCConv(nn.Module):
    """SRU followed by CRU: reduces spatial, then channel redundancy; keeps the shape.

    Args:
        channels: C.
        group_num: SRU GroupNorm groups (16, fewer when C needs it).
        gate_threshold: SRU gate threshold (0.5).
        gate: SRU gate, ``'soft'`` or ``'hard'`` (``'soft'``).
        alpha: CRU split ratio (1/2).
        squeeze_ratio: CRU squeeze ratio (2).
        group_size: CRU group-wise conv groups (2).
        group_kernel_size: CRU group-wise conv kernel (3).

    Shape:
        (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(
        self,
        channels: int,
        group_num: int = 16,
        gate_threshold: float = 0.5,
        gate: str = "soft",
        alpha: float = 0.5,
        squeeze_ratio: int = 2,
        group_size: int = 2,
        group_kernel_size: int = 3,
    ):
        super().__init__()
        self.sru = SRU(channels, group_num, gate_threshold, gate)
        self.cru = CRU(channels, alpha, squeeze_ratio, group_size, group_kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cru(self.sru(x))


__all__ = ["SRU", "CRU", "SCConv", "GATES"]
