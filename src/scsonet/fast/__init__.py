"""The fast training path on the CPU: same model, same numbers, fewer milliseconds.

``prepare_for_training(model, device)`` is the switch. On the CPU it swaps the model's slow
blocks, by type (``scsonet._twins.swap_twins``), for the exact re-expressions of
``scsonet.fast.layers`` (convolutions, max-pools, the first encoder stage, the decoders' and the
head's upsampling, SCConv's gate, the bridge's channel maximum). Parameters stay the same
objects and state-dict keys are untouched, so checkpoints move freely between plain and fast
models; outputs and gradients agree with the plain model up to float rounding
(``tests/test_fast_path.py``). The plain model has no hook for any of this.
More parts belong to the trainer: ``optimizer_options`` (fused AdamW), ``RUNTIME_ENV`` (set
before torch loads), ``tune_cpu_allocator`` (process-wide, so only the ``scsonet train``
command calls it) and the batch split over one-thread processes (``scsonet.parallel``).
``benchmarks/train_speed.py`` measures each part against the plain model.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
import torch.nn as nn

from .._runtime import RUNTIME_ENV
from .._twins import retyped, swap_twins
from ..layers import SRU, EncoderStage, ODConv2d, SCAttentionBridge, SpatialAttentionBridge, Upsample2x
from .layers import (
    FastConv2d, FastMaxPool2d, FastODConv2d, FastSCAttentionBridge, FastSpatialAttentionBridge, FastSRU,
    FastUpsample2x, PhaseConvNormPool,
)

__all__ = ["RUNTIME_ENV", "optimizer_options", "prepare_for_training", "tune_cpu_allocator"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

# encoder stages whose conv has at most this many input channels run in the phase layout
PHASE_MAX_IN_CHANNELS = 3


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process heap instead of returning it to the OS (glibc only).

    glibc serves large blocks (every activation map here) with fresh ``mmap`` pages and unmaps
    them on free, so each training step pays page faults that zero ~1 GB of memory again; with
    mmap off and a high trim threshold the blocks are reused. Process-wide and permanent: the
    heap keeps its high-water mark, so no library function calls this; ``scsonet train`` does
    (and the split-batch helper processes, which are the trainer's own). Returns whether the
    setting took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


# exact twins that only override how a block computes (conv and max-pool twins need a check first)
_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    Upsample2x: FastUpsample2x,
    ODConv2d: FastODConv2d,
    SRU: FastSRU,
    SpatialAttentionBridge: FastSpatialAttentionBridge,
    SCAttentionBridge: FastSCAttentionBridge,
}


def _phase_stage(stage: EncoderStage) -> PhaseConvNormPool | None:
    """The phase-layout twin of an encoder stage with a plain conv block, else None."""
    if not PhaseConvNormPool.supports(stage.block, stage.norm, stage.pool):
        return None
    if stage.block.in_channels > PHASE_MAX_IN_CHANNELS:
        return None
    return PhaseConvNormPool(stage.block, stage.norm, stage.pool, stage.act).to(stage.block.weight.device)


def _fast_twin(module: nn.Module) -> nn.Module | None:
    """The fast twin of one plain module, or None where it has none."""
    if type(module) is EncoderStage:
        return _phase_stage(module)
    if FastConv2d.supports(module):
        return retyped(module, FastConv2d)
    if FastMaxPool2d.supports(module):
        return retyped(module, FastMaxPool2d)
    twin = _TWINS.get(type(module))
    return None if twin is None else retyped(module, twin)


def prepare_for_training(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Switch ``model`` to the fast CPU training path, in place; returns the same object.

    On other devices the model is returned unchanged (these re-expressions target the CPU).
    Supported convolutions (stride 1, no groups) and 2x2 max-pools are swapped for their fast
    twins, and an encoder stage whose conv reads the image runs in the phase layout; parameters
    stay the same objects, so an optimizer built before or after sees the same tensors.
    """
    if torch.device(device).type != "cpu":
        return model
    # Not a new twin built from the model (STYLE.md 12, torchvision's quantizable networks): the
    # trainer's optimizer, checkpoints and DDP wrapper keep working on the very same parameters.
    return swap_twins(model, _fast_twin)


def optimizer_options(device: torch.device | str = "cpu") -> dict[str, bool]:
    """Extra keyword arguments for ``torch.optim.AdamW`` on the fast path: the fused kernel on the CPU.

    The for-loop AdamW launches a dozen small ops per parameter tensor (163 here), ~10 ms a step
    on 2 cores; the fused kernel does the same update in one pass (equal up to float rounding).
    """
    return {"fused": True} if torch.device(device).type == "cpu" else {}
