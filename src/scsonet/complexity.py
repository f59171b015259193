"""Honest parameter and multiply-accumulate counts, and the paper's (thop) convention.

Exact MACs come from PyTorch's own FLOP counter, which sees every convolution, linear layer
and matrix product at the operator level, functional ones included (ODConv's per-sample
convolution, EMA's matmuls). thop instead hooks leaf modules: it misses functional operators and
parameters held directly by non-leaf modules, and the paper divided its counts by 1024^2 / 1024^3.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

CONVENTION_NOTE = (
    "exact = every parameter, and MACs of all convolutions, linear layers and matrix products "
    "(functional ones included); paper = thop's module-hook count (misses functional ops and "
    "parameters of non-leaf modules, adds norm/pool/upsample ops) divided by 1024^2 and 1024^3"
)


@dataclass
class Complexity:
    model: str
    input_size: tuple[int, int]
    params: int
    macs: int
    paper_params_m: float | None
    paper_gflops: float | None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["note"] = CONVENTION_NOTE
        return d


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, int] = (256, 256), in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (FLOPs / 2 of matmul-like ops)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, *input_size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def thop_counts(model: nn.Module, input_size: tuple[int, int] = (256, 256), in_chans: int = 3):
    """(MACs, params) as the thop package reports them, or (None, None) when thop is absent."""
    try:
        import thop
    except ImportError:
        return None, None
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, *input_size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        macs, params = thop.profile(model, inputs=(x,), verbose=False)
    # thop leaves its counters as buffers in the model; remove them so state dicts stay clean.
    for m in model.modules():
        for name in ("total_ops", "total_params"):
            if name in m._buffers:
                del m._buffers[name]
    model.train(was_training)
    return int(macs), int(params)


def measure(name: str, model: nn.Module, size: int | tuple[int, int] = 256) -> Complexity:
    input_size = (size, size) if isinstance(size, int) else tuple(size)
    in_chans = getattr(model, "in_chans", 3)
    thop_macs, thop_params = thop_counts(model, input_size, in_chans)
    return Complexity(
        model=name,
        input_size=input_size,
        params=count_params(model),
        macs=count_macs(model, input_size, in_chans),
        paper_params_m=None if thop_params is None else round(thop_params / 1024**2, 4),
        paper_gflops=None if thop_macs is None else round(thop_macs / 1024**3, 4),
    )


def format_complexity(c: Complexity) -> str:
    lines = [
        f"model            {c.model}  (input 1x3x{c.input_size[0]}x{c.input_size[1]})",
        f"parameters       {c.params:,}  ({c.params / 1e6:.4f} M)",
        f"MACs             {c.macs:,}  ({c.macs / 1e6:.1f} M, {c.macs / 1e9:.4f} G)",
    ]
    if c.paper_params_m is None:
        lines.append("paper convention unavailable: install thop")
    else:
        lines.append(f"paper convention {c.paper_params_m:.3f} M params / {c.paper_gflops:.3f} GFLOPs")
    lines.append(f"note             {CONVENTION_NOTE}")
    return "\n".join(lines)
