"""Exact CPU re-expressions of slow training ops: same outputs and gradients, fewer milliseconds.

On the CPU this network's thin layers hit slow kernels: oneDNN's input gradient for convolutions
with a few output channels (the bridge's 2->1 dilated 7x7 conv) costs 10x its forward pass, tiny
1x1 convolutions pay oneDNN's fixed cost per call, a 3-channel image conv is slow channels-first,
``max_pool2d`` over a channels-first map is 15x slower than an element-wise maximum, and the
bilinear upsampling's backward scatters one pixel at a time. The modules here compute the same
functions by faster routes (equal up to float rounding, gradients included; SRU and the
max-pools exactly) and run the plain ops whenever no gradient is recorded (evaluation, export):

- ``FastConv2d``: 1x1 convs as GEMMs, convs with one or two output channels by the native
  direct loops of ``scsonet/_native`` (when a C compiler is there), other thin convs' input
  gradient as a flipped forward conv;
- ``FastMaxPool2d`` and ``PhaseConvNormPool`` (conv, GroupNorm, max-pool in a 2x2-phase layout);
- ``FastUpsample2x``: bilinear x2 with aligned corners from shifted slices, both ways;
- ``FastODConv2d``, ``FastSRU``, ``FastSpatialAttentionBridge``, ``FastSCAttentionBridge`` (with
  ``_SpatialGate``): the same algebra regrouped into fewer or cheaper passes.

Max-pool gradients follow ``max_pool2d``: all of a window's gradient goes to its first maximum in
scan order. Ties are common (flat image regions give equal activations), so they are resolved
exactly, not assumed away. ``scsonet.fast.prepare_for_training`` applies all of this to a model.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .._native import native
from ..layers import SRU, ODConv2d, SCAttentionBridge, SpatialAttentionBridge, Upsample2x

__all__ = [
    "FastConv2d", "FastMaxPool2d", "FastODConv2d", "FastSCAttentionBridge", "FastSpatialAttentionBridge", "FastSRU",
    "FastUpsample2x", "PhaseConvNormPool",
]


def _keep_first_hit(hits: list[torch.Tensor]) -> None:
    """Zero, in place, every 0/1 hit after the first along ``hits`` (same-shape float masks)."""
    free = 1 - hits[0]
    for i, hit in enumerate(hits[1:], start=1):
        hit.mul_(free)
        if i < len(hits) - 1:
            free.sub_(hit)


def _max_pool_grad_via_aten(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """``max_pool2d``'s own gradient: the reference, used where NaNs make equality tests fail."""
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        return torch.autograd.grad(F.max_pool2d(x, 2), x, grad_y)[0]


