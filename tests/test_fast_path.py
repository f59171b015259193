"""The fast CPU training path (``scsonet.fast``) computes the plain model's function.

Outputs and gradients agree up to float rounding (checked against a float64 evaluation of the
plain model), state dicts are interchangeable, and every re-expressed op matches its plain
counterpart on inputs full of ties, the case where max-pool gradients are easy to get wrong.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scsonet._twins import retyped
from scsonet.fast import RUNTIME_ENV, optimizer_options, prepare_for_training
from scsonet.fast.layers import (
    FastConv2d, FastMaxPool2d, FastODConv2d, FastSCAttentionBridge, FastSpatialAttentionBridge, FastSRU,
    FastUpsample2x, PhaseConvNormPool,
)
from scsonet.fast.layers import _PhaseMax
from scsonet.layers import SRU, ODConv2d, SpatialAttentionBridge
from scsonet.models import create_model, list_models


def image_batch(b: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised 8-bit-like images with a flat patch (equal activations: max-pool ties) and masks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), generator=g).float()
    x[:, :, : h // 3, : w // 3] = 128.0
    return (x / 255 - 0.5) / 0.25, torch.rand(b, 1, h, w, generator=g) > 0.5


def bce_dice(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The paper's loss, in the logits' dtype (the library's casts to float32)."""
    y = masks.to(logits.dtype)
    p = torch.sigmoid(logits).flatten(1)
    dice = (2 * (p * y.flatten(1)).sum(1) + 1) / (p.sum(1) + y.flatten(1).sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, y) + (1 - dice).mean()


def logits_and_grads(model: nn.Module, x: torch.Tensor, masks: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    bce_dice(logits, masks).backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def grad_gaps(grads: dict, reference: dict) -> dict:
    return {n: (grads[n].double() - reference[n].double()).abs().max().item() for n in reference}


def assert_fast_computes_the_plain_function(name: str, batch: int, size: tuple[int, int]) -> None:
    """Fast and plain float32 models are equally close to the plain model run in float64."""
    torch.manual_seed(0)
    plain = create_model(name).train()
    reference = copy.deepcopy(plain).double()
    fast = copy.deepcopy(plain)
    assert prepare_for_training(fast, "cpu") is fast
    assert list(fast.state_dict()) == list(plain.state_dict())
    x, masks = image_batch(batch, *size)

    logits_p, grads_p = logits_and_grads(plain, x, masks)
    logits_f, grads_f = logits_and_grads(fast, x, masks)
    logits_64, grads_64 = logits_and_grads(reference, x.double(), masks)
    err_p = (logits_p.double() - logits_64).abs().max().item()
    assert (logits_f.double() - logits_64).abs().max().item() <= 10 * err_p + 1e-6
    assert grads_f.keys() == grads_p.keys() == grads_64.keys()
    err_p, err_f = grad_gaps(grads_p, grads_64), grad_gaps(grads_f, grads_64)
    for n, g in grads_64.items():
        assert err_f[n] <= 20 * err_p[n] + 1e-5 * g.abs().max().item(), n


@pytest.mark.parametrize("size", [(64, 96), pytest.param((50, 70), marks=pytest.mark.slow)],
                         ids=["multiple-of-32", "padded"])
def test_fast_scsonet_computes_the_plain_function(size):
    torch.manual_seed(0)
    plain = create_model("scsonet").train()
    fast = prepare_for_training(copy.deepcopy(plain), "cpu")
    x, masks = image_batch(4, *size)
    assert (fast(x) - plain(x)).abs().max() < 1e-4  # the figure the benchmark reports, on logits
    assert_fast_computes_the_plain_function("scsonet", 4, size)


def test_prepare_swaps_the_scsonet_blocks_and_keeps_parameters():
    model = create_model("scsonet")
    params = dict(model.named_parameters())
    prepare_for_training(model, "cpu")
    kinds = {type(m) for m in model.modules()}
    fast_kinds = {FastConv2d, FastMaxPool2d, FastODConv2d, PhaseConvNormPool, FastSRU, FastSpatialAttentionBridge,
                  FastSCAttentionBridge, FastUpsample2x}
    assert fast_kinds <= kinds
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}


def test_state_dicts_move_between_plain_and_fast_models():
    torch.manual_seed(0)
    fast = prepare_for_training(create_model("scsonet"), "cpu")
    plain = create_model("scsonet")
    plain.load_state_dict(fast.state_dict(), strict=True)
    fast.load_state_dict(plain.state_dict(), strict=True)


