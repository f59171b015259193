"""Native kernels: built on first use, equal to PyTorch's convolution, optional."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scsonet._twins import retyped
from scsonet._native import native
from scsonet.fast.layers import FastConv2d, _DirectConv2d

requires_native = pytest.mark.skipif(native() is None, reason="no C compiler here: the PyTorch routes are used")


@requires_native
@pytest.mark.parametrize("shape", [
    (4, 2, 40, 36, 1, 7, 9, 3, True),  # the attention bridge's conv
    (3, 5, 13, 17, 2, 3, 2, 2, False),  # uneven sizes, padding and dilation
    (2, 3, 9, 11, 4, 5, 0, 1, True),  # no padding: a smaller output
    (1, 1, 5, 40, 1, 3, 1, 1, True),  # rows longer than the 16 summation lanes
])
def test_direct_conv_matches_conv2d_forward_and_backward(shape):
    n, c, h, w, o, k, pad, dil, with_bias = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(o, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(o, generator=g, dtype=torch.float64) if with_bias else None
    leaves64 = [t.clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
    y64 = F.conv2d(leaves64[0], leaves64[1], leaves64[2] if with_bias else None, 1, pad, dil)
    grad_y = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    y64.backward(grad_y)
    leaves = [t.detach().float().requires_grad_() for t in leaves64]
    y = _DirectConv2d.apply(leaves[0], leaves[1], leaves[2] if with_bias else None, (pad, pad), (dil, dil), native())
    y.backward(grad_y.float())
    for got, want in zip([y, *(t.grad for t in leaves)], [y64, *(t.grad for t in leaves64)]):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@requires_native
def test_fast_conv_takes_the_direct_route_for_one_output_channel(monkeypatch):
    conv = nn.Conv2d(2, 1, 7, padding=9, dilation=3)
    retyped(conv, FastConv2d)
    calls = []
    real = _DirectConv2d.apply
    monkeypatch.setattr(_DirectConv2d, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 2, 24, 24, requires_grad=True)
    conv(x).sum().backward()
    assert calls and x.grad is not None
    with torch.no_grad():  # no autograd: the plain convolution
        conv(x)
    assert len(calls) == 1


def test_scsonet_native_0_turns_the_kernels_off():
    code = "from scsonet._native import native; print(native() is None)"
    env = {**os.environ, "SCSONET_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_without_a_compiler_there_is_no_library(tmp_path):
    code = "from scsonet._native import native; print(native() is None)"
    env = {**os.environ, "CC": "no-such-compiler", "PATH": str(tmp_path), "SCSONET_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
