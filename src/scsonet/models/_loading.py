"""Load a ready-to-run model from a weights name, a training checkpoint or a safetensors file.

A training checkpoint (``.pt``) is a dict with ``model`` (state dict without wrapper prefixes),
``model_name``, ``model_args`` and ``preprocessing`` (``resize_size``, ``mean``, ``std``), plus
optimiser state and bookkeeping that loading ignores. A ``.safetensors`` file needs its model
card beside it (same stem, ``.json``) with ``arch``, ``model_args`` and ``preprocessing``.

Model files may come from anyone: a checkpoint is unpickled with torch's weights-only loader
(tensors, dicts, lists, strings and numbers; a file that asks for anything else is refused
before any of it runs), and every value read from a file is checked before use
(``scsonet._checks``); each problem is one ``ScsonetError`` line naming the file.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from .._checks import check_preprocessing, check_threshold, is_finite, is_int, one_line, show
from ..errors import ScsonetError
from ..transforms import SegmentationPreset
from ._registry import create_model, is_model, list_models
from ._weights import InstalledWeights, declared_weights

# Names accepted by ``--weights`` / ``load_pretrained``, mapped to weights members: those declared in
# ``_weights`` whose card and file are installed (``scsonet weights pack`` installs one).
PRETRAINED = InstalledWeights()


@dataclass
class LoadedModel:
    model: nn.Module
    preset: SegmentationPreset
    name: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def _refusal(err: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, from its (long, multi-line) message."""
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global| Please use|\n|$)", str(err))
    what = found.group(1).strip().rstrip(".") if found and found.group(1).strip() else one_line(err, 80)
    if re.search(r"Unsupported (global|class)", what):
        return f"it asks to run code: {what.split(':', 1)[-1].strip()}"
    return f"it holds pickle instructions a checkpoint does not need: {what}"