class _Conv2dFastGrad(torch.autograd.Function):
    """Stride-1, ungrouped conv2d whose input gradient is a forward conv with flipped kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding: tuple[int, int], dilation: tuple[int, int]):
        ctx.save_for_backward(x, weight)
        ctx.conv_args = padding, dilation, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        padding, dilation, has_bias = ctx.conv_args
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # d(conv)/dx is the correlation of grad_y with the flipped, transposed kernel
            k_h, k_w = weight.shape[-2:]
            pad_t = (dilation[0] * (k_h - 1) - padding[0], dilation[1] * (k_w - 1) - padding[1])
            grad_x = F.conv2d(grad_y, weight.flip(2, 3).transpose(0, 1), None, 1, pad_t, dilation)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_y, x, weight, [weight.shape[0]] if has_bias else None,
                [1, 1], list(padding), list(dilation), False, [0, 0], 1, [False, True, has_bias],
            )
        return grad_x, grad_w, grad_b, None, None


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(status: int, kernel: str) -> None:
    if status != 0:
        raise MemoryError(f"{kernel}: out of memory")


class _DirectConv2d(torch.autograd.Function):
    """Stride-1, ungrouped conv2d of contiguous float32 CPU tensors by the loops of
    ``scsonet/_native/direct_conv.c`` (vectorised along rows: fast for one or two output channels)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding: tuple[int, int], dilation: tuple[int, int], lib):
        weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
        n, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        dims = (n, c, h, w, o, kh, kw, *padding, *dilation)
        y = x.new_empty(n, o, h + 2 * padding[0] - dilation[0] * (kh - 1), w + 2 * padding[1] - dilation[1] * (kw - 1))
        _check(lib.direct_conv_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), *dims), "direct_conv_forward")
        ctx.save_for_backward(x, weight)
        ctx.dims, ctx.lib, ctx.has_bias = dims, lib, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            _check(ctx.lib.direct_conv_grad_input(_ptr(grad_y), _ptr(weight), _ptr(grad_x), *ctx.dims),
                   "direct_conv_grad_input")
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            _check(ctx.lib.direct_conv_grad_weight(_ptr(grad_y), _ptr(x), _ptr(grad_w), *ctx.dims),
                   "direct_conv_grad_weight")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` (stride 1, no groups, zero padding) on the faster CPU routes, same numbers.

    1x1 kernels run as GEMMs; a conv with one or two output channels (and few inputs) runs the
    native direct loops when they could be built; another conv with few output channels on a
    large map takes its input gradient as a forward conv with flipped kernels; anything else
    runs plainly. Same parameters and state-dict keys as the ``nn.Conv2d`` it replaces.
    """

    # below these, oneDNN's own backward is as fast (measured on 2 cores, batch 8)
    thin_out_channels = 8
    thin_min_pixels = 32 * 32
    # at most these channels, the native direct loops beat both routes at any size (1 thread)
    direct_max_out_channels = 2
    direct_max_in_channels = 4

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not torch.is_grad_enabled() or input.dim() != 4:
            return super()._conv_forward(input, weight, bias)
        if self.kernel_size == (1, 1) and self.padding == (0, 0):
            # im2col+GEMM kernels (for 1x1 a plain GEMM), with their own autograd formula. Their weight
            # gradient is wrong for a channels-last-strided input (torch 2.13): hence contiguous().
            return torch.ops.aten._slow_conv2d_forward(input.contiguous(), weight, [1, 1], bias, [1, 1], [0, 0])
        if (self.out_channels <= self.direct_max_out_channels and self.in_channels <= self.direct_max_in_channels
                and input.dtype == torch.float32 and input.device.type == "cpu" and (lib := native()) is not None):
            return _DirectConv2d.apply(input.contiguous(), weight, bias, self.padding, self.dilation, lib)
        h, w = input.shape[-2:]
        if self.out_channels < self.thin_out_channels and h * w >= self.thin_min_pixels:
            return _Conv2dFastGrad.apply(input.contiguous(), weight, bias, self.padding, self.dilation)
        return super()._conv_forward(input, weight, bias)

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        """Whether ``conv`` is a plain ``nn.Conv2d`` that ``FastConv2d`` re-expresses exactly."""
        return (
            type(conv) is nn.Conv2d and conv.stride == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and all(d * (k - 1) >= p for d, k, p in zip(conv.dilation, conv.kernel_size, conv.padding))
        )


def _repeat_columns(t: torch.Tensor) -> torch.Tensor:
    """Each column twice: (B, C, h, w) -> (B, C, h, 2w)."""
    b, c, h, w = t.shape
    if w >= 64:  # nearest interpolation is the faster kernel on wide maps, the slower on narrow ones
        return F.interpolate(t, size=(h, 2 * w), mode="nearest")
    return t.unsqueeze(-1).expand(b, c, h, w, 2).reshape(b, c, h, 2 * w)


class _MaxPool2x2(torch.autograd.Function):
    """2x2 max-pool, stride 2, of a channels-first map.

    Everything runs on row-strided views with contiguous rows, the pattern the CPU kernels
    vectorise, and the masks are float, because ``torch.where`` and bool arithmetic are not
    vectorised (20x slower than a float multiply here).
    """

    @staticmethod
    def forward(ctx, x):
        rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
        y = torch.maximum(rows[..., 0::2], rows[..., 1::2])
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, y = ctx.saved_tensors
        if not torch.isfinite(y.sum()):
            return _max_pool_grad_via_aten(x, grad_y)
        b, c, h, w = y.shape
        size = (h, 2 * w)  # one row of each window, columns at full resolution
        y_wide = _repeat_columns(y)
        hits = torch.empty((2, b, c) + size, dtype=x.dtype, device=x.device)
        for i in (0, 1):
            torch.eq(x[:, :, i::2], y_wide, out=hits[i])
        _keep_first_hit([hits[i][..., j::2] for i in (0, 1) for j in (0, 1)])  # scan order
        grad_wide = _repeat_columns(grad_y)
        grad_x = torch.empty_like(x)
        for i in (0, 1):
            torch.mul(grad_wide, hits[i], out=grad_x[:, :, i::2])
        return grad_x


class FastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` from element-wise maxima; odd sides or no autograd run plainly."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[-2] % 2 or input.shape[-1] % 2 or not torch.is_grad_enabled():
            return super().forward(input)
        return _MaxPool2x2.apply(input.contiguous())

    @staticmethod
    def supports(pool: nn.Module) -> bool:
        """Whether ``pool`` is a plain 2x2, stride-2 max-pool."""
        return (
            type(pool) is nn.MaxPool2d and _pair(pool.kernel_size) == (2, 2) and _pair(pool.stride) == (2, 2)
            and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices
        )