def test_without_autograd_the_fast_model_is_the_plain_model_bit_for_bit():
    torch.manual_seed(0)
    plain = create_model("scsonet").eval()
    fast = prepare_for_training(copy.deepcopy(plain), "cpu")
    x, _ = image_batch(1, 32, 64)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


def test_prepare_leaves_the_process_allocator_alone(monkeypatch):
    """mallopt is process-wide: only the ``scsonet train`` command opts in (tune_cpu_allocator)."""
    import ctypes

    calls = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: calls.append(args))
    prepare_for_training(create_model("scsonet"), "cpu")
    assert calls == []


def test_other_devices_are_left_alone():
    model = create_model("scsonet")
    before = [type(m) for m in model.modules()]
    assert prepare_for_training(model, "cuda") is model  # only inspects the device type
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("name", [n for n in list_models() if n != "scsonet"])
@pytest.mark.slow
def test_fast_path_keeps_every_registered_model(name):
    """A cheaper check for the other models (no float64 run): same logits and gradients, loosely."""
    torch.manual_seed(0)
    plain = create_model(name).train()
    fast = prepare_for_training(copy.deepcopy(plain), "cpu")
    x, masks = image_batch(2, 32, 32, seed=1)
    logits_p, grads_p = logits_and_grads(plain, x, masks)
    logits_f, grads_f = logits_and_grads(fast, x, masks)
    assert (logits_f - logits_p).abs().max() < 1e-3  # batch statistics of 2 amplify rounding
    scale = max(g.abs().max().item() for g in grads_p.values())
    for n, gap in grad_gaps(grads_f, grads_p).items():
        assert gap <= 1e-2 * grads_p[n].abs().max().item() + 1e-4 * scale, n


def pool_grads(pool: nn.Module, x: torch.Tensor, grad_y: torch.Tensor):
    x = x.clone().requires_grad_()
    y = pool(x)
    y.backward(grad_y)
    return y, x.grad


@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_fast_max_pool_routes_gradients_exactly_like_max_pool2d(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 12, generator=g)
    if kind == "ties":
        x = torch.randint(0, 3, x.shape, generator=g).float()
    if kind == "nan":
        x[0, 1, 2, 3] = x[1, 2, 5, 5] = float("nan")
    grad_y = torch.randn(2, 3, 4, 6, generator=g)
    fast = nn.MaxPool2d(2)
    retyped(fast, FastMaxPool2d)
    y_f, gx_f = pool_grads(fast, x, grad_y)
    y_p, gx_p = pool_grads(nn.MaxPool2d(2), x, grad_y)
    assert torch.equal(y_f, y_p) if kind != "nan" else torch.equal(y_f.isnan(), y_p.isnan())
    assert torch.equal(gx_f, gx_p)  # first maximum in scan order takes all, as max_pool2d does


@pytest.mark.parametrize("kind", ["ties", "nan"])
def test_phase_max_routes_gradients_like_max_pool2d_on_the_interleaved_map(kind):
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, 3, (2, 3, 4, 5, 6), generator=g).double()  # (B, C, phase, h, w)
    if kind == "nan":
        z[0, 1, 2, 3, 4] = z[1, 0, 0, 0, 0] = float("nan")
    grad_y = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    zr = z.clone().requires_grad_()
    y = _PhaseMax.apply(zr)
    y.backward(grad_y)
    full = F.pixel_shuffle(z.reshape(2, 12, 5, 6), 2).requires_grad_()  # phase 2i+j at (2p+i, 2q+j)
    y_ref = F.max_pool2d(full, 2)
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(zr.grad, F.pixel_unshuffle(full.grad, 2).view_as(z), rtol=0, atol=0)


def test_phase_stage_matches_conv_norm_pool_act_with_ties():
    torch.manual_seed(0)
    conv, norm, act = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.GELU()
    stage = PhaseConvNormPool(conv, norm, nn.MaxPool2d(2), act)
    x = torch.zeros(2, 3, 16, 20)
    x[:, :, 8:] = torch.randn(2, 3, 8, 20)  # the zero half gives equal conv outputs
    grad_y = torch.randn(2, 8, 8, 10)

    def run(fn):
        for p in (conv.weight, conv.bias, norm.weight, norm.bias):
            p.grad = None
        xr = x.clone().requires_grad_()
        y = fn(xr)
        y.backward(grad_y)
        return [y, xr.grad, conv.weight.grad, conv.bias.grad, norm.weight.grad]

    plain = run(lambda t: act(F.max_pool2d(norm(conv(t)), 2)))
    for got, want in zip(run(stage), plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(12, 6, 1),  # runs as a GEMM
    nn.Conv2d(2, 1, 7, padding=9, dilation=3),  # thin output: input gradient by a flipped conv
    nn.Conv2d(4, 4, 3, padding=1, bias=False),
], ids=["1x1", "thin-dilated", "3x3"])
def test_fast_conv_matches_conv2d(conv):
    torch.manual_seed(0)
    fast = copy.deepcopy(conv)
    assert FastConv2d.supports(fast)
    retyped(fast, FastConv2d)
    x = torch.randn(2, 32, 40, conv.in_channels).permute(0, 3, 1, 2)  # channels-last strides, as after a permute
    grad_y = torch.randn(2, conv.out_channels, 32, 40)
    _assert_same_forward_and_backward(conv, fast, x, grad_y, tol=1e-4)


