"""The training steps of ``scsonet.steps``, each on its own: eager, split processes, CUDA graph
(its warm-up and fallback on the CPU, its capture where a GPU is), the one chosen per device and
config; and the stops that rank 0 decides for every rank under torchrun."""
import contextlib
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import scsonet.steps as steps_module
from scsonet.losses import BceDiceLoss
from scsonet.models import create_model
from scsonet.models.egeunet import deep_supervision_loss
from scsonet.parallel import ModelLoss
from scsonet.steps import CudaGraphStep, EagerStep, SplitProcessStep, choose_step
from scsonet.train import TrainConfig, _from_rank0

LOSS = ModelLoss(BceDiceLoss(), deep_supervision_loss)  # what train() builds


def _batches(n, device="cpu", dtype=torch.float32, size=32, batch=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device, dtype),
             (torch.rand(batch, 1, size, size, generator=g) > 0.5).to(device, dtype)) for _ in range(n)]


class _Tiny(nn.Module):
    """Seconds, not minutes, on a busy CPU: a conv, a BatchNorm (statistics over the batch, which
    the split step exchanges between its processes) and a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 1))

    def forward(self, x):
        return self.body(x)


def _model_and_optimizer(name="tiny", device="cpu", dtype=torch.float32, capturable=False):
    torch.manual_seed(0)
    model = (_Tiny() if name == "tiny" else create_model(name)).to(device, dtype).train()
    lr = torch.tensor(1e-3, device=device) if capturable else 1e-3
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2, capturable=capturable)


def _losses(step, batches):
    return [step(images, masks).item() for images, masks in batches]


def _same_parameters(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_eager_step_is_the_plain_loop_and_sets_the_optimisers_rate():
    batches = _batches(3)
    model, optimizer = _model_and_optimizer()
    step = EagerStep(model, LOSS, optimizer)
    step.set_lr(5e-4)
    losses = _losses(step, batches)
    plain, plain_optimizer = _model_and_optimizer()
    plain_optimizer.param_groups[0]["lr"] = 5e-4
    expected = []
    for images, masks in batches:  # nanoGPT's loop body
        loss = LOSS(plain, images, masks)
        loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)
        expected.append(loss.item())
    assert losses == expected and _same_parameters(model, plain)
    assert all(p.grad is None for p in model.parameters())
    rate = optimizer.param_groups[0]["lr"] = torch.tensor(1.0)  # a capturable optimiser's: filled in place
    step.set_lr(0.25)
    assert optimizer.param_groups[0]["lr"] is rate and rate.item() == 0.25


def test_eager_step_adds_egeunets_side_outputs_through_the_loss_adapter():
    (images, masks), criterion = _batches(1, batch=2)[0], BceDiceLoss()
    model, optimizer = _model_and_optimizer("egeunet")
    reference, _ = _model_and_optimizer("egeunet")
    logits = reference(images)
    expected = criterion(logits, masks) + deep_supervision_loss(reference.aux_logits, masks, criterion)
    assert len(reference.aux_logits) == 5
    assert EagerStep(model, LOSS, optimizer)(images, masks).item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() > criterion(logits, masks).item() * 1.1  # the side outputs weigh in


def test_bf16_step_runs_the_forward_under_autocast_on_the_cpu():
    batches = _batches(2)
    seen = []
    model, optimizer = _model_and_optimizer()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    bf16 = _losses(EagerStep(model, LOSS, optimizer, amp="bf16"), batches)
    fp32_model, fp32_optimizer = _model_and_optimizer()
    fp32 = _losses(EagerStep(fp32_model, LOSS, fp32_optimizer), batches)
    assert seen == [torch.bfloat16] * 2
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=5e-2)


def test_split_process_step_matches_the_eager_step():
    batches = _batches(3, dtype=torch.float64)
    model, optimizer = _model_and_optimizer(dtype=torch.float64)
    eager = _losses(EagerStep(model, LOSS, optimizer), batches)
    split_model, split_optimizer = _model_and_optimizer(dtype=torch.float64)
    step = SplitProcessStep(split_model, LOSS, split_optimizer, processes=2)
    try:
        split = _losses(step, batches)
    finally:
        step.close()
    # the criterion computes in float32; the later losses show that the updates agree too (the
    # parameters themselves may not: Adam scales the float noise on a conv bias before a BatchNorm,
    # whose true gradient is 0, up to a full step, and the BatchNorm then cancels that bias)
    assert split == pytest.approx(eager, rel=1e-6)
    assert not any(proc.is_alive() for proc in step.split._procs)


class _NoStream:
    def wait_stream(self, other):
        pass


def test_cuda_graph_step_warms_up_then_goes_on_eagerly_where_capture_fails(monkeypatch, capsys):
    """On the CPU, with CUDA's stream calls as no-ops and the capture raising as it does where
    graphs are unsupported: the warm-up steps and the eager ones after are the eager step's."""
    def no_capture():
        raise RuntimeError("CUDA graphs are not supported here\nsecond line")

    monkeypatch.setattr(torch.cuda, "Stream", _NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_capture)
    batches = _batches(CudaGraphStep.warmup_steps + 2)
    model, optimizer = _model_and_optimizer()
    eager = _losses(EagerStep(model, LOSS, optimizer), batches)
    graph_model, graph_optimizer = _model_and_optimizer()
    step = CudaGraphStep(graph_model, LOSS, graph_optimizer)
    assert _losses(step, batches) == eager and _same_parameters(graph_model, model)
    assert step.eager and step.graph is None and step.steps == CudaGraphStep.warmup_steps
    out = capsys.readouterr().out
    assert out == "CUDA graph capture failed (CUDA graphs are not supported here); continuing eagerly\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_cuda_graph_step_captures_and_replays_the_eager_step(amp, capsys):
    batches = _batches(CudaGraphStep.warmup_steps + 4, device="cuda")
    model, optimizer = _model_and_optimizer("scsonet", device="cuda", capturable=True)
    eager = _losses(EagerStep(model, LOSS, optimizer, amp=amp), batches)
    graph_model, graph_optimizer = _model_and_optimizer("scsonet", device="cuda", capturable=True)
    step = CudaGraphStep(graph_model, LOSS, graph_optimizer, amp=amp)
    step.set_lr(1e-3)
    graphed = _losses(step, batches)
    assert step.graph is not None and not step.eager and "capture failed" not in capsys.readouterr().out
    assert graphed == pytest.approx(eager, rel=1e-3 if amp == "off" else 3e-2)
    step.set_lr(0.0)  # the replayed update reads the rate's tensor: at rate 0 the parameters stay put
    before = [p.detach().clone() for p in graph_model.parameters()]
    step(*batches[0])
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(graph_model.parameters(), before))


