"""Each block alone: shapes, and a tiny check of its defining equation."""
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scsonet.layers import (CRU, EMA, SRU, DecoderStage, EncoderStage, ODConv2d, PConv, SCAttentionBridge, SCConv,
                            SCFBlock, Upsample2x, pad_to_multiple, run_stages)
from scsonet.models import create_model


def test_odconv_with_neutral_attention_is_a_plain_convolution():
    torch.manual_seed(0)
    conv = ODConv2d(4, 6, 3).eval()
    att = conv.attention
    for head in (att.channel_fc, att.filter_fc, att.spatial_fc):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.constant_(head.bias, 50.0)  # sigmoid(50) == 1: every attention is neutral
    x = torch.randn(3, 4, 9, 11)
    expected = F.conv2d(x, conv.weight[0], padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-5)


def test_odconv_spatial_attention_scales_kernel_positions():
    torch.manual_seed(0)
    conv = ODConv2d(2, 2, 3).eval()
    att = conv.attention
    for head in (att.channel_fc, att.filter_fc):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.constant_(head.bias, 50.0)
    torch.nn.init.zeros_(att.spatial_fc.weight)
    torch.nn.init.zeros_(att.spatial_fc.bias)  # sigmoid(0) = 0.5 at every kernel position
    x = torch.randn(1, 2, 8, 8)
    assert torch.allclose(conv(x), 0.5 * F.conv2d(x, conv.weight[0], padding=1), atol=1e-5)


@pytest.mark.parametrize("kernel_num", [1, 4])
def test_odconv_shapes_and_heads(kernel_num):
    conv = ODConv2d(8, 16, 3, kernel_num=kernel_num)
    assert conv(torch.randn(2, 8, 16, 16)).shape == (2, 16, 16, 16)
    assert (conv.attention.kernel_fc is not None) == (kernel_num > 1)


def test_sru_soft_gate_equation():
    torch.manual_seed(0)
    sru = SRU(4, group_num=2)
    x = torch.randn(2, 4, 5, 5)
    gamma = sru.gn.weight
    w = torch.sigmoid(sru.gn(x) * (gamma / gamma.sum()).view(1, -1, 1, 1))
    w1 = torch.where(w > 0.5, torch.ones_like(w), w)
    w2 = torch.where(w > 0.5, torch.zeros_like(w), w)
    x1, x2 = w1 * x, w2 * x
    expected = torch.cat([x1[:, :2] + x2[:, 2:], x1[:, 2:] + x2[:, :2]], dim=1)
    assert torch.allclose(sru(x), expected)


def test_sru_rejects_unknown_gate_and_odd_channels():
    with pytest.raises(ValueError, match="gate"):
        SRU(4, gate="fuzzy")
    with pytest.raises(ValueError, match="even"):
        SRU(5)


def test_cru_equation_by_hand():
    """Eq. 7-8 computed step by step, each 1x1 conv as a matrix product and the group-wise conv
    as one convolution per group, in float64 so that only a wrong formula can differ."""
    torch.manual_seed(0)
    cru = CRU(8).double()  # up/low 4 + 4 channels, each squeezed to 2; gwc in 2 groups
    for conv in (cru.gwc, cru.pwc_up, cru.pwc_low, cru.squeeze_up, cru.squeeze_low):
        torch.nn.init.normal_(conv.weight)  # large weights: a wrong split or order shows clearly
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)

    def pointwise(conv, t):
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t)

    up, low = pointwise(cru.squeeze_up, x[:, :4]), pointwise(cru.squeeze_low, x[:, 4:])
    w, bias = cru.gwc.weight, cru.gwc.bias  # group g: squeezed channel g -> output channels 4g..4g+3
    gwc = torch.cat([F.conv2d(up[:, g:g + 1], w[4 * g:4 * g + 4], bias[4 * g:4 * g + 4], padding=1)
                     for g in range(2)], dim=1)
    y1 = gwc + pointwise(cru.pwc_up, up)  # 8 channels
    y2 = torch.cat([pointwise(cru.pwc_low, low), low], dim=1)  # 6 + 2 channels
    pooled = torch.cat([y1, y2], dim=1).mean(dim=(2, 3))  # (B, 16)
    beta = pooled.exp() / pooled.exp().sum(dim=1, keepdim=True)  # softmax over all 16 channels
    expected = beta[:, :8, None, None] * y1 + beta[:, 8:, None, None] * y2
    assert torch.allclose(cru(x), expected, rtol=1e-10, atol=1e-10)


