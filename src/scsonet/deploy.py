"""The export twins of the plain models: graphs of the same function that a tracer can take.

The plain models know nothing of export. ``traceable(model)`` is the export-time swap of the
model's own graph: ODConv's batch-grouped convolution becomes a per-sample one and the padding
to a multiple of 32 moves outside the model, so one traced graph serves any batch and size.
The ODConv swap goes by type through ``scsonet._twins.swap_twins``, as the lean layers below do;
the padding is a wrapper around the model (``_PadCrop``).

``reparameterize(model)`` returns a new inference module (``model`` is left untouched) whose every
change is an identity of real numbers, so it computes the same logits: in float64 the two agree
to ~1e-13, in float32 they differ by rounding only (and the SRU gate, tested exactly, flips less
often). ``scsonet export`` exports this twin by default; ONNX Runtime runs it ~1.2x faster than
the model's own graph at batch 1 (``benchmarks/cpu_latency.py``):

- Encoder stages: GroupNorm's per-channel affine map is monotone, so the 2x2 max-pool commutes
  with it (a min-pool where gamma < 0): normalise, pool, then scale and shift a 4x smaller map.
- Bridge: on the large maps the shared 2->1 dilated 7x7 conv runs as a 1 x 7 conv to 7 channels,
  one per kernel row, whose row-shifted slices are summed (ONNX Runtime's conv is slow with one
  output channel); the channel mean is a 1x1 conv, its 1/C in the kernel; t * a + t is
  t * (1 + a); CAB's Conv1d and its per-stage linears are one matrix. The first stage's bridge
  output meets only the 1x1 head, which is linear: it is applied to it without forming it.
- ODConv: BatchNorm folded into the squeeze, the attention heads into one matrix, and all
  attention into the per-sample kernel.
- SRU: sigmoid(v) > t is tested as v > logit(t), w_gamma is folded into the norm, the gates are
  0/1 multipliers, and the cross-add needs one half-size sum.
- CRU: both squeezes in one 1x1 conv, the group conv and its 1x1 partner in one conv, the
  passed-through channels as an identity block.
- EMA: a per-channel norm's output averages to its shift beta, so one of the two softmaxes is a
  constant and its weighted sum of the 3x3 branch one more output channel of that conv; the
  per-channel norm is a single InstanceNormalization; the 1x1 branch needs no transposes.
- Decoder: bilinear upsampling of small maps as two matrix products (faster than ONNX Runtime's
  Resize there, and exact where Resize rounds its sampling positions); padding and cropping are
  skipped when the input needs none.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._twins import retyped, swap_twins
from .layers import CRU, EMA, SRU, BatchNormAnyBatch, EncoderStage, ODConv2d, SCAttentionBridge, Upsample2x
from .layers import pad_to_multiple, run_stages
from .models import SCBridgeUNet

__all__ = ["LeanSCSONet", "TraceableODConv2d", "is_reparameterizable", "reparameterize", "traceable"]


def _buffer(module: nn.Module, name: str, value: Optional[torch.Tensor], like: torch.Tensor) -> None:
    """Register ``value`` (computed in float64) as a buffer in the dtype of ``like``."""
    module.register_buffer(name, None if value is None else value.detach().to(like.dtype).clone())


def _f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().double()


def _frozen_conv(weight: torch.Tensor, bias: Optional[torch.Tensor], like: torch.Tensor, **kwargs) -> nn.Conv2d:
    """An ``nn.Conv2d`` holding ``weight`` and ``bias`` (float64 values, stored in ``like``'s dtype)."""
    out_chs, in_chs, kh, kw = weight.shape
    conv = nn.Conv2d(in_chs * kwargs.get("groups", 1), out_chs, (kh, kw), bias=bias is not None, **kwargs)
    conv.weight = nn.Parameter(weight.to(like.dtype), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.to(like.dtype), requires_grad=False)
    return conv.to(like.device)


@functools.lru_cache(maxsize=None)
def _scripted(fn: Callable) -> Callable:
    return torch.jit.script(fn)


def _traceable(fn: Callable) -> Callable:
    """``fn`` as is, or scripted while tracing: its tests of sizes then survive export as ``If``
    nodes, which ONNX Runtime folds away once a session pins the input size."""
    return _scripted(fn) if torch.jit.is_tracing() else fn


def per_sample_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Convolve each sample of ``x`` with its own kernel ``weight[i]`` (B, Cout, Cin, k, k).

    A batch of one is a plain convolution; larger batches run as im2col + one batched matmul.
    Unlike the grouped convolution of ``ODConv2d.forward`` (``groups=B``), neither freezes the
    batch size when traced, and scripted, the branch survives into ONNX as an ``If`` that ONNX
    Runtime folds away when a session pins the batch to one.
    """
    if x.size(0) == 1:
        return F.conv2d(x, weight[0], None, stride, padding, dilation)
    b, c, h, w = x.shape
    out_chs, k = weight.size(1), weight.size(-1)
    h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = F.pad(x, [padding, padding, padding, padding])
    taps = []  # loops, not a nested comprehension: TorchScript compiles this function
    for i in range(k):
        rows = x[:, :, i * dilation:i * dilation + (h_out - 1) * stride + 1:stride]
        for j in range(k):
            taps.append(rows[..., j * dilation:j * dilation + (w_out - 1) * stride + 1:stride])
    cols = torch.stack(taps, dim=2).reshape(b, c * k * k, h_out * w_out)
    return torch.matmul(weight.reshape(b, out_chs, c * k * k), cols).reshape(b, out_chs, h_out, w_out)


class TraceableODConv2d(ODConv2d):
    """``ODConv2d`` whose per-sample kernels run through ``per_sample_conv``: a traced graph of it
    runs at any batch size (the grouped convolution of ``ODConv2d`` fixes ``groups=B``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        channel, filt, spatial, kernel = self.attention(x)
        weight = spatial * self.weight.unsqueeze(0)  # (B, n, Cout, Cin, k, k)
        if kernel is not None:
            weight = weight * kernel
        weight = weight.sum(dim=1) * filt.unsqueeze(-1) * channel.view(b, 1, self.in_chs, 1, 1)
        return _traceable(per_sample_conv)(x, weight, self.stride, self.padding, self.dilation)


class LeanSRU(nn.Module):
    """``SRU`` re-expressed: gate on v > logit(t), w_gamma folded into the norm's affine map.

    With kept = x where informative else 0 and rest = 0 there else w * x, the soft gate's
    cross-add [x11 + x22, x12 + x21] is kept + [s, s] with s = rest1 + rest2 (the halves of
    rest), bit for bit: wherever one of two summands is 0 the sums are the same. The hard gate:
    [kept1 + rest2, kept2 + rest1] with rest = x where not informative.
    """

    def __init__(self, sru: SRU):
        super().__init__()
        gn, t = sru.gn, sru.gate_threshold
        gamma = _f64(gn.weight)
        w_gamma = gamma / gamma.sum()
        _buffer(self, "scale", gamma * w_gamma, gn.weight)
        _buffer(self, "shift", _f64(gn.bias) * w_gamma, gn.weight)
        self.num_groups, self.eps, self.soft = gn.num_groups, gn.eps, sru.gate == "soft"
        # sigmoid(v) > t  <=>  v > log(t / (1 - t)); sigmoid lies in (0, 1)
        self.cut = -math.inf if t <= 0 else math.inf if t >= 1 else math.log(t / (1 - t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = F.group_norm(x, self.num_groups, self.scale, self.shift, self.eps)
        # 0/1 masks as multipliers (x * 1 = x, x * 0 = 0): ONNX Runtime's Where is ~5x slower
        informative = (v > self.cut).to(x.dtype)
        kept = x * informative
        rest = (torch.sigmoid(v) * x if self.soft else x) * (1 - informative)
        rest1, rest2 = rest.chunk(2, dim=1)
        if self.soft:
            cross = rest1 + rest2
            return kept + torch.cat([cross, cross], dim=1)
        kept1, kept2 = kept.chunk(2, dim=1)
        return torch.cat([kept1 + rest2, kept2 + rest1], dim=1)


class LeanCRU(nn.Module):
    """``CRU`` with both squeezes in one 1x1 conv, the group-wise conv and its 1x1 partner in one
    dense conv (the 1x1 kernel added to the centre tap), and [pwc_low(low), low] as one 1x1 conv
    with an identity block; out = beta1 * y1 + beta2 * y2 with beta = softmax(GAP([y1, y2]))."""

    def __init__(self, cru: CRU):
        super().__init__()
        like = cru.squeeze_up.weight
        up_sq, low_sq = cru.squeeze_up.out_channels, cru.squeeze_low.out_channels
        channels = cru.up_chs + cru.low_chs
        squeeze = torch.zeros(up_sq + low_sq, channels, dtype=torch.float64)
        squeeze[:up_sq, :cru.up_chs] = _f64(cru.squeeze_up.weight)[:, :, 0, 0]
        squeeze[up_sq:, cru.up_chs:] = _f64(cru.squeeze_low.weight)[:, :, 0, 0]
        self.squeeze = _frozen_conv(squeeze[:, :, None, None], None, like)
        gwc = cru.gwc
        k, groups = gwc.kernel_size[0], gwc.groups
        out_per, in_per = gwc.out_channels // groups, up_sq // groups
        rich = torch.zeros(gwc.out_channels, up_sq, k, k, dtype=torch.float64)
        for g in range(groups):
            rich[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] = _f64(gwc.weight)[g * out_per:(g + 1) * out_per]
        rich[:, :, k // 2, k // 2] += _f64(cru.pwc_up.weight)[:, :, 0, 0]
        self.rich = _frozen_conv(rich, _f64(gwc.bias), like, padding=gwc.padding)
        poor = torch.cat([_f64(cru.pwc_low.weight)[:, :, 0, 0], torch.eye(low_sq, dtype=torch.float64)])
        self.poor = _frozen_conv(poor[:, :, None, None], None, like)
        self.split = [up_sq, low_sq]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, low = self.squeeze(x).split(self.split, dim=1)
        y1, y2 = self.rich(up), self.poor(low)
        pooled = torch.cat([F.adaptive_avg_pool2d(y1, 1), F.adaptive_avg_pool2d(y2, 1)], dim=1)
        beta1, beta2 = torch.softmax(pooled, dim=1).chunk(2, dim=1)
        return y1 * beta1 + y2 * beta2


class LeanEMA(nn.Module):
    """``EMA`` re-expressed.

    x1 = GN(u) normalises each channel over H x W, so GAP(x1) is exactly its shift beta and
    q1 = softmax(beta) a constant; q1 @ x2 is then one more output channel of the 3x3 conv
    (kernel sum(q1_c W_c)). The norm (groups = channels) is a plain instance norm, and the 1x1
    conv runs on the H- and W-pooled maps separately (it is per-position), without transposes.
    """

    def __init__(self, ema: EMA):
        super().__init__()
        like = ema.conv3x3.weight
        self.groups, self.eps = ema.groups, ema.gn.eps
        _buffer(self, "norm_weight", _f64(ema.gn.weight), like)
        _buffer(self, "norm_bias", _f64(ema.gn.bias), like)
        self.pool_mix = ema.conv1x1
        q1 = torch.softmax(_f64(ema.gn.bias), dim=0)
        w3, b3 = _f64(ema.conv3x3.weight), _f64(ema.conv3x3.bias)
        weight = torch.cat([w3, (q1.view(-1, 1, 1, 1) * w3).sum(0, keepdim=True)])
        bias = torch.cat([b3, (q1 * b3).sum().view(1)])
        self.conv3x3 = _frozen_conv(weight, bias, like, padding=ema.conv3x3.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        att_h = torch.sigmoid(self.pool_mix(g.mean(dim=3, keepdim=True)))  # (bg, gc, h, 1)
        att_w = torch.sigmoid(self.pool_mix(g.mean(dim=2, keepdim=True)))  # (bg, gc, 1, w)
        # torch.instance_norm, not F.instance_norm: like GroupNorm it accepts 1 x 1 maps (deep stages of small inputs)
        x1 = torch.instance_norm(g * att_h * att_w, self.norm_weight, self.norm_bias, None, None, True, 0.0, self.eps, False)
        x2, q1_x2 = self.conv3x3(g).split([c // self.groups, 1], dim=1)
        q2 = torch.softmax(F.adaptive_avg_pool2d(x2, 1), dim=1)  # (bg, gc, 1, 1)
        weights = q1_x2 + (q2 * x1).sum(dim=1, keepdim=True)
        return (g * torch.sigmoid(weights)).reshape(b, c, h, w)


class LeanODConv(nn.Module):
    """``ODConv2d`` with the attention's BatchNorm folded into its squeeze, the heads (and their
    temperature) in one matrix, and every attention folded into the per-sample kernel."""

    def __init__(self, od: ODConv2d):
        super().__init__()
        att, like = od.attention, od.weight
        bn = att.bn
        bn_scale = _f64(bn.weight) / torch.sqrt(_f64(bn.running_var) + bn.eps)
        _buffer(self, "squeeze_weight", _f64(att.fc.weight)[:, :, 0, 0] * bn_scale[:, None], like)
        _buffer(self, "squeeze_bias", _f64(bn.bias) - _f64(bn.running_mean) * bn_scale, like)
        heads = [att.channel_fc, att.filter_fc, att.spatial_fc] + ([att.kernel_fc] if att.kernel_fc is not None else [])
        _buffer(self, "head_weight", torch.cat([_f64(h.weight)[:, :, 0, 0] for h in heads]) / att.temperature, like)
        _buffer(self, "head_bias", torch.cat([_f64(h.bias) for h in heads]) / att.temperature, like)
        self.act = att.act
        self.weight = nn.Parameter(like.detach().clone(), requires_grad=False)
        self.sizes = [h.out_channels for h in heads]
        self.in_chs, self.out_chs, self.kernel_size = od.in_chs, od.out_chs, od.kernel_size
        self.stride, self.padding, self.dilation = od.stride, od.padding, od.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k = x.shape[0], self.kernel_size
        z = self.act(F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), self.squeeze_weight, self.squeeze_bias))
        heads = F.linear(z, self.head_weight, self.head_bias)
        n_sig = self.in_chs + self.out_chs + k * k
        channel, filt, spatial = torch.sigmoid(heads[:, :n_sig]).split(self.sizes[:3], dim=1)
        weight = spatial.view(b, 1, 1, 1, k, k) * self.weight  # (B, n, Cout, Cin, k, k)
        if len(self.sizes) == 4:
            weight = weight * torch.softmax(heads[:, n_sig:], dim=1).view(b, -1, 1, 1, 1, 1)
        weight = weight.sum(dim=1) * filt.view(b, self.out_chs, 1, 1, 1) * channel.view(b, 1, self.in_chs, 1, 1)
        # a plain conv at batch 1, also in the exported graph
        return _traceable(per_sample_conv)(x, weight, self.stride, self.padding, self.dilation)


class PoolFirstStage(nn.Module):
    """An encoder stage block -> GroupNorm -> max-pool 2 -> act, pooling before the norm's affine.

    y = gamma_c * n + beta_c with n the group-normalised map is monotone in n, so max-pooling y
    is gamma_c * maxpool(n) + beta_c (with max(-n) where gamma_c < 0): exact in floating point
    too, as rounding is monotone.
    """

    def __init__(self, block: nn.Module, norm: nn.GroupNorm, act: nn.Module):
        super().__init__()
        self.block, self.act = block, act
        self.num_groups, self.eps = norm.num_groups, norm.eps
        like = next(block.parameters(), next(block.buffers(), None))
        channels = norm.num_channels
        gamma = _f64(norm.weight) if norm.affine else torch.ones(channels, dtype=torch.float64)
        beta = _f64(norm.bias) if norm.affine else torch.zeros(channels, dtype=torch.float64)
        sign = torch.where(gamma < 0, -1.0, 1.0).double()
        _buffer(self, "flip", sign.view(1, -1, 1, 1) if (sign < 0).any() else None, like)
        _buffer(self, "scale", (gamma * sign).view(1, -1, 1, 1), like)
        _buffer(self, "shift", beta.view(1, -1, 1, 1), like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = F.group_norm(self.block(x), self.num_groups, eps=self.eps)
        if self.flip is not None:
            n = n * self.flip
        return self.act(F.max_pool2d(n, 2) * self.scale + self.shift)


def _pool_first(stage: EncoderStage) -> Optional[PoolFirstStage]:
    """The ``PoolFirstStage`` of a downsampling encoder stage, else None."""
    pool = stage.pool
    if not (type(stage.norm) is nn.GroupNorm and type(pool) is nn.MaxPool2d and pool.kernel_size in (2, (2, 2))
            and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0)) and pool.dilation in (1, (1, 1))
            and not pool.ceil_mode and not pool.return_indices):
        return None
    return PoolFirstStage(_lean_block(stage.block), stage.norm, stage.act)


class _Sum(torch.autograd.Function):
    """The sum of same-shape tensors, exported as one variadic ONNX ``Sum`` (not a chain of ``Add``)."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        total = tensors[0]
        for t in tensors[1:]:
            total = total + t
        return total

    @staticmethod
    def symbolic(g, *tensors):
        return g.op("Sum", *tensors)


class LeanBridge(nn.Module):
    """``SCAttentionBridge`` re-expressed (see the module docstring); same inputs and outputs.

    On the ``row_split_levels`` largest maps the SAB conv (k x k, dilation d, 2 -> 1) runs as a
    1 x k conv to k channels, one per kernel row, over the map padded by the conv's padding on
    all sides; stacked along the height, row i's contribution is the slice starting d * i rows
    into its channel, and the attention logits are the sum of these k slices.
    """

    def __init__(self, bridge: SCAttentionBridge, channels: Sequence[int], row_split_levels: int = 3):
        super().__init__()
        conv, like = bridge.sab.conv, bridge.sab.conv.weight
        k, d = conv.kernel_size[0], conv.dilation[0]
        self.rows, self.dilation, self.pad, self.row_split_levels = k, d, conv.padding[0], row_split_levels
        self.residual = bridge.cab_residual
        w = _f64(conv.weight)  # (1, 2, k, k): over [mean, max]
        for i, c in enumerate(channels):  # the mean's 1/C goes into the kernel: the input holds the sum
            kernel = torch.cat([w[:, :1] / c, w[:, 1:]], dim=1)
            _buffer(self, f"kernel{i}", kernel.permute(2, 1, 0, 3) if i < row_split_levels else kernel, like)
        _buffer(self, "sab_bias", _f64(conv.bias), like)
        # the row-split conv adds the bias once, with its first row
        _buffer(self, "row_bias", torch.cat([_f64(conv.bias), torch.zeros(k - 1, dtype=torch.float64)]), like)
        mix, fcs = bridge.cab.mix, bridge.cab.fcs
        total, taps = sum(channels), mix.kernel_size[0]
        band = torch.zeros(total, total, dtype=torch.float64)  # the Conv1d over the pooled vector as a matrix
        for t in range(taps):
            offset = t - taps // 2
            band += torch.diag(torch.full((total - abs(offset),), float(_f64(mix.weight)[0, 0, t])), offset)
        _buffer(self, "cab_weight", torch.cat([_f64(fc.weight) for fc in fcs]) @ band, like)
        _buffer(self, "cab_bias", torch.cat([_f64(fc.bias) for fc in fcs]), like)
        self.channels = list(channels)

    def spatial_attention(self, t: torch.Tensor, level: int) -> torch.Tensor:
        (b, _, h, w), c = t.shape, self.channels[level]  # c static: it sizes the max-pool window
        total = F.conv2d(t, t.new_ones(1, c, 1, 1))
        peak = F.max_pool3d(t.unsqueeze(1), (c, 1, 1)).reshape(b, 1, h, w)  # ONNX Runtime: faster than ReduceMax
        desc, kernel = torch.cat([total, peak], dim=1), getattr(self, f"kernel{level}")
        if level >= self.row_split_levels:
            return torch.sigmoid(F.conv2d(desc, kernel, self.sab_bias, padding=self.pad, dilation=self.dilation))
        rows = F.conv2d(desc, kernel, self.row_bias, padding=self.pad, dilation=(1, self.dilation))  # (B, k, H + 2 pad, W)
        stride = h + 2 * self.pad + self.dilation  # from one kernel row's slice to the next, once stacked
        rows = rows.reshape(b, 1, -1, w)
        logits = _Sum.apply(*[rows[:, :, i * stride:i * stride + h] for i in range(self.rows)])
        return torch.sigmoid(logits)

    def attend(self, feats: Sequence[torch.Tensor], lazy_first: bool = False):
        """Per stage the spatial attention a, s = t * (1 + a) and CAB's gains (B, C, 1, 1).

        With ``lazy_first`` the first stage's s is not formed (None): its channel means come from a
        matrix product of t with 1 + a, for a consumer that needs s only under a linear map
        (see ``project``).
        """
        attention = [self.spatial_attention(t, i) for i, t in enumerate(feats)]
        spatial = [None if lazy_first and i == 0 else t * (1 + a) for i, (t, a) in enumerate(zip(feats, attention))]
        pooled = []
        for t, a, s in zip(feats, attention, spatial):
            if s is None:
                h, w = t.shape[-2:]
                pooled.append(torch.matmul(t.flatten(2), (1 + a).flatten(1).unsqueeze(2)).flatten(1) / (h * w))
            else:
                pooled.append(F.adaptive_avg_pool2d(s, 1).flatten(1))
        gains = torch.sigmoid(F.linear(torch.cat(pooled, dim=1), self.cab_weight, self.cab_bias))
        return attention, spatial, [g[:, :, None, None] for g in gains.split(self.channels, dim=1)]

    def merge(self, t: torch.Tensor, a: torch.Tensor, s: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """A stage's bridge output: CAB's s * gain plus its residual, s or t * a."""
        return s * (1 + gain) if self.residual == "sab" else s * gain + t * a

    def project(self, t: torch.Tensor, a: torch.Tensor, gain: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (K, C) applied over the channels of a stage's bridge output, without forming
        it: (1 + a) * ((weight * (1 + gain)) @ t) for the 'sab' residual, as a is per pixel and
        the gain per channel; (1 + a) * ((weight * gain) @ t) + a * (weight @ t) for 'attended'."""
        b, _, h, w = t.shape
        flat = t.flatten(2)

        def mix(scale: Optional[torch.Tensor]) -> torch.Tensor:
            mixing = weight if scale is None else weight * scale.flatten(1).unsqueeze(1)  # (B, K, C)
            return torch.matmul(mixing, flat).reshape(b, -1, h, w)

        if self.residual == "sab":
            return (1 + a) * mix(1 + gain)
        return (1 + a) * mix(gain) + a * mix(None)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        attention, spatial, gains = self.attend(feats)
        return [self.merge(*args) for args in zip(feats, attention, spatial, gains)]


def _lean_odconv(od: ODConv2d) -> nn.Module:
    """``LeanODConv`` where the attention's norm is a BatchNorm to fold, else the traceable ODConv."""
    if type(od.attention.bn) in (nn.BatchNorm2d, BatchNormAnyBatch):
        return LeanODConv(od)
    return retyped(od, TraceableODConv2d)


def _matmul_upsample(upsample: Upsample2x) -> nn.Module:
    return MatmulUpsample2x()


_LEAN_LAYERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    SRU: LeanSRU, CRU: LeanCRU, EMA: LeanEMA, ODConv2d: _lean_odconv, Upsample2x: _matmul_upsample,
}


def _lean_twin(module: nn.Module) -> Optional[nn.Module]:
    lean = _LEAN_LAYERS.get(type(module))
    return None if lean is None else lean(module)


def _lean_block(module: nn.Module) -> nn.Module:
    """``module``, or its lean twin, with its known layers swapped for their lean twins (in place)."""
    return _lean_twin(module) or swap_twins(module, _lean_twin)


def _interpolation_matrix(n: int, like: torch.Tensor) -> torch.Tensor:
    """(2n, n) weights of bilinear x2 upsampling with aligned corners along an axis of length n,
    as ``upsample_bilinear2d`` computes them (in float64, then cast to ``like``'s dtype)."""
    src = torch.arange(2 * n, dtype=torch.float64, device=like.device) * ((n - 1) / max(2 * n - 1, 1))
    lo = torch.floor(src)
    frac = src - lo
    cols = torch.arange(n, dtype=torch.float64, device=like.device)
    hi = torch.clamp(lo + 1, max=n - 1)
    weights = (cols == lo.unsqueeze(1)).double() * (1 - frac).unsqueeze(1) + (cols == hi.unsqueeze(1)).double() * frac.unsqueeze(1)
    return weights.to(like.dtype)


def _upsample2x(x: torch.Tensor, max_matmul_side: int) -> torch.Tensor:
    """Bilinear x2 upsampling with aligned corners; on maps up to ``max_matmul_side`` a side, as two
    matrix products with the interpolation matrices (faster than ONNX Runtime's Resize there, and
    closer to the exact result: Resize rounds its sampling positions to float32)."""
    h, w = x.size(2), x.size(3)
    if h > max_matmul_side or w > max_matmul_side:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
    return torch.matmul(_interpolation_matrix(h, x), torch.matmul(x, _interpolation_matrix(w, x).t()))


class MatmulUpsample2x(nn.Module):
    """``Upsample2x`` upsampling small maps by matrix products (``_upsample2x``)."""

    max_matmul_side = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _traceable(_upsample2x)(x, self.max_matmul_side)


def _crop_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` cropped to the height and width of ``like``; no op when they match."""
    if x.size(2) == like.size(2) and x.size(3) == like.size(3):
        return x
    return x[:, :, :like.size(2), :like.size(3)]


class LeanSCSONet(nn.Module):
    """The output of ``reparameterize`` for an ``SCSONet`` or ``MALUNet``: same forward signature and logits."""

    def __init__(self, model: SCBridgeUNet):
        super().__init__()
        model = copy.deepcopy(model).eval()
        self.num_classes, self.in_chans, self.pad_multiple = model.num_classes, model.in_chans, model.pad_multiple
        stages = []
        for stage in model.encoder:
            lean = _pool_first(stage) if type(stage) is EncoderStage else None
            stages.append(lean if lean is not None else _lean_block(stage))
        self.encoder = nn.ModuleList(stages)
        self.bridge = LeanBridge(model.bridge, model.embed_dims[:len(model.encoder) - 1])
        self.decoder = nn.ModuleList(_lean_block(s) for s in model.decoder)
        self.segmentation_head = _lean_block(model.segmentation_head)
        self.head_upsample = model.head_upsample  # full-size maps: Resize is the faster there
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # An empty view that keeps the input's size: traced, an input that needs no padding is the
        # very tensor the pad returns, and its later uses would refer to the pad's output.
        size = x[:, :0]
        x = _traceable(pad_to_multiple)(x, self.pad_multiple)
        feats = run_stages(self.encoder, x)
        attention, spatial, gains = self.bridge.attend(feats[:-1], lazy_first=True)
        x = feats[-1]
        for level, stage in zip(range(len(self.decoder) - 1, 0, -1), self.decoder[:-1]):
            x = stage(x, self.bridge.merge(feats[level], attention[level], spatial[level], gains[level]))
        # The last stage's skip only meets the 1x1 head, which is linear: head(act(u) + skip) =
        # head(act(u)) + weight @ skip, and weight @ skip is formed without forming the skip.
        head = self.segmentation_head
        x = head(self.decoder[-1](x)) + self.bridge.project(feats[0], attention[0], gains[0], head.weight[:, :, 0, 0])
        return _traceable(_crop_to)(self.head_upsample(x), size)


def is_reparameterizable(model: nn.Module) -> bool:
    """Whether ``reparameterize`` re-expresses ``model`` (the ``SCBridgeUNet`` models: SCSONet, MALUNet)."""
    return isinstance(model, SCBridgeUNet)


def reparameterize(model: nn.Module) -> nn.Module:
    """A leaner inference twin of ``model`` with the same logits; ``model`` itself is not changed.

    For SCSONet and MALUNet (``SCBridgeUNet``) the result is a ``LeanSCSONet`` in eval
    mode without gradients, its constants derived in float64 and stored in the model's dtype:
    convert ``model`` (e.g. ``.double()``) before, not after. Other models come back as an
    unchanged eval-mode copy. The ODConv attention's BatchNorm is folded with its running
    statistics, as in eval mode.
    """
    if is_reparameterizable(model):
        return LeanSCSONet(model)
    return copy.deepcopy(model).eval()


def _traceable_twin(module: nn.Module) -> Optional[nn.Module]:
    return retyped(module, TraceableODConv2d) if type(module) is ODConv2d else None


class _PadCrop(nn.Module):
    """``model`` between a pad to its ``pad_multiple`` and a crop back, both sized in the graph.

    Traced, the model's own padding is a Python branch on the example input's size; behind this
    pad it always sees multiples of ``pad_multiple``, where that branch is right for any size.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.pad_multiple = model, model.pad_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x[:, :0]  # as in LeanSCSONet.forward
        return _traceable(_crop_to)(self.model(_traceable(pad_to_multiple)(x, self.pad_multiple)), size)


def traceable(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` that ``torch.jit.trace`` (and so the ONNX exporter) turns into a
    graph for any batch, height and width, with the same logits; ``model`` is not changed.

    The export-time swap of the plain graph: ODConv's grouped convolution (its ``groups`` is the
    batch size) becomes ``TraceableODConv2d``, and the input is padded and the logits cropped
    outside the model (``_PadCrop``). ``reparameterize`` does both itself.
    """
    model = swap_twins(copy.deepcopy(model).eval(), _traceable_twin)
    return _PadCrop(model) if hasattr(model, "pad_multiple") else model
