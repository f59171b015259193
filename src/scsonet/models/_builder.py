"""Build a model, with pretrained weights if asked: the class count checked, the first conv adapted.

Every registered builder ends here, so that ``create_model(name, weights=...)`` takes the same
names everywhere and fails the same way. The model card names the layers loading may touch
(``first_conv``, ``classifier``, as timm's pretrained config does):

- ``in_chans`` other than the weights' (3): the first conv's kernel is adapted, timm style. For 1
  channel it is summed over the RGB channels, so a grey image gives exactly what the RGB weights
  give for that image replicated to 3 channels; for more channels it is repeated and scaled by
  3 / in_chans, so the response keeps its scale (exactly: an RGB image repeated k times gives the
  RGB output).
- ``num_classes`` other than the weights': an error (torchvision's ``_ovewrite_value_param``),
  unless the caller asks for a new head with ``reset_head=True``: every other weight is loaded and
  the head keeps its fresh initialisation, to be fine-tuned.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ScsonetError
from ._weights import InstalledWeights, WeightsEnum


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """A conv kernel (out, c, kh, kw) for ``in_chans`` input channels instead of c."""
    c = weight.shape[1]
    if in_chans == c:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_chans / c)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (c / in_chans)


def _class_names(meta: dict[str, Any], num_classes: int) -> str:
    """The classes of the weights' output channels, e.g. 'lesion' (a single logit: background implicit)."""
    cats = list(meta.get("categories", []))
    if len(cats) == num_classes + 1 and cats[0] == "background":
        cats = cats[1:]
    return ", ".join(map(str, cats[:num_classes])) or "unnamed"


def no_weights(arch: str, weights: Any) -> None:
    """For a model without a weights enum: None is fine, anything else names what exists."""
    if weights is not None:
        raise ScsonetError(f"{arch} has no pretrained weights (pretrained: {InstalledWeights().choices() or 'none'}); "
                           f"pass weights=None")


def build_with_weights(model_cls: Callable[..., nn.Module], weights_enum: type[WeightsEnum], weights: Any,
                       kwargs: dict[str, Any], reset_head: bool = False) -> nn.Module:
    """``model_cls(**kwargs)``, then the weights loaded (member, its name, pretrained name or None)."""
    member = weights_enum.verify(weights)
    if member is None:
        return model_cls(**kwargs)
    name = member.pretrained_name
    if not member.value.installed:
        raise ScsonetError(f"pretrained weights {name!r} are not installed ({member.path} and its card); "
                           f"installed: {', '.join(InstalledWeights()) or 'none'}")
    meta = member.meta
    card_args = dict(meta.get("model_args", {}))
    w_classes, w_chans = card_args.pop("num_classes", 1), card_args.pop("in_chans", 3)
    num_classes, in_chans = kwargs.get("num_classes", w_classes), kwargs.get("in_chans", w_chans)
    classifier, first_conv = meta.get("classifier"), meta.get("first_conv")
    if num_classes != w_classes and not reset_head:
        plural = "class" if w_classes == 1 else "classes"
        raise ScsonetError(f"{name} has {w_classes} {plural} ({_class_names(meta, w_classes)}); "
                           f"num_classes={num_classes} does not fit its head: pass weights=None to train from "
                           f"scratch, or reset_head=True for the pretrained layers with a new "
                           f"{classifier or 'head'}")
    for key, value in card_args.items():  # the architecture itself must be the weights'
        if key in kwargs and kwargs[key] != value:
            raise ScsonetError(f"{name} needs {key}={value!r}, got {kwargs[key]!r}")
    model = model_cls(**{**kwargs, **card_args, "num_classes": num_classes, "in_chans": in_chans})

    from safetensors.torch import load_file

    from ._loading import load_state

    state = load_file(str(member.path))
    if in_chans != w_chans:
        key = _layer_key(model, first_conv, "first_conv", name)
        state[key] = adapt_input_conv(in_chans, state[key])
    if num_classes != w_classes:
        prefix = _layer_key(model, classifier, "classifier", name).rsplit(".", 1)[0] + "."
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(prefix)})  # the fresh head
    load_state(model, state, name, str(member.path))
    return model


def _layer_key(model: nn.Module, layer: str | None, field: str, name: str) -> str:
    """``<layer>.weight`` of the conv the card names in ``field``; a card without it cannot adapt."""
    try:
        module = model.get_submodule(layer) if layer else None
    except AttributeError:
        module = None
    if not isinstance(module, nn.Conv2d):
        raise ScsonetError(f"{name}: the model card's {field}={layer!r} is not a conv of {type(model).__name__}, "
                           f"so the weights cannot be adapted")
    return f"{layer}.weight"