def test_scconv_is_sru_then_cru():
    torch.manual_seed(0)
    scconv = SCConv(8)
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(scconv(x), scconv.cru(scconv.sru(x)))


def test_pconv_passes_the_second_half_through():
    pconv = PConv(8)
    x = torch.randn(2, 8, 7, 7)
    y = pconv(x)
    assert torch.equal(y[:, 4:], x[:, 4:])
    assert torch.allclose(y[:, :4], pconv.conv(x[:, :4]))


def test_ema_keeps_shape_and_gates_input():
    torch.manual_seed(0)
    ema = EMA(16)
    x = torch.rand(2, 16, 8, 12) + 0.1
    y = ema(x)
    assert y.shape == x.shape
    ratio = y / x  # the output is the input times a sigmoid weight in (0, 1)
    assert ((ratio > 0) & (ratio < 1)).all()
    with pytest.raises(ValueError, match="divisible"):
        EMA(12)


def test_bridge_keeps_every_stage_shape():
    channels = [8, 16, 24, 32, 48]
    feats = [torch.randn(2, c, 64 >> i, 64 >> i) for i, c in enumerate(channels)]
    out = SCAttentionBridge(channels)(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]


@pytest.mark.parametrize("decoder", [False, True])
def test_scf_block_changes_channels(decoder):
    block = SCFBlock(24, 32, decoder=decoder)
    assert block(torch.randn(2, 24, 16, 16)).shape == (2, 32, 16, 16)


def test_odconv_takes_its_activation_and_norm_layers():
    conv = ODConv2d(8, 16, 3, act_layer="gelu", norm_layer=partial(nn.GroupNorm, 1))
    assert type(conv.attention.act) is nn.GELU and type(conv.attention.bn) is nn.GroupNorm
    assert conv(torch.randn(2, 8, 12, 12)).shape == (2, 16, 12, 12)


def test_unext_takes_its_norm_and_mlp_activation_layers():
    model = create_model("unext_s", norm_layer=nn.InstanceNorm2d, mlp_act_layer="silu")
    kinds = {type(m) for m in model.modules()}
    assert nn.InstanceNorm2d in kinds and nn.SiLU in kinds and not {nn.BatchNorm2d, nn.GELU} & kinds


@pytest.mark.parametrize("size, padded", [((32, 64), (32, 64)), ((33, 1), (64, 32))])
def test_pad_to_multiple_replicates_the_bottom_and_right_edges(size, padded):
    x = torch.randn(1, 2, *size)
    y = pad_to_multiple(x, 32)
    assert y.shape[-2:] == padded and torch.equal(y[..., :size[0], :size[1]], x)
    assert torch.equal(y[..., -1, :size[1]], x[..., -1, :]) and torch.equal(y[..., :size[0], -1], x[..., :, -1])
    assert (y is x) == (size == padded)


def test_encoder_and_decoder_stages_halve_and_double_the_sides():
    down = EncoderStage(nn.Conv2d(3, 8, 3, padding=1), 8, nn.GELU)
    deepest = EncoderStage(nn.Conv2d(8, 8, 3, padding=1), 8, nn.GELU, downsample=False)
    feats = run_stages([down, deepest], torch.randn(2, 3, 16, 24))
    assert [f.shape for f in feats] == [(2, 8, 8, 12), (2, 8, 8, 12)]
    up = DecoderStage(nn.Conv2d(8, 4, 3, padding=1), 4, nn.GELU)
    skip = torch.randn(2, 4, 16, 24)
    y = up(feats[-1], skip)
    assert y.shape == (2, 4, 16, 24)
    torch.testing.assert_close(y - skip, up(feats[-1]))  # the skip is added after the activation


def test_upsample2x_is_bilinear_with_aligned_corners():
    x = torch.randn(1, 2, 5, 7)
    expected = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
    assert torch.equal(Upsample2x()(x), expected)
    assert torch.equal(Upsample2x()(x)[..., ::9, ::13], x[..., ::4, ::6])  # corners land on corners