class _PhaseMax(torch.autograd.Function):
    """Maximum over the 4 phases of (B, C, 4, h, w), phases in 2x2 scan order: a 2x2 max-pool."""

    @staticmethod
    def forward(ctx, z):
        y = torch.maximum(torch.maximum(z[:, :, 0], z[:, :, 1]), torch.maximum(z[:, :, 2], z[:, :, 3]))
        ctx.save_for_backward(z, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, y = ctx.saved_tensors
        if not torch.isfinite(y.sum()):
            b, c, _, h, w = z.shape
            full = F.pixel_shuffle(z.reshape(b, 4 * c, h, w), 2)
            return F.pixel_unshuffle(_max_pool_grad_via_aten(full, grad_y), 2).view_as(z)
        hits = torch.eq(z, y.unsqueeze(2), out=torch.empty_like(z))
        _keep_first_hit(list(hits.unbind(2)))
        return hits.mul_(grad_y.unsqueeze(2))


def _phase_kernel_index(conv: nn.Conv2d) -> torch.Tensor:
    """Index into ``[*conv.weight.flatten(), 0]`` that builds the phase kernel of ``conv``.

    A k x k "same" conv followed by a 2x2 split equals one stride-2 conv with (k+1) x (k+1)
    kernels and 4x the output channels: output channel ``4*o + 2*i + j`` holds the outputs at
    rows 2p+i, columns 2q+j, whose kernel is the original one shifted by (i, j).
    """
    out_chs, in_chs, k, _ = conv.weight.shape
    zero = conv.weight.numel()
    index = torch.full((out_chs, 4, in_chs, k + 1, k + 1), zero, dtype=torch.long)
    flat = torch.arange(zero).view(out_chs, in_chs, k, k)
    for i in (0, 1):
        for j in (0, 1):
            index[:, 2 * i + j, :, i:i + k, j:j + k] = flat
    return index.view(4 * out_chs, in_chs, k + 1, k + 1)


class PhaseConvNormPool(nn.Module):
    """act(max-pool 2(GroupNorm(conv k x k(x)))) without building the full-resolution map's layout.

    The convolution runs as one stride-2 conv that writes the four 2x2 phases as separate
    channels (see ``_phase_kernel_index``); GroupNorm's groups and the max-pool's windows are
    then contiguous, so norm and pool are plain vectorised passes. Same submodules, parameters
    and state-dict keys as the stage it replaces (``block``, ``norm``, ``pool``, ``act``).

    Args:
        block: ``nn.Conv2d`` with odd k, stride 1, padding k // 2, no dilation or groups.
        norm: ``nn.GroupNorm`` over ``block.out_channels``.
        pool: the stage's ``nn.MaxPool2d(2)`` (kept for the plain path).
        act: activation module.

    Shape:
        (B, C_in, H, W) -> (B, C_out, H/2, W/2); odd H or W run the plain stage.
    """

    def __init__(self, block: nn.Conv2d, norm: nn.GroupNorm, pool: nn.Module, act: nn.Module):
        super().__init__()
        self.block, self.norm, self.pool, self.act = block, norm, pool, act
        self.register_buffer("phase_index", _phase_kernel_index(block), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if not torch.is_grad_enabled() or h % 2 or w % 2:
            return self.act(self.pool(self.norm(self.block(x))))
        weight = self.block.weight
        kernel = torch.cat([weight.flatten(), weight.new_zeros(1)])[self.phase_index]
        bias = None if self.block.bias is None else self.block.bias.repeat_interleave(4)
        z = F.conv2d(x, kernel, bias, stride=2, padding=self.block.padding)
        b, c4, h2, w2 = z.shape
        z = z.view(b, c4 // 4, 4, h2, w2)  # (B, C, phase, h, w): a channel's phases are its map
        z = F.group_norm(z, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
        return self.act(_PhaseMax.apply(z))

    @staticmethod
    def supports(block: nn.Module, norm: nn.Module, pool: nn.Module) -> bool:
        """Whether a block -> norm -> pool stage can run in the phase layout."""
        return (
            FastConv2d.supports(block) and block.kernel_size[0] == block.kernel_size[1]
            and block.kernel_size[0] % 2 == 1 and block.padding == (block.kernel_size[0] // 2,) * 2
            and block.dilation == (1, 1)
            and type(norm) is nn.GroupNorm and norm.num_channels == block.out_channels
            and FastMaxPool2d.supports(pool)
        )


def _float_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(x > threshold) as 0/1 floats, without a bool tensor (bool arithmetic is not vectorised)."""
    return torch.gt(x.detach(), threshold, out=torch.empty_like(x, requires_grad=False))


class FastSRU(SRU):
    """``SRU`` whose soft gate is arithmetic on a 0/1 mask instead of two ``torch.where``.

    With m = [w > threshold]: W2 * x = (1 - m) * w * x and W1 * x = W2 * x + m * x, which are
    exactly the gated values of the SCConv paper, gradients included. The hard gate runs plainly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate != "soft":
            return super().forward(x)
        gamma = self.gn.weight
        w = torch.sigmoid(self.gn(x) * (gamma / gamma.sum()).view(1, -1, 1, 1))
        informative = _float_mask(w, self.gate_threshold)
        x2 = (w * x).mul_(1 - informative)
        x1 = x2 + informative * x
        x11, x12 = x1.chunk(2, dim=1)
        x21, x22 = x2.chunk(2, dim=1)
        return torch.cat([x11 + x22, x12 + x21], dim=1)


class _ChannelMax(torch.autograd.Function):
    """``amax`` over dim 1 (keepdim) with ``amax``'s gradient (shared evenly among ties), float masks."""

    @staticmethod
    def forward(ctx, x):
        y = x.amax(dim=1, keepdim=True)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, y = ctx.saved_tensors
        hits = torch.eq(x, y, out=torch.empty_like(x))
        return hits.mul_(grad_y / hits.sum(dim=1, keepdim=True))


class FastSpatialAttentionBridge(SpatialAttentionBridge):
    """``SpatialAttentionBridge`` whose channel maximum takes its gradient through float masks."""

    def attention(self, t: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().attention(t)
        desc = torch.cat([t.mean(dim=1, keepdim=True), _ChannelMax.apply(t)], dim=1)
        return torch.sigmoid(self.conv(desc))


class _SpatialGate(torch.autograd.Function):
    """t * (1 + a) with a = sigmoid(conv([mean_C(t), amax_C(t)])): SAB with its residual.

    Autograd would take t's gradient in three parts (through the product, the mean and the
    maximum) and add them up, six passes over t; here it is two fused multiply-adds, after the
    two that the attention map's own gradient needs. The small conv and sigmoid keep their
    autograd graph, run inside; amax's gradient is shared evenly among ties, as autograd's.
    """

    @staticmethod
    def forward(ctx, t, weight, bias, conv: nn.Conv2d):
        top = t.amax(dim=1, keepdim=True)
        with torch.enable_grad():
            desc = torch.cat([t.mean(dim=1, keepdim=True), top], dim=1).requires_grad_()
            leaves = [desc] + [p.detach().requires_grad_() for p in (weight, bias) if p is not None]
            attention = torch.sigmoid(conv._conv_forward(desc, *leaves[1:], *([None] if bias is None else [])))
        ctx.save_for_backward(t, top)
        ctx.inner = leaves, attention
        return t * (1 + attention.detach())

    @staticmethod
    def backward(ctx, grad_s):
        t, top = ctx.saved_tensors
        leaves, attention = ctx.inner
        grad_attention = (grad_s * t).sum(dim=1, keepdim=True)
        grad_desc, grad_weight, *grad_bias = torch.autograd.grad(attention, leaves, grad_attention)
        grad_mean, grad_top = grad_desc.split(1, dim=1)
        hits = torch.eq(t, top, out=torch.empty_like(t))
        grad_t = torch.addcmul(grad_mean / t.shape[1], grad_s, 1 + attention.detach())
        grad_t.addcmul_(hits, grad_top / hits.sum(dim=1, keepdim=True))
        return grad_t, grad_weight, grad_bias[0] if grad_bias else None, None


class FastSCAttentionBridge(SCAttentionBridge):
    """``SCAttentionBridge`` with the residual algebra regrouped (``cab_residual='sab'``).

    s_i = t_i * a_i + t_i = t_i * (1 + a_i) and out_i = s_i * c_i + s_i = s_i * (1 + c_i): one
    multiply instead of a multiply and an add, each way, over every bridged map.
    """

    def forward(self, feats):
        if self.cab_residual != "sab" or not torch.is_grad_enabled():
            return super().forward(feats)
        conv = self.sab.conv
        spatial = [_SpatialGate.apply(t.contiguous(), conv.weight, conv.bias, conv) for t in feats]
        pooled = torch.cat([F.adaptive_avg_pool2d(s, 1).flatten(1) for s in spatial], dim=1)
        mixed = self.cab.mix(pooled.unsqueeze(1)).squeeze(1)
        return [s * (1 + torch.sigmoid(fc(mixed))[:, :, None, None]) for s, fc in zip(spatial, self.cab.fcs)]


def _lerp_weights(n: int, dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of x2 linear upsampling with aligned corners, shaped to broadcast along ``dim``.

    Output 2k lies at k - a_k and output 2k+1 at k + b_k (input units), a_k = k / (2n-1),
    b_k = (n-1-k) / (2n-1): out[2k] = x[k] - a_k (x[k] - x[k-1]), out[2k+1] = x[k] + b_k (x[k+1] - x[k]).
    """
    k = torch.arange(n, dtype=torch.float64)
    shape = [1] * like.dim()
    shape[dim] = n
    a, b = k / (2 * n - 1), (n - 1 - k) / (2 * n - 1)
    return a.to(like.dtype).view(shape), b.to(like.dtype).view(shape)


def _upsample_dim(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x2 linear upsampling with aligned corners along ``dim``, from shifted slices (vectorised)."""
    n = x.shape[dim]
    a, b = _lerp_weights(n, dim, x)
    step = x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1)  # x[k+1] - x[k]
    out = x.new_empty(x.shape[:dim] + (2 * n,) + x.shape[dim + 1:])
    even, odd = out.unflatten(dim, (n, 2)).unbind(dim + 1)
    even.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    torch.addcmul(x.narrow(dim, 1, n - 1), step, a.narrow(dim, 1, n - 1), value=-1, out=even.narrow(dim, 1, n - 1))
    torch.addcmul(x.narrow(dim, 0, n - 1), step, b.narrow(dim, 0, n - 1), out=odd.narrow(dim, 0, n - 1))
    odd.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))
    return out


def _upsample_dim_adjoint(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """The transpose of ``_upsample_dim``: the gradient of its input from that of its output."""
    n = grad.shape[dim] // 2
    a, b = _lerp_weights(n, dim, grad)
    even, odd = grad.unflatten(dim, (n, 2)).unbind(dim + 1)
    # x[k] gets (1-a_k) even[k] + (1-b_k) odd[k] + a_{k+1} even[k+1] + b_{k-1} odd[k-1]
    shift = torch.addcmul(even.narrow(dim, 1, n - 1) * a.narrow(dim, 1, n - 1), odd.narrow(dim, 0, n - 1),
                          b.narrow(dim, 0, n - 1), value=-1)
    grad_x = even + odd
    grad_x.narrow(dim, 0, n - 1).add_(shift)
    grad_x.narrow(dim, 1, n - 1).sub_(shift)
    return grad_x


class _Upsample2xAligned(torch.autograd.Function):
    """Bilinear x2 upsampling with aligned corners, as two separable 1-D passes each way."""

    @staticmethod
    def forward(ctx, x):
        return _upsample_dim(_upsample_dim(x, 2), 3)

    @staticmethod
    def backward(ctx, grad_y):
        return _upsample_dim_adjoint(_upsample_dim_adjoint(grad_y.contiguous(), 3), 2)


class FastUpsample2x(Upsample2x):
    """``Upsample2x`` (bilinear x2, aligned corners), faster with autograd.

    The CPU kernel's backward scatters one output pixel at a time; this runs both directions as a
    few shifted multiply-adds over whole rows. Maps under 16 pixels a side, or no autograd, run
    the plain kernel.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or input.dim() != 4 or min(input.shape[-2:]) < 16:
            return super().forward(input)
        return _Upsample2xAligned.apply(input.contiguous())


class FastODConv2d(ODConv2d):
    """``ODConv2d`` with the input-channel and output-filter attentions folded into the kernels.

    conv(x * a_c, W_b) * a_f = conv(x, a_f * W_b * a_c): the same function, without two
    element-wise passes over the maps and their gradients (the per-sample kernels are tiny).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        b, _, h, w = x.shape
        channel, filt, spatial, kernel = self.attention(x)
        weight = spatial * self.weight.unsqueeze(0)  # (B, n, Cout, Cin, k, k)
        if kernel is not None:
            weight = weight * kernel
        weight = weight.sum(dim=1) * filt.view(b, self.out_chs, 1, 1, 1) * channel.view(b, 1, self.in_chs, 1, 1)
        y = F.conv2d(
            x.reshape(1, b * self.in_chs, h, w), weight.reshape(b * self.out_chs, self.in_chs, *weight.shape[-2:]),
            None, self.stride, self.padding, self.dilation, groups=b,
        )
        return y.view(b, self.out_chs, y.shape[-2], y.shape[-1])
