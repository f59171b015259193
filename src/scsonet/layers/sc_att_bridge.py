"""Spatial-channel attention bridge between encoder and decoder.

`MALUNet: A Multi-Attention and Light-weight UNet for Skin Lesion Segmentation`
(Ruan, Xiang, Xie, Liu, Fu; BIBM 2022), https://arxiv.org/abs/2211.01784
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CAB_RESIDUALS = ("sab", "attended")


class SpatialAttentionBridge(nn.Module):
    """SAB: per stage, [mean over C, max over C] -> one shared dilated 7x7 conv -> sigmoid map.

    t_i' = t_i * sigmoid(DConv([AvgPool_C(t_i), MaxPool_C(t_i)])) + t_i

    Args:
        kernel_size: shared conv kernel (7).
        dilation: its dilation (3).

    Shape:
        list of (B, C_i, H_i, W_i) -> same shapes
    """

    def __init__(self, kernel_size: int = 7, dilation: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation)

    def attention(self, t: torch.Tensor) -> torch.Tensor:
        """The (B, 1, H, W) spatial attention map of one stage."""
        desc = torch.cat([t.mean(dim=1, keepdim=True), t.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t * self.attention(t) + t for t in feats]


class ChannelAttentionBridge(nn.Module):
    """CAB: pooled channels of all stages, mixed by a Conv1d, mapped back per stage.

    Eq. 3: T = Concat(GAP(t_1..t_L)); T' = Conv1D(T); Att_i = sigmoid(FC_i(T')); Out_i = t_i * Att_i

    Args:
        channels: C_i of each stage.
        kernel_size: Conv1d kernel across the concatenated channels (3).

    Shape:
        list of (B, C_i, H_i, W_i) -> same shapes
    """

    def __init__(self, channels: Sequence[int], kernel_size: int = 3):
        super().__init__()
        self.mix = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.fcs = nn.ModuleList(nn.Linear(sum(channels), c) for c in channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        pooled = torch.cat([F.adaptive_avg_pool2d(t, 1).flatten(1) for t in feats], dim=1)
        mixed = self.mix(pooled.unsqueeze(1)).squeeze(1)  # (B, sum C)
        return [t * torch.sigmoid(fc(mixed))[:, :, None, None] for t, fc in zip(feats, self.fcs)]


class SCAttentionBridge(nn.Module):
    """SAB then CAB, each with a residual: out_i = CAB(s)_i + r_i with s_i = t_i * a_i + t_i.

    a_i is the spatial attention map of stage i; the CAB residual r_i is the SAB output s_i
    (``cab_residual='sab'``) or only the attended part t_i * a_i (``'attended'``).

    Args:
        channels: C_i of each bridged stage (for SCSONet: c0..c4).
        spatial_kernel_size: SAB kernel (7).
        spatial_dilation: SAB dilation (3).
        channel_kernel_size: CAB Conv1d kernel (3).
        cab_residual: ``'sab'`` or ``'attended'`` (``'sab'``).

    Shape:
        list of (B, C_i, H_i, W_i) -> same shapes

    Note:
        The published MALUNet and SCSONet code both use ``'attended'``.
    """

    def __init__(
        self,
        channels: Sequence[int],
        spatial_kernel_size: int = 7,
        spatial_dilation: int = 3,
        channel_kernel_size: int = 3,
        cab_residual: str = "sab",
    ):
        super().__init__()
        if cab_residual not in CAB_RESIDUALS:
            raise ValueError(f"cab_residual must be one of {CAB_RESIDUALS}, got {cab_residual!r}")
        self.cab_residual = cab_residual
        self.sab = SpatialAttentionBridge(spatial_kernel_size, spatial_dilation)
        self.cab = ChannelAttentionBridge(channels, channel_kernel_size)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        attended = [t * self.sab.attention(t) for t in feats]
        spatial = [a + t for a, t in zip(attended, feats)]
        residual = spatial if self.cab_residual == "sab" else attended
        return [c + r for c, r in zip(self.cab(spatial), residual)]


__all__ = ["SpatialAttentionBridge", "ChannelAttentionBridge", "SCAttentionBridge", "CAB_RESIDUALS"]
