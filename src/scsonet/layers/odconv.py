"""Omni-dimensional dynamic convolution.

`Omni-Dimensional Dynamic Convolution` (Li, Zhou, Yao; ICLR 2022), https://arxiv.org/abs/2209.07947
Original code: https://github.com/OSVAI/ODConv
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import LayerType, get_act_layer


class BatchNormAnyBatch(nn.BatchNorm2d):
    """BatchNorm that falls back to its running statistics for a batch of one in training.

    The attention branch normalises a 1x1 pooled map, so a batch of one has a single value per
    channel and plain BatchNorm raises. NOTE: not in the paper; batches >= 2 are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class ODConvAttention(nn.Module):
    """The four attention heads of ODConv, computed from one squeezed descriptor of the input.

    Heads: input channels (sigmoid), output filters (sigmoid), k x k spatial positions (sigmoid),
    and kernel mixing over ``kernel_num`` kernels (softmax; only when ``kernel_num > 1``).

    Args:
        in_chs: input channels.
        out_chs: output channels.
        kernel_size: spatial size k of the kernel.
        kernel_num: number of candidate kernels n (1).
        rd_ratio: reduction of the squeezed descriptor (1/16).
        min_rd_channels: floor on the descriptor width (16).
        temperature: softmax/sigmoid temperature (1.0).
        act_layer: activation of the squeezed descriptor (``nn.ReLU``).
        norm_layer: normalisation of the squeezed descriptor (``BatchNormAnyBatch``).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        kernel_num: int = 1,
        rd_ratio: float = 1 / 16,
        min_rd_channels: int = 16,
        temperature: float = 1.0,
        act_layer: LayerType = nn.ReLU,
        norm_layer: Callable[..., nn.Module] = BatchNormAnyBatch,
    ):
        super().__init__()
        rd_chs = max(int(in_chs * rd_ratio), min_rd_channels)
        self.kernel_size = kernel_size
        self.kernel_num = kernel_num
        self.temperature = temperature
        self.fc = nn.Conv2d(in_chs, rd_chs, 1, bias=False)
        self.bn = norm_layer(rd_chs)  # named bn whatever the norm: the state-dict keys of the shipped weights
        self.act = get_act_layer(act_layer)()
        self.channel_fc = nn.Conv2d(rd_chs, in_chs, 1)
        self.filter_fc = nn.Conv2d(rd_chs, out_chs, 1)
        self.spatial_fc = nn.Conv2d(rd_chs, kernel_size * kernel_size, 1)
        self.kernel_fc = nn.Conv2d(rd_chs, kernel_num, 1) if kernel_num > 1 else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        z = self.act(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        b = x.shape[0]
        k = self.kernel_size
        channel = torch.sigmoid(self.channel_fc(z) / self.temperature)  # (B, Cin, 1, 1)
        filt = torch.sigmoid(self.filter_fc(z) / self.temperature)  # (B, Cout, 1, 1)
        spatial = torch.sigmoid(self.spatial_fc(z) / self.temperature).view(b, 1, 1, 1, k, k)
        if self.kernel_fc is None:
            kernel = None
        else:
            kernel = torch.softmax(self.kernel_fc(z).view(b, -1) / self.temperature, dim=1)
            kernel = kernel.view(b, -1, 1, 1, 1, 1)
        return channel, filt, spatial, kernel


class ODConv2d(nn.Module):
    """Convolution whose kernel is re-weighted per sample along all four kernel dimensions.

    Eq. 1 of SCSONet / ODConv: y = (a_w1*a_f1*a_c1*a_s1*W1 + ... + a_wn*a_fn*a_cn*a_sn*Wn) * x

    The input-channel attention is applied to x and the output-filter attention to y, which is
    equivalent and cheaper; the spatial and kernel attentions build one kernel per sample, run
    as a single grouped convolution over the batch.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        kernel_size: k (3).
        stride: stride (1).
        padding: zero padding (k // 2 when None).
        dilation: dilation (1).
        kernel_num: number of candidate kernels n (1, as the published SCSONet; the kernel
            attention exists only when n > 1).
        rd_ratio: attention reduction ratio (1/16).
        act_layer: activation inside the attention (``nn.ReLU``).
        norm_layer: normalisation inside the attention (``BatchNormAnyBatch``).

    Shape:
        (B, in_chs, H, W) -> (B, out_chs, H', W')
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        kernel_num: int = 1,
        rd_ratio: float = 1 / 16,
        act_layer: LayerType = nn.ReLU,
        norm_layer: Callable[..., nn.Module] = BatchNormAnyBatch,
    ):
        super().__init__()
        if kernel_num < 1:
            raise ValueError(f"kernel_num must be >= 1, got {kernel_num}")
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = dilation * (kernel_size // 2) if padding is None else padding
        self.dilation = dilation
        self.kernel_num = kernel_num
        self.attention = ODConvAttention(in_chs, out_chs, kernel_size, kernel_num, rd_ratio, act_layer=act_layer,
                                        norm_layer=norm_layer)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_chs, in_chs, kernel_size, kernel_size))
        for i in range(kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        channel, filt, spatial, kernel = self.attention(x)
        weight = spatial * self.weight.unsqueeze(0)  # (B, n, Cout, Cin, k, k)
        if kernel is not None:
            weight = weight * kernel
        x = x * channel
        weight = weight.sum(dim=1).reshape(b * self.out_chs, self.in_chs, self.kernel_size, self.kernel_size)
        y = F.conv2d(
            x.reshape(1, b * self.in_chs, h, w), weight, None, self.stride, self.padding, self.dilation, groups=b
        )
        y = y.reshape(b, self.out_chs, y.shape[-2], y.shape[-1])
        return y * filt

    def extra_repr(self) -> str:
        return f"{self.in_chs}, {self.out_chs}, kernel_size={self.kernel_size}, kernel_num={self.kernel_num}"


__all__ = ["BatchNormAnyBatch", "ODConv2d", "ODConvAttention"]
