"""Split-batch steps: the same gradients as one process, BatchNorm over the whole batch, clear failures."""
import os

import pytest
import torch

from scsonet.losses import BceDiceLoss
from scsonet.models import create_model
from scsonet.parallel import ModelLoss, SplitBatchStep, cpu_budget


def _batch(n, size=64, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype)
    y = (torch.rand(n, 1, size, size, generator=g) > 0.5).to(dtype)
    return x, y


def _assert_same_grads(whole, split):
    # the criterion computes in float32, so float64 gradients agree to ~1e-7 of their scale; the
    # conv biases before a BatchNorm have a true gradient of 0 and get float64 noise (~1e-17)
    for (key, a), b in zip(whole.named_parameters(), split.parameters()):
        assert (a.grad is None) == (b.grad is None), key
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6 * a.grad.abs().max().item() + 1e-12), key


def _model(name):
    torch.manual_seed(0)
    return create_model(name).train().double()


@pytest.mark.parametrize("name", ["scsonet", "unet"])  # BatchNorm in ODConv's attention; UNet's BatchNorms
@pytest.mark.slow
def test_split_step_matches_one_process_in_float64(name):
    x, y = _batch(5)  # an uneven split: 3 + 2
    loss_fn = ModelLoss(BceDiceLoss())
    whole = _model(name)
    expected = loss_fn(whole, x, y)
    expected.backward()
    split = _model(name)
    with SplitBatchStep(split, loss_fn, processes=2) as step:
        loss = step(x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    _assert_same_grads(whole, split)
    # running statistics: updated once, from the statistics of the whole batch
    for (key, a), b in zip(whole.named_buffers(), split.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-12), key


@pytest.mark.slow
def test_split_step_accumulates_like_backward_and_survives_batches_too_small_to_split():
    x, y = _batch(4)
    loss_fn = ModelLoss(BceDiceLoss())
    whole = _model("scsonet")
    for i in (slice(0, 4), slice(0, 1)):
        loss_fn(whole, x[i], y[i]).backward()
    split = _model("scsonet")
    with SplitBatchStep(split, loss_fn, processes=2) as step:
        step(x, y)
        step(x[:1], y[:1])  # one sample: the main process alone
    _assert_same_grads(whole, split)


class _FailsOnSmallSlices:
    """A loss that raises on slices of fewer than 3 samples (the helper's, for a batch of 5)."""

    def __call__(self, model, x, y):
        if x.shape[0] < 3:
            raise ValueError("slice too small for this loss")
        return BceDiceLoss()(model(x), y)


@pytest.mark.slow
def test_a_failing_helper_fails_the_step_with_its_error():
    x, y = _batch(5)
    model = _model("malunet")  # no BatchNorm: the main process finishes its slice, then waits
    step = SplitBatchStep(model, _FailsOnSmallSlices(), processes=2)
    with pytest.raises(RuntimeError, match="slice too small"):
        step(x, y)
    step.close()
    assert all(not p.is_alive() for p in step._procs)
    assert "forward" not in vars(model)


def test_fewer_than_two_processes_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        SplitBatchStep(_model("malunet"), ModelLoss(BceDiceLoss()), processes=1)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 1),  # a 1.5-CPU container quota: one process
    ({"cpu.max": "max 100000\n"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({}, None),  # no cgroup files at all
])
def test_cpu_budget_respects_a_container_quota(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    unlimited = min(64, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else 64
    assert cpu_budget(tmp_path) == (expected if expected is not None else unlimited)