@pytest.mark.parametrize("shape", [(2, 3, 16, 20), (1, 1, 17, 33)])
def test_upsample_matches_bilinear_interpolate_with_aligned_corners(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
    grad_y = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, x, grad_y)
    y_f = FastUpsample2x()(x)
    (got,) = torch.autograd.grad(y_f, x, grad_y)
    torch.testing.assert_close(y_f, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel_num", [1, 3])
def test_fast_odconv_folds_attentions_into_the_same_function(kernel_num):
    torch.manual_seed(0)
    conv = ODConv2d(4, 6, 3, kernel_num=kernel_num).double()
    fast = copy.deepcopy(conv)
    retyped(fast, FastODConv2d)
    x = torch.randn(3, 4, 10, 12, dtype=torch.float64)
    grad_y = torch.randn(3, 6, 10, 12, dtype=torch.float64)
    _assert_same_forward_and_backward(conv, fast, x, grad_y, tol=1e-10)


def test_fast_sru_gates_exactly_like_sru():
    torch.manual_seed(0)
    sru = SRU(8).double()
    nn.init.normal_(sru.gn.weight, 1.0, 0.5)  # a spread of weights puts positions on both sides of the gate
    fast = copy.deepcopy(sru)
    retyped(fast, FastSRU)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    outs = []
    for module in (sru, fast):
        xr = x.clone().requires_grad_()
        y = module(xr)
        y.sum().backward()
        outs.append((y, xr.grad, module.gn.weight.grad))
    assert torch.equal(outs[1][0], outs[0][0])
    for got, want in zip(outs[1][1:], outs[0][1:]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fast_spatial_attention_shares_channel_max_gradient_among_ties():
    sab = SpatialAttentionBridge().double()
    fast = copy.deepcopy(sab)
    retyped(fast, FastSpatialAttentionBridge)
    t = torch.randint(0, 2, (2, 4, 32, 32)).double()  # many channel ties
    grads = []
    for module in (sab, fast):
        tr = t.clone().requires_grad_()
        module.attention(tr).sum().backward()
        grads.append(tr.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_optimizer_options_give_the_same_adamw_update():
    torch.manual_seed(0)
    models = [nn.Linear(5, 3), None]
    models[1] = copy.deepcopy(models[0])
    opts = [torch.optim.AdamW(models[0].parameters(), 1e-2, weight_decay=1e-2),
            torch.optim.AdamW(models[1].parameters(), 1e-2, weight_decay=1e-2, **optimizer_options("cpu"))]
    x = torch.randn(4, 5)
    for _ in range(3):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert optimizer_options("cuda") == {}


def test_runtime_env_is_strings_for_a_child_process():
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in RUNTIME_ENV.items())


def _assert_same_forward_and_backward(plain, fast, x, grad_y, tol):
    """Output, input gradient and parameter gradients of ``fast`` equal those of ``plain``."""
    results = []
    for module in (plain, fast):
        xr = x.clone().requires_grad_()
        y = module(xr)
        y.backward(grad_y)
        results.append([y, xr.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_spatial_gate_matches_sab_with_its_residual_on_tied_channels():
    from scsonet.fast.layers import _SpatialGate

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 3, (2, 5, 12, 12), generator=g).double()  # channel maxima tie often
    conv = nn.Conv2d(2, 1, 7, padding=9, dilation=3).double()
    grad_s = torch.randn(t.shape, generator=g, dtype=torch.float64)

    def run(fn):
        conv.zero_grad()
        leaf = t.clone().requires_grad_()
        fn(leaf).backward(grad_s)
        return [leaf.grad, conv.weight.grad.clone(), conv.bias.grad.clone()]

    plain = run(lambda x: x * torch.sigmoid(conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1))) + x)
    fused = run(lambda x: _SpatialGate.apply(x, conv.weight, conv.bias, conv))
    for got, want in zip(fused, plain):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
