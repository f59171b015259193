"""EGE-UNet.

`EGE-UNet: an Efficient Group Enhanced UNet for skin lesion segmentation`
(Ruan, Xie, Gao, Liu, Fu; MICCAI 2023), https://arxiv.org/abs/2307.08473
Original code: https://github.com/JCruan519/EGE-UNet (not used here).

Deep supervision: in training mode the forward pass also stores the five side outputs in
``model.aux_logits`` (logits at the input size, deepest first); ``model(x)`` always returns the
final logits only. A training step adds them with the published weights::

    logits = model(x)
    loss = criterion(logits, y)
    if getattr(raw_model, "aux_logits", None):
        loss = loss + deep_supervision_loss(raw_model.aux_logits, y, criterion)

The side outputs also gate the group aggregation bridge, so their heads run in eval mode too;
only the upsampling and storing are skipped there.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import DecoderStage, EncoderStage, LayerType, Upsample2x, get_act_layer, pad_to_multiple, run_stages
from ._builder import build_with_weights
from ._registry import register_model
from ._weights import EGEUNet_Weights

__all__ = ["EGEUNet", "EGEUNET_AUX_WEIGHTS", "deep_supervision_loss"]

# Weights of the side-output losses, deepest (H/32) first; the final output has weight 1.
EGEUNET_AUX_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)


def deep_supervision_loss(
    aux_logits: Sequence[torch.Tensor],
    target: torch.Tensor,
    base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weights: Sequence[float] = EGEUNET_AUX_WEIGHTS,
) -> torch.Tensor:
    """sum_i weights[i] * base_loss(aux_logits[i], target): add it to the loss of the final output."""
    if len(aux_logits) != len(weights):
        raise ValueError(f"got {len(aux_logits)} side outputs for {len(weights)} weights")
    return sum(w * base_loss(aux, target) for w, aux in zip(weights, aux_logits))


class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _axis_weights(params: torch.Tensor, size: Sequence[int], mixer: nn.Module) -> torch.Tensor:
    """Resize a learned weight map to the feature size (align_corners), then mix it with ``mixer``."""
    mode = "bilinear" if params.dim() == 4 else "linear"
    return mixer(F.interpolate(params, size=tuple(size), mode=mode, align_corners=True))


class _GroupedHadamardAttention(nn.Module):
    """GHPA: four channel groups, three re-weighted by learned maps over (H, W), (C, H) and (C, W)
    (Hadamard products), the fourth through a depthwise conv; then LayerNorm and a projection.

    y = Proj(LN([x1 * M_hw, x2 * M_ch, x3 * M_cw, DW(x4)])), x1..x4 the groups of LN(x); each map
    is a learned 8-sample parameter, resized to the feature size and passed through dw conv-GELU-1x1.

    Args:
        in_chs: input channels, divisible by 4.
        out_chs: output channels.
        param_size: side of the learned maps before resizing (8).
        act_layer: activation class (GELU).
    """

    def __init__(self, in_chs: int, out_chs: int, param_size: int = 8, act_layer: Callable[..., nn.Module] = nn.GELU):
        super().__init__()
        if in_chs % 4:
            raise ValueError(f"GHPA needs in_chs divisible by 4, got {in_chs}")
        g = in_chs // 4
        self.params_hw = nn.Parameter(torch.ones(1, g, param_size, param_size))
        self.params_ch = nn.Parameter(torch.ones(1, g, param_size))
        self.params_cw = nn.Parameter(torch.ones(1, g, param_size))
        self.mix_hw = nn.Sequential(nn.Conv2d(g, g, 3, padding=1, groups=g), act_layer(), nn.Conv2d(g, g, 1))
        self.mix_ch = nn.Sequential(nn.Conv1d(g, g, 3, padding=1, groups=g), act_layer(), nn.Conv1d(g, g, 1))
        self.mix_cw = nn.Sequential(nn.Conv1d(g, g, 3, padding=1, groups=g), act_layer(), nn.Conv1d(g, g, 1))
        self.local = nn.Sequential(nn.Conv2d(g, g, 1), act_layer(), nn.Conv2d(g, g, 3, padding=1, groups=g))
        self.norm_in = _LayerNorm2d(in_chs)
        self.norm_out = _LayerNorm2d(in_chs)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, 3, padding=1, groups=in_chs), act_layer(), nn.Conv2d(in_chs, out_chs, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3, x4 = self.norm_in(x).chunk(4, dim=1)
        h, w = x.shape[-2:]
        x1 = x1 * _axis_weights(self.params_hw, (h, w), self.mix_hw)  # (1, g, H, W)
        x2 = x2 * _axis_weights(self.params_ch, (h,), self.mix_ch).unsqueeze(-1)  # (1, g, H, 1)
        x3 = x3 * _axis_weights(self.params_cw, (w,), self.mix_cw).unsqueeze(-2)  # (1, g, 1, W)
        x = torch.cat([x1, x2, x3, self.local(x4)], dim=1)
        return self.proj(self.norm_out(x))


class _GroupAggregationBridge(nn.Module):
    """GAB: fuse a deeper feature, the skip and a side-output mask in four dilated groups.

    y = Conv1x1(LN([DConv_d(LN([up(Conv1x1(x_h))_i, x_l_i, mask])) for i, d in groups]))

    Args:
        deep_chs: channels of the deeper feature x_h.
        skip_chs: channels of the skip x_l (and of the output), divisible by 4.
        dilations: dilation of each group ((1, 2, 5, 7)).
    """

    def __init__(self, deep_chs: int, skip_chs: int, dilations: Sequence[int] = (1, 2, 5, 7)):
        super().__init__()
        if skip_chs % 4:
            raise ValueError(f"GAB needs skip channels divisible by 4, got {skip_chs}")
        group_chs = skip_chs // 2 + 1  # a quarter of each input plus the mask
        self.pre_project = nn.Conv2d(deep_chs, skip_chs, 1)
        self.groups = nn.ModuleList(
            nn.Sequential(
                _LayerNorm2d(group_chs),
                nn.Conv2d(group_chs, group_chs, 3, padding=d, dilation=d, groups=group_chs),
            )
            for d in dilations
        )
        self.tail = nn.Sequential(_LayerNorm2d(group_chs * len(dilations)), nn.Conv2d(group_chs * len(dilations), skip_chs, 1))

    def forward(self, deep: torch.Tensor, skip: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        deep = F.interpolate(self.pre_project(deep), size=skip.shape[-2:], mode="bilinear", align_corners=True)
        n = len(self.groups)
        parts = zip(self.groups, deep.chunk(n, dim=1), skip.chunk(n, dim=1))
        return self.tail(torch.cat([group(torch.cat([d, s, mask], dim=1)) for group, d, s in parts], dim=1))


class EGEUNet(nn.Module):
    """Efficient group enhanced U-Net: GHPA blocks, group aggregation bridges gated by side outputs.

    Encoder E1-E3 3x3 convs, E4-E6 GHPA; decoder D1-D3 GHPA, D4-D5 3x3 convs, with GroupNorm(4),
    pooling and GELU as MALUNet. After each decoder stage a 1x1 head predicts a side-output mask,
    which with the deeper bridged feature and the encoder skip feeds a GAB whose output is added.
    Returns logits; inputs of any size are padded to a multiple of 32 inside and cropped back.

    Args:
        num_classes: output channels of the final head (1).
        in_chans: input channels (3).
        act_layer: activation class or name (``'gelu'``).
        embed_dims: channels c0..c5 ((8, 16, 24, 32, 48, 64)).
        device: device of the parameters (None).
        dtype: dtype of the parameters (None).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes, H, W); in training, ``aux_logits`` holds five
        (B, 1, H, W) side outputs, deepest first (weights ``EGEUNET_AUX_WEIGHTS``).

    Note:
        PyTorch's default initialisation; logits instead of the published sigmoid outputs; the
        side outputs are an attribute instead of a tuple return value.
    """

    pad_multiple = 32
    # Layer names for the model card (timm's first_conv / classifier): loading adapts them.
    first_conv_name = "encoder.0.block"
    classifier_name = "segmentation_head"
    aux_weights = EGEUNET_AUX_WEIGHTS

    def __init__(
        self,
        num_classes: int = 1,
        in_chans: int = 3,
        act_layer: LayerType = "gelu",
        embed_dims: Sequence[int] = (8, 16, 24, 32, 48, 64),
        device=None,
        dtype=None,
    ):
        super().__init__()
        if len(embed_dims) != 6:
            raise ValueError(f"embed_dims needs 6 channel counts, got {len(embed_dims)}")
        act = get_act_layer(act_layer)
        c = list(embed_dims)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = tuple(c)
        self.encoder = nn.ModuleList([
            EncoderStage(nn.Conv2d(in_chans, c[0], 3, padding=1), c[0], act),
            EncoderStage(nn.Conv2d(c[0], c[1], 3, padding=1), c[1], act),
            EncoderStage(nn.Conv2d(c[1], c[2], 3, padding=1), c[2], act),
            EncoderStage(_GroupedHadamardAttention(c[2], c[3], act_layer=act), c[3], act),
            EncoderStage(_GroupedHadamardAttention(c[3], c[4], act_layer=act), c[4], act),
            EncoderStage(_GroupedHadamardAttention(c[4], c[5], act_layer=act), c[5], act, downsample=False),
        ])
        # Deepest first, in decoder order: bridge i fuses the output of bridge i - 1 (t6 for the first).
        self.bridge = nn.ModuleList(_GroupAggregationBridge(c[i + 1], c[i]) for i in reversed(range(5)))
        self.aux_heads = nn.ModuleList(nn.Conv2d(c[i], 1, 1) for i in reversed(range(5)))
        self.decoder = nn.ModuleList([
            DecoderStage(_GroupedHadamardAttention(c[5], c[4], act_layer=act), c[4], act, upsample=False),
            DecoderStage(_GroupedHadamardAttention(c[4], c[3], act_layer=act), c[3], act),
            DecoderStage(_GroupedHadamardAttention(c[3], c[2], act_layer=act), c[2], act),
            DecoderStage(nn.Conv2d(c[2], c[1], 3, padding=1), c[1], act),
            DecoderStage(nn.Conv2d(c[1], c[0], 3, padding=1), c[0], act),
        ])
        self.segmentation_head = nn.Conv2d(c[0], num_classes, 1)
        self.head_upsample = Upsample2x()
        self.aux_logits: list[torch.Tensor] = []
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def train(self, mode: bool = True) -> EGEUNet:
        self.aux_logits = []  # never keep side outputs (and their graph) across a mode switch
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple)
        padded_size = x.shape[-2:]
        feats = run_stages(self.encoder, x)
        x = deep = feats[-1]
        masks = []
        for stage, head, bridge, skip in zip(self.decoder, self.aux_heads, self.bridge, reversed(feats[:-1])):
            x = stage(x)
            masks.append(head(x))
            deep = bridge(deep, skip, masks[-1])
            x = x + deep
        logits = self.head_upsample(self.segmentation_head(x))
        if self.training:
            self.aux_logits = [
                F.interpolate(m, size=padded_size, mode="bilinear", align_corners=True)[..., :h, :w] for m in masks
            ]
        return logits[..., :h, :w]


def _create_egeunet(weights: EGEUNet_Weights | str | None = None, reset_head: bool = False, **kwargs) -> EGEUNet:
    return build_with_weights(EGEUNet, EGEUNet_Weights, weights, kwargs, reset_head)


@register_model
def egeunet(*, weights: EGEUNet_Weights | str | None = None, reset_head: bool = False, **kwargs) -> EGEUNet:
    """EGE-UNet from `EGE-UNet: an Efficient Group Enhanced UNet for skin lesion segmentation
    <https://arxiv.org/abs/2307.08473>`__ (0.053 M parameters); ``weights`` and ``reset_head`` as in
    ``scsonet`` (the side-output heads stay pretrained: they have one channel whatever ``num_classes``)."""
    return _create_egeunet(weights, reset_head, **kwargs)