@pytest.mark.parametrize("device, world_size, settings, expected", [
    ("cuda", 1, {}, (CudaGraphStep, {"amp": "off"})),
    ("cuda", 1, {"amp": "bf16"}, (CudaGraphStep, {"amp": "bf16"})),
    ("cuda", 1, {"cuda_graph": False}, (EagerStep, {"amp": "off"})),
    ("cuda", 2, {}, (EagerStep, {"amp": "off"})),  # torchrun: DDP steps eagerly
    ("mps", 1, {}, (EagerStep, {"amp": "off"})),
    ("cpu", 1, {"processes": 2}, (SplitProcessStep, {"processes": 2})),
    ("cpu", 1, {"processes": 16, "batch_size": 4}, (SplitProcessStep, {"processes": 4})),
    ("cpu", 1, {}, (SplitProcessStep, {"processes": 3})),  # one per usable CPU (3 here)
    ("cpu", 1, {"processes": 1}, (EagerStep, {"amp": "off"})),
    ("cpu", 1, {"fast": False}, (EagerStep, {"amp": "off"})),
    ("cpu", 1, {"processes": 2, "amp": "bf16"}, (EagerStep, {"amp": "bf16"})),
    ("cpu", 2, {"processes": 2}, (EagerStep, {"amp": "off"})),
])
def test_the_step_is_chosen_by_device_and_config(monkeypatch, device, world_size, settings, expected):
    monkeypatch.setattr(steps_module, "cpu_budget", lambda: 3)
    assert choose_step(TrainConfig(**settings), torch.device(device), world_size) == expected


def test_only_the_graph_step_needs_a_capturable_optimiser_and_fixed_batches():
    assert (CudaGraphStep.capturable, CudaGraphStep.drop_last) == (True, True)
    assert not any((cls.capturable, cls.drop_last) != (False, False) for cls in (EagerStep, SplitProcessStep))


def _rank(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # rank 0's clock says the budget is spent and its loss is finite; rank 1's say the opposite
        said = [(True, 2.5), (False, math.nan)][rank]
        heard = [_from_rank0(value, torch.device("cpu"), 2) for value in said]
        (out_dir / f"rank{rank}.json").write_text(json.dumps(heard))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # a subprocess or an export: seconds
def test_rank0_decides_every_stop_for_all_ranks(tmp_path):
    mp.spawn(_rank, args=(tmp_path / "init", tmp_path), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[1.0, 2.5]] * 2
    assert _from_rank0(True, torch.device("cpu"), world_size=1) == 1.0  # alone: its own decision
