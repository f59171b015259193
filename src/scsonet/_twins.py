"""How a twin of a model swaps in: the one mechanism ``scsonet.fast`` and ``scsonet.deploy`` share.

A twin (the fast CPU training path, the lean export graph) computes the same function as the
plain model by other routes. The plain model knows nothing of it: a twin module maps plain
submodules, by their exact type, to replacements, and ``swap_twins`` applies that map. This is
torchvision's quantization packaging (``QuantizableResNet`` beside a plain ``ResNet`` that knows
nothing of quantization), done by type instead of by subclassing the whole network.
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch.nn as nn

__all__ = ["retyped", "swap_twins"]

M = TypeVar("M", bound=nn.Module)


def swap_twins(model: M, twin_of: Callable[[nn.Module], Optional[nn.Module]]) -> M:
    """Replace, in place, every submodule of ``model`` for which ``twin_of`` returns a module.

    Walks from the top: a replacement is searched in turn, so the twin of a stage can hold twins
    of its own blocks. ``model`` itself is never replaced; it is returned.
    """
    for name, child in model.named_children():
        twin = twin_of(child)
        if twin is not None and twin is not child:
            setattr(model, name, twin)  # ModuleList accepts str(index) names
        swap_twins(child if twin is None else twin, twin_of)
    return model


def retyped(module: nn.Module, cls: type[M]) -> M:
    """``module`` itself, its class switched to ``cls``: a subclass of its own that only changes how
    it computes (a twin), or back to a base class (the plain module again). Parameters stay the
    same objects (an optimizer built before still holds them); buffers and state-dict keys are
    untouched."""
    if not (issubclass(cls, type(module)) or issubclass(type(module), cls)):
        raise TypeError(f"{cls.__name__} is neither a subclass nor a base of {type(module).__name__}")
    module.__class__ = cls
    return module
