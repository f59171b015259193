"""UNeXt.

`UNeXt: MLP-based Rapid Medical Image Segmentation Network`
(Valanarasu, Patel; MICCAI 2022), https://arxiv.org/abs/2203.04967
Original code: https://github.com/jeya-maria-jose/UNeXt-pytorch (not used here).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import LayerType, get_act_layer, pad_to_multiple, run_stages
from ._builder import build_with_weights
from ._registry import register_model
from ._weights import UNeXt_S_Weights

__all__ = ["UNeXt"]


def _shift_groups(x: torch.Tensor, dim: int, shift_size: int) -> torch.Tensor:
    """Split the channels into ``shift_size`` groups and shift group i by i - shift_size // 2
    positions along ``dim`` (2: H, 3: W), filling with zeros."""
    pad = shift_size // 2
    size = x.shape[dim]
    x = F.pad(x, (0, 0, pad, pad) if dim == 2 else (pad, pad))
    groups = x.chunk(shift_size, dim=1)
    return torch.cat([g.narrow(dim, pad - s, size) for g, s in zip(groups, range(-pad, pad + 1))], dim=1)


def _per_token(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a token-wise layer (Linear, LayerNorm) to every position of a (B, C, H, W) map."""
    return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ShiftedMLPBlock(nn.Module):
    """Tokenised MLP block: x + MLP(LN(x)), the MLP shifting tokens along H before its first
    linear layer and along W before its second, with a depthwise conv in between.

    Y = fc1(Shift_H(LN(x))); Y = fc2(Shift_W(GELU(DWConv(Y)))); out = x + Y   (Eq. 1-3)

    Args:
        dim: channels (tokens' width).
        mlp_ratio: hidden width over ``dim`` (1, as published).
        shift_size: channel groups shifted by -2..2 (5).
        act_layer: activation class (GELU).
    """

    def __init__(self, dim: int, mlp_ratio: float = 1.0, shift_size: int = 5, act_layer=nn.GELU):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.shift_size = shift_size
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _per_token(self.fc1, _shift_groups(_per_token(self.norm, x), 2, self.shift_size))
        y = self.act(self.dwconv(y))
        y = _per_token(self.fc2, _shift_groups(y, 3, self.shift_size))
        return x + y


class _TokenStage(nn.Module):
    """Optional stride-2 3x3 patch embedding (+ LN), one shifted-MLP block, LayerNorm.

    LayerNorm is not ``norm_layer``: it normalises tokens, the norm of a transformer-style block.
    """

    def __init__(self, in_chs: int, dim: int, act_layer, embed: bool = True):
        super().__init__()
        self.embed = nn.Conv2d(in_chs, dim, 3, stride=2, padding=1) if embed else None
        self.embed_norm = nn.LayerNorm(dim) if embed else None
        self.block = _ShiftedMLPBlock(dim, act_layer=act_layer)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = _per_token(self.embed_norm, self.embed(x))
        return _per_token(self.norm, self.block(x))


class _ConvStage(nn.Module):
    """3x3 conv -> (norm) -> resample x2 (max-pool or bilinear up) -> act."""

    def __init__(self, in_chs: int, out_chs: int, act_layer, norm_layer, up: bool = False, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        self.norm = norm_layer(out_chs) if norm else nn.Identity()
        self.up = up
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear") if self.up else F.max_pool2d(x, 2)
        return self.act(x)


class UNeXt(nn.Module):
    """Three conv stages, then tokenised shifted-MLP stages at H/16 and H/32, and back.

    Encoder: conv stages to H/2, H/4, H/8 (skips t1..t3), a token stage to H/16 (skip t4) and a
    bottleneck token stage to H/32. Decoder: conv + BN + up x2 + ReLU, add the skip, and at H/16
    and H/8 a shifted-MLP block; two more conv stages, a last conv + up, a 1x1 head.

    Args:
        num_classes: output channels (1).
        in_chans: input channels (3).
        act_layer: activation class or name of the conv stages (``'relu'``).
        norm_layer: normalisation class of the conv stages (``nn.BatchNorm2d``).
        embed_dims: channels of the three conv stages and the two token stages
            ((8, 16, 32, 64, 128): UNeXt-S; UNeXt is (16, 32, 128, 160, 256)).
        mlp_act_layer: activation class or name of the shifted-MLP blocks (``'gelu'``).
        device: device of the parameters (None).
        dtype: dtype of the parameters (None).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes, H, W); sides are padded to a multiple of 32 inside
        and the logits cropped back.

    Note:
        PyTorch's default initialisation (the published code re-initialises linears and convs).
    """

    pad_multiple = 32
    # Layer names for the model card (timm's first_conv / classifier): loading adapts them.
    first_conv_name = "encoder.0.conv"
    classifier_name = "segmentation_head"

    def __init__(
        self,
        num_classes: int = 1,
        in_chans: int = 3,
        act_layer: LayerType = "relu",
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        embed_dims: Sequence[int] = (8, 16, 32, 64, 128),
        mlp_act_layer: LayerType = "gelu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if len(embed_dims) != 5:
            raise ValueError(f"embed_dims needs 5 channel counts, got {len(embed_dims)}")
        act, mlp_act = get_act_layer(act_layer), get_act_layer(mlp_act_layer)
        c = list(embed_dims)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = tuple(c)
        self.encoder = nn.ModuleList([
            _ConvStage(in_chans, c[0], act, norm_layer),
            _ConvStage(c[0], c[1], act, norm_layer),
            _ConvStage(c[1], c[2], act, norm_layer),
            _TokenStage(c[2], c[3], mlp_act),
            _TokenStage(c[3], c[4], mlp_act),
        ])
        self.decoder = nn.ModuleList([
            _ConvStage(c[4], c[3], act, norm_layer, up=True),
            _ConvStage(c[3], c[2], act, norm_layer, up=True),
            _ConvStage(c[2], c[1], act, norm_layer, up=True),
            _ConvStage(c[1], c[0], act, norm_layer, up=True),
            _ConvStage(c[0], c[0], act, norm_layer, up=True, norm=False),
        ])
        # Shifted-MLP blocks after adding the skip at H/16 and H/8.
        self.decoder_tokens = nn.ModuleList([
            _TokenStage(c[3], c[3], mlp_act, embed=False),
            _TokenStage(c[2], c[2], mlp_act, embed=False),
        ])
        self.segmentation_head = nn.Conv2d(c[0], num_classes, 1)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple)
        skips = run_stages(self.encoder, x)
        x = skips[-1]
        skips = skips[-2::-1]  # t4, t3, t2, t1
        for i, stage in enumerate(self.decoder):
            x = stage(x)
            if i < len(skips):
                x = x + skips[i]
            if i < len(self.decoder_tokens):
                x = self.decoder_tokens[i](x)
        return self.segmentation_head(x)[..., :h, :w]


def _create_unext(weights: UNeXt_S_Weights | str | None = None, reset_head: bool = False, **kwargs) -> UNeXt:
    return build_with_weights(UNeXt, UNeXt_S_Weights, weights, kwargs, reset_head)


@register_model
def unext_s(*, weights: UNeXt_S_Weights | str | None = None, reset_head: bool = False, **kwargs) -> UNeXt:
    """UNeXt-S from `UNeXt: MLP-based Rapid Medical Image Segmentation Network
    <https://arxiv.org/abs/2203.04967>`__ (0.25 M parameters); ``weights`` and ``reset_head`` as in
    ``scsonet``."""
    return _create_unext(weights, reset_head, **kwargs)
