"""The fast training path on the CPU: same model, same numbers, fewer milliseconds.

``prepare_for_training(model, device)`` is the switch. On the CPU it swaps the model's slow
blocks for the exact re-expressions of ``scsonet.layers.fast`` (convolutions, max-pools, the
first encoder stage, the decoder's and the head's upsampling, SCConv's gate, the bridge's
channel maximum) and tunes the C allocator. Parameters stay the same objects and state-dict
keys are untouched, so checkpoints move freely between plain and fast models; outputs and
gradients agree with the plain model up to float rounding (``tests/test_fast_path.py``).
More parts belong to the trainer: ``optimizer_options`` (fused AdamW), ``RUNTIME_ENV`` (set
before torch loads) and the batch split over one-thread processes (``scsonet.parallel``).
``benchmarks/train_speed.py`` measures each part against the plain model.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
import torch.nn as nn

from ._runtime import RUNTIME_ENV
from .layers import SRU, ODConv2d, SCAttentionBridge, SpatialAttentionBridge
from .layers.fast import (
    FastConv2d, FastMaxPool2d, FastODConv2d, FastSCAttentionBridge, FastSpatialAttentionBridge, FastSRU,
    PhaseConvNormPool, upsample2x_aligned,
)
from .models.scsonet import SCSONet, _DecoderStage, _EncoderStage

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
    heap keeps its high-water mark. Returns whether the setting took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def _swap_class(module: nn.Module, cls: type[nn.Module]) -> None:
    # A subclass that only overrides forward: the module keeps its parameters and buffers as is.
    module.__class__ = cls


class FastDecoderStage(_DecoderStage):
    """SCSONet's decoder stage with the fast bilinear x2 upsampling (``upsample2x_aligned``)."""

    upsample2x = staticmethod(upsample2x_aligned)


class FastSCSONet(SCSONet):
    """SCSONet whose head upsamples with ``upsample2x_aligned``."""

    upsample2x = staticmethod(upsample2x_aligned)


# exact twins that only override how a block computes (conv and max-pool twins need a check first)
_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    _DecoderStage: FastDecoderStage,
    SCSONet: FastSCSONet,
    ODConv2d: FastODConv2d,
    SRU: FastSRU,
    SpatialAttentionBridge: FastSpatialAttentionBridge,
    SCAttentionBridge: FastSCAttentionBridge,
}


def _phase_stage(stage: nn.Module) -> PhaseConvNormPool | None:
    """The phase-layout twin of an SCSONet encoder stage with a plain conv block, else None."""
    if not isinstance(stage, _EncoderStage) or not PhaseConvNormPool.supports(stage.block, stage.norm, stage.pool):
        return None
    if stage.block.in_channels > PHASE_MAX_IN_CHANNELS:
        return None
    return PhaseConvNormPool(stage.block, stage.norm, stage.pool, stage.act).to(stage.block.weight.device)


def prepare_for_training(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Switch ``model`` to the fast CPU training path, in place; returns the same object.

    On other devices the model is returned unchanged (these re-expressions target the CPU).
    Supported convolutions (stride 1, no groups) and 2x2 max-pools are swapped for their fast
    twins, and SCSONet's first encoder stage runs in the phase layout; parameters stay the same
    objects, so an optimizer built before or after sees the same tensors.
    """
    if torch.device(device).type != "cpu":
        return model
    tune_cpu_allocator()
    for module in list(model.modules()):
        for name, child in module.named_children():
            twin = _phase_stage(child)
            if twin is not None:
                setattr(module, name, twin)  # ModuleList accepts str(index) names
    for module in model.modules():
        if FastConv2d.supports(module):
            _swap_class(module, FastConv2d)
        elif FastMaxPool2d.supports(module):
            _swap_class(module, FastMaxPool2d)
        elif type(module) in _TWINS:
            _swap_class(module, _TWINS[type(module)])
    return model


def optimizer_options(device: torch.device | str = "cpu") -> dict[str, bool]:
    """Extra keyword arguments for ``torch.optim.AdamW`` on the fast path: the fused kernel on the CPU.

    The for-loop AdamW launches a dozen small ops per parameter tensor (163 here), ~10 ms a step
    on 2 cores; the fused kernel does the same update in one pass (equal up to float rounding).
    """
    return {"fused": True} if torch.device(device).type == "cpu" else {}
