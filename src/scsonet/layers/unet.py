"""U-Net plumbing shared by the models: size padding, stage runners, and the MALUNet-style stages.

`MALUNet: A Multi-Attention and Light-weight UNet for Skin Lesion Segmentation`
(Ruan, Xiang, Xie, Liu, Fu; BIBM 2022), https://arxiv.org/abs/2211.01784, introduced the stage
layout that EGE-UNet and SCSONet keep: block -> GroupNorm -> max-pool -> act going down,
block -> GroupNorm -> bilinear x2 -> act (+ skip) coming up.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DecoderStage", "EncoderStage", "Upsample2x", "pad_to_multiple", "run_stages"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad the bottom and right so both sides are multiples of ``multiple``.

    Shape:
        (B, C, H, W) -> (B, C, H + (-H mod multiple), W + (-W mod multiple)); the input itself
        when no side needs padding.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def run_stages(stages: Iterable[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every stage, each stage fed the previous output (the last is the deepest)."""
    feats = []
    for stage in stages:
        x = stage(x)
        feats.append(x)
    return feats


class Upsample2x(nn.Upsample):
    """Bilinear x2 upsampling with aligned corners: the decoders' and the heads' upsampling.

    Shape:
        (B, C, H, W) -> (B, C, 2H, 2W)
    """

    def __init__(self):
        super().__init__(scale_factor=2.0, mode="bilinear", align_corners=True)


class EncoderStage(nn.Module):
    """One encoder stage: block -> GroupNorm -> max-pool 2 -> act; without ``downsample``, block -> act.

    Args:
        block: the stage's block, ``C_in -> out_chs`` channels.
        out_chs: the block's output channels.
        act_layer: activation class.
        downsample: GroupNorm and max-pool after the block (True; False for the deepest stage).
        norm_groups: GroupNorm groups (4).

    Shape:
        (B, C_in, H, W) -> (B, out_chs, H/2, W/2), or (B, out_chs, H, W) without ``downsample``
    """

    def __init__(
        self,
        block: nn.Module,
        out_chs: int,
        act_layer: Callable[..., nn.Module],
        downsample: bool = True,
        norm_groups: int = 4,
    ):
        super().__init__()
        self.block = block
        self.norm = nn.GroupNorm(norm_groups, out_chs) if downsample else nn.Identity()
        self.pool = nn.MaxPool2d(2) if downsample else nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pool(self.norm(self.block(x))))


class DecoderStage(nn.Module):
    """One decoder stage: block -> GroupNorm -> bilinear x2 -> act, then add the skip (if given).

    Args:
        block: the stage's block, ``C_in -> out_chs`` channels.
        out_chs: the block's output channels.
        act_layer: activation class.
        upsample: bilinear x2 after the norm (True; False for the first, deepest stage).
        norm_groups: GroupNorm groups (4).

    Shape:
        (B, C_in, H, W) and a skip (B, out_chs, 2H, 2W) -> (B, out_chs, 2H, 2W); without
        ``upsample`` the sides stay H and W
    """

    def __init__(
        self,
        block: nn.Module,
        out_chs: int,
        act_layer: Callable[..., nn.Module],
        upsample: bool = True,
        norm_groups: int = 4,
    ):
        super().__init__()
        self.block = block
        self.norm = nn.GroupNorm(norm_groups, out_chs)
        self.upsample = Upsample2x() if upsample else nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.act(self.upsample(self.norm(self.block(x))))
        return x if skip is None else x + skip