def read_checkpoint(path: str | Path, require: Iterable[str] = ()) -> dict[str, Any]:
    """The dict in a ``.pt`` checkpoint, unpickled without running anything it asks for.

    ``torch.load(weights_only=True)`` rebuilds only tensors and plain containers; a file that
    names any other class or function (a pickle payload) is refused. A truncated or foreign file
    is one error line too. ``require``: keys the caller needs (a missing one is an error).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about foreign pickle protocols: the error says enough
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "WeightsUnpickler" not in str(err):  # the plain unpickler's own complaint: a damaged file
            raise ScsonetError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({one_line(err)})") from None
        raise ScsonetError(f"{path}: refusing to load: not a plain scsonet checkpoint ({_refusal(err)})") from None
    except OSError as err:
        raise ScsonetError(f"{path}: cannot read it ({err.strerror or one_line(err)})") from None
    except Exception as err:  # torch raises RuntimeError, KeyError, EOFError, ... for damaged files
        first = one_line(err).split(". ")[0]  # torch appends paragraphs of advice
        raise ScsonetError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                           f"({type(err).__name__}: {first})") from None
    if not isinstance(ckpt, dict):
        raise ScsonetError(f"{path}: not a scsonet checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    missing = [key for key in require if key not in ckpt]
    if missing:
        raise ScsonetError(f"{path}: not a scsonet checkpoint (it lacks {', '.join(missing)})")
    return ckpt


def build_model(name: Any, model_args: Any, where: str, name_key: str = "model",
                args_key: str = "model_args") -> nn.Module:
    """``create_model(name, **model_args)`` for values from a config or a file: an unknown name or
    an argument the constructor does not take is one error, ``<where> <key>=<value>: ...``."""
    if not (isinstance(name, str) and is_model(name)):
        raise ScsonetError(f"{where} {name_key}={show(name)}: expected a registered model "
                           f"({', '.join(list_models())})")
    if not (isinstance(model_args, dict) and all(isinstance(k, str) for k in model_args)):
        raise ScsonetError(f"{where} {args_key}={show(model_args)}: expected a mapping of argument names to values")
    try:
        return create_model(name, **model_args)
    except Exception as err:  # a constructor rejects a value in its own way: TypeError, ValueError, ...
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        why = (f"{name} does not take argument {unexpected.group(1)!r}" if unexpected
               else f"{name} cannot be built with them ({type(err).__name__}: {one_line(err)})")
        raise ScsonetError(f"{where} {args_key}={show(model_args)}: {why}") from None


def load_state(model: nn.Module, state: Any, name: str, source: str) -> None:
    """Strict ``load_state_dict`` with one-line errors; NaN or infinite weights are refused too."""
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise ScsonetError(f"{source}: the weights are not a mapping of parameter names to tensors")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as err:  # missing or unexpected keys, wrong shapes: torch's message spans lines
        raise ScsonetError(f"{source}: the weights do not fit {name} ({one_line(err)})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ScsonetError(f"{source}: the weights hold NaN or infinite values ({bad})")


def _preset(pre: dict[str, Any]) -> SegmentationPreset:
    return SegmentationPreset.from_stats(pre["mean"], pre["std"], pre["resize_size"])


def read_card(path: Path) -> dict[str, Any]:
    """A model card (JSON object); a broken one is one error line."""
    if not path.is_file():
        raise ScsonetError(f"{path}: model card not found")
    try:
        card = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ScsonetError(f"{path}: the model card is not valid JSON ({one_line(err)})") from None
    except OSError as err:
        raise ScsonetError(f"{path}: cannot read it ({err.strerror or one_line(err)})") from None
    if not isinstance(card, dict):
        raise ScsonetError(f"{path}: the model card is not a JSON object")
    return card


def _from_card(weights_path: Path, card: dict[str, Any], source: str) -> LoadedModel:
    from safetensors.torch import load_file

    card_name = weights_path.with_suffix(".json")
    if "preprocessing" not in card:
        raise ScsonetError(f"{card_name}: the model card lacks preprocessing")
    pre = check_preprocessing(card["preprocessing"], str(card_name))
    if "threshold" in card:
        check_threshold(card["threshold"], str(card_name))
    model = build_model(card.get("arch"), card.get("model_args", {}), f"{card_name}:", "arch")
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors' own error type: bad header, truncated data, not safetensors
        raise ScsonetError(f"{weights_path}: not a readable safetensors file, truncated or corrupt "
                           f"({one_line(err)})") from None
    load_state(model, state, card["arch"], str(weights_path))
    return LoadedModel(model.eval(), _preset(pre), card["arch"], source, card)


# Bookkeeping a checkpoint may carry, which evaluation reports: (check, what is expected).
_META_CHECKS = {"epoch": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
                "best_val_dsc": (is_finite, "a finite number"),
                "config": (lambda v: isinstance(v, dict), "a mapping"),
                "protocol": (lambda v: isinstance(v, str), "a string"),
                "select_split": (lambda v: isinstance(v, str), "a string")}


def checkpoint_model(ckpt: dict[str, Any], source: str) -> LoadedModel:
    """The eval-mode model of a checkpoint dict (from ``read_checkpoint``), every value checked."""
    missing = [key for key in ("model", "model_name", "preprocessing") if key not in ckpt]
    if missing:
        raise ScsonetError(f"{source}: not a scsonet checkpoint (it lacks {', '.join(missing)})")
    pre = check_preprocessing(ckpt["preprocessing"], source)
    model = build_model(ckpt["model_name"], ckpt.get("model_args", {}), f"{source}:", "model_name")
    load_state(model, ckpt["model"], ckpt["model_name"], source)
    meta = {k: ckpt[k] for k in _META_CHECKS if k in ckpt}
    for key, value in meta.items():
        ok, expected = _META_CHECKS[key]
        if not ok(value):
            raise ScsonetError(f"{source}: {key}={show(value)}: expected {expected}")
    if "threshold" in pre:
        meta["threshold"] = pre["threshold"]
    return LoadedModel(model.eval(), _preset(pre), ckpt["model_name"], source, meta)


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve ``spec`` (pretrained name, ``.pt`` checkpoint or ``.safetensors``) into an eval-mode model."""
    spec_str = str(spec)
    if spec_str in PRETRAINED:
        weights = PRETRAINED[spec_str]
        if not weights.path.exists() or not weights.value.card_path.exists():
            raise ScsonetError(f"pretrained weights {spec_str!r} are not in this installation ({weights.path})")
        loaded = _from_card(weights.path, weights.meta, spec_str)
    else:
        path = Path(spec_str)
        if not path.exists() and spec_str in declared_weights():
            raise ScsonetError(f"pretrained weights {spec_str!r} are not in this installation "
                               f"({declared_weights()[spec_str].path} and its card)")
        if not path.exists():
            raise ScsonetError(f"weights {spec_str!r}: no such file, and not a pretrained name "
                               f"({PRETRAINED.choices()})")
        if path.suffix == ".safetensors":
            card_path = path.with_suffix(".json")
            if not card_path.exists():
                raise ScsonetError(f"{path}: needs its model card {card_path.name} beside it")
            loaded = _from_card(path, read_card(card_path), str(path))
        else:
            loaded = checkpoint_model(read_checkpoint(path), str(path))
    loaded.model.to(device)
    return loaded


def load_pretrained(name: str = "scsonet-isic2017", device: str | torch.device = "cpu") -> LoadedModel:
    """The shipped weights by name, ready for inference, with their preprocessing."""
    if name not in PRETRAINED and name not in declared_weights():
        raise ScsonetError(f"unknown pretrained weights {name!r}; choose from {PRETRAINED.choices()}")
    return load_model(name, device)
