"""Model registry: builders register under their function name, ``create_model`` builds by name."""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

from ..errors import ScsonetError

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its name. Registering a name twice is an error."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model {name!r} is already registered")
    _model_entrypoints[name] = fn
    return fn


def list_models(filter: str = "") -> list[str]:
    """Registered model names, sorted; ``filter`` is an fnmatch pattern such as ``'scsonet*'``."""
    names = sorted(_model_entrypoints)
    return [n for n in names if fnmatch.fnmatch(n, filter)] if filter else names


def is_model(name: str) -> bool:
    return name in _model_entrypoints


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name not in _model_entrypoints:
        raise ScsonetError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _model_entrypoints[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model. Arguments whose value is None are dropped, so they never
    override a model default (a CLI flag left unset passes None)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return model_entrypoint(name)(**kwargs)
