"""U-Net.

`U-Net: Convolutional Networks for Biomedical Image Segmentation`
(Ronneberger, Fischer, Brox; MICCAI 2015), https://arxiv.org/abs/1505.04597

The configuration is the 7.77 M-parameter U-Net of the EGE-UNet and SCSONet tables: the
original five-level layout (double 3x3 convs, max-pool, 2x2 transposed-conv up-sampling,
concatenated skips) with 32 base channels instead of 64, padded convs and BatchNorm.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..layers import LayerType, get_act_layer, pad_to_multiple, run_stages
from ._builder import no_weights
from ._registry import register_model

__all__ = ["UNet"]


class _DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> act) twice."""

    def __init__(self, in_chs: int, out_chs: int, act_layer, norm_layer):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, 3, padding=1), norm_layer(out_chs), act_layer(),
            nn.Conv2d(out_chs, out_chs, 3, padding=1), norm_layer(out_chs), act_layer(),
        )


class _Down(nn.Sequential):
    """max-pool 2 -> double conv."""

    def __init__(self, in_chs: int, out_chs: int, act_layer, norm_layer):
        super().__init__(nn.MaxPool2d(2), _DoubleConv(in_chs, out_chs, act_layer, norm_layer))


class _Up(nn.Module):
    """2x2 transposed conv halving the channels, concatenate the skip, double conv."""

    def __init__(self, in_chs: int, out_chs: int, act_layer, norm_layer):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_chs, in_chs // 2, 2, stride=2)
        self.conv = _DoubleConv(in_chs // 2 + out_chs, out_chs, act_layer, norm_layer)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Encoder of double convs and pooling, symmetric decoder with concatenated skips.

    Args:
        num_classes: output channels (1).
        in_chans: input channels (3).
        act_layer: activation class or name (``'relu'``).
        norm_layer: normalisation class (``nn.BatchNorm2d``).
        embed_dims: channels of the five levels ((32, 64, 128, 256, 512)).
        device: device of the parameters (None).
        dtype: dtype of the parameters (None).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes, H, W); sides are padded to a multiple of 16 inside
        and the logits cropped back.

    Note:
        Padded convs and BatchNorm, not the paper's unpadded convs with an output smaller than the
        input: the common modern form, and the one the compared tables measured.
    """

    # Layer names for the model card (timm's first_conv / classifier): loading adapts them.
    first_conv_name = "encoder.0.0"
    classifier_name = "segmentation_head"

    def __init__(
        self,
        num_classes: int = 1,
        in_chans: int = 3,
        act_layer: LayerType = "relu",
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        embed_dims: Sequence[int] = (32, 64, 128, 256, 512),
        device=None,
        dtype=None,
    ):
        super().__init__()
        act = get_act_layer(act_layer)
        c = list(embed_dims)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = tuple(c)
        self.pad_multiple = 2 ** (len(c) - 1)
        self.encoder = nn.ModuleList(
            [_DoubleConv(in_chans, c[0], act, norm_layer)]
            + [_Down(c[i], c[i + 1], act, norm_layer) for i in range(len(c) - 1)]
        )
        self.decoder = nn.ModuleList(_Up(c[i], c[i - 1], act, norm_layer) for i in reversed(range(1, len(c))))
        self.segmentation_head = nn.Conv2d(c[0], num_classes, 1)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple)
        feats = run_stages(self.encoder, x)
        x = feats[-1]
        for stage, skip in zip(self.decoder, reversed(feats[:-1])):
            x = stage(x, skip)
        return self.segmentation_head(x)[..., :h, :w]


def _create_unet(weights: None = None, **kwargs) -> UNet:
    no_weights("unet", weights)
    return UNet(**kwargs)


@register_model
def unet(*, weights: None = None, **kwargs) -> UNet:
    """U-Net from `U-Net: Convolutional Networks for Biomedical Image Segmentation
    <https://arxiv.org/abs/1505.04597>`__, 32 base channels (7.77 M parameters); no pretrained weights."""
    return _create_unet(weights, **kwargs)
