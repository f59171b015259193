"""Named pretrained weights that carry their preprocessing and metadata (torchvision style).

Weight files ship inside the package (``scsonet/weights/<name>.safetensors``) next to a model
card (``<name>.json``) that holds the preprocessing, the recipe and the measured test metrics.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from ..errors import ScsonetError
from ..transforms import SegmentationPreset

WEIGHTS_PACKAGE = "scsonet.weights"


@dataclass(frozen=True, eq=False)
class Weights:
    """One set of weights: ``filename`` in the package's ``weights/`` folder, plus its card."""

    filename: str
    arch: str
    default_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(self.filename)))

    @property
    def card_path(self) -> Path:
        return self.path.with_suffix(".json")

    @property
    def installed(self) -> bool:
        """Both the weights file and its card are in the package (a card is written last by a pack)."""
        return self.path.is_file() and self.card_path.is_file()

    @property
    def meta(self) -> dict[str, Any]:
        """The model card: preprocessing, recipe, metrics. Empty until the weights are trained.

        Read on each access, not cached: ``scsonet weights pack`` may install a card while running."""
        card = self.card_path
        meta = dict(self.default_meta)
        if card.exists():
            meta.update(json.loads(card.read_text()))
        return meta

    @property
    def transforms(self) -> SegmentationPreset:
        pre = self.meta.get("preprocessing")
        if pre is None:
            raise ScsonetError(f"weights {self.filename} have no model card at {self.card_path}")
        return SegmentationPreset.from_stats(pre["mean"], pre["std"], pre["resize_size"])


class WeightsEnum(Enum):
    """Base of each architecture's weights enum: members named DATASET_VERSION, plus DEFAULT."""

    @classmethod
    def verify(cls, obj):
        """Turn a member, its name (``'ISIC2017_V1'``, ``'DEFAULT'``), its pretrained name
        (``'scsonet-isic2017'``) or None into a member or None."""
        if obj is None or isinstance(obj, cls):
            return obj
        arch = next(iter(cls)).value.arch
        if isinstance(obj, WeightsEnum):  # a member of another architecture's enum
            raise ScsonetError(f"weights {type(obj).__name__}.{obj.name} are for {obj.value.arch}, not {arch}")
        if not isinstance(obj, str):
            raise TypeError(f"weights must be a {cls.__name__}, a name or None, not {type(obj).__name__}")
        declared = declared_weights()
        if obj in declared:
            member = declared[obj]
            if not isinstance(member, cls):
                raise ScsonetError(f"weights {obj!r} are for {member.value.arch}, not {arch}")
            return member
        key = obj.split(".")[-1].upper().replace("-", "_")  # also 'SCSONet_Weights.ISIC2017_V1', as torchvision takes
        if key in cls.__members__:
            return cls[key]
        names = [*cls.__members__, *(n for n, m in declared.items() if isinstance(m, cls))]
        raise ScsonetError(f"unknown weights {obj!r} for {arch}; choose from {', '.join(names)}")

    @property
    def versioned_name(self) -> str:
        """``<arch>-<dataset>-v<N>`` (``'scsonet-isic2017-v1'``): this version, whichever is the default."""
        dataset, version = self.name.rsplit("_", 1)
        return f"{self.value.arch}-{dataset.lower()}-{version.lower()}"

    @property
    def pretrained_name(self) -> str:
        """The name ``load_pretrained`` and ``--weights`` take: ``<arch>-<dataset>`` for the enum's
        DEFAULT, the versioned name for every other version."""
        if self is type(self).DEFAULT:
            return self.versioned_name.rsplit("-", 1)[0]
        return self.versioned_name

    @property
    def meta(self) -> dict[str, Any]:
        return self.value.meta

    @property
    def transforms(self) -> SegmentationPreset:
        return self.value.transforms

    @property
    def path(self) -> Path:
        return self.value.path


class SCSONet_Weights(WeightsEnum):
    ISIC2017_V1 = Weights("scsonet_isic2017_v1.safetensors", "scsonet")
    # Issue 11's robust recipe; not the default until it meets that issue's acceptance (docs/robustness/v5).
    ISIC2017_V2 = Weights("scsonet_isic2017_v2.safetensors", "scsonet")
    DEFAULT = ISIC2017_V1


class MALUNet_Weights(WeightsEnum):
    ISIC2017_V1 = Weights("malunet_isic2017_v1.safetensors", "malunet")
    DEFAULT = ISIC2017_V1


class EGEUNet_Weights(WeightsEnum):
    ISIC2017_V1 = Weights("egeunet_isic2017_v1.safetensors", "egeunet")
    DEFAULT = ISIC2017_V1


class UNeXt_S_Weights(WeightsEnum):
    ISIC2017_V1 = Weights("unext_s_isic2017_v1.safetensors", "unext_s")
    DEFAULT = ISIC2017_V1


WEIGHTS_ENUMS: tuple[type[WeightsEnum], ...] = (SCSONet_Weights, MALUNet_Weights, EGEUNet_Weights, UNeXt_S_Weights)


def declared_weights() -> dict[str, WeightsEnum]:
    """Every declared weights name -> its member: each version's own (``scsonet-isic2017-v1``), and
    ``<arch>-<dataset>`` (``scsonet-isic2017``) for the enum's DEFAULT.

    Members are declared in upper case DATASET_VERSION. Moving DEFAULT to a new version moves the
    short name to it; the older versions stay loadable by their versioned names.
    """
    names = {}
    for enum in WEIGHTS_ENUMS:
        names[enum.DEFAULT.pretrained_name] = enum.DEFAULT
        for member in enum:  # iteration skips aliases such as DEFAULT
            names[member.versioned_name] = member
    return names


class InstalledWeights(Mapping):
    """The pretrained names whose card and file are present, looked up live (a missing card: not
    installed, so the name is not offered)."""

    def _installed(self) -> dict[str, WeightsEnum]:
        return {name: w for name, w in declared_weights().items() if w.value.installed}

    def __getitem__(self, name: str) -> WeightsEnum:
        return self._installed()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._installed())

    def __len__(self) -> int:
        return len(self._installed())

    def choices(self) -> str:
        """The names for an error message: installed ones, then those declared but not installed."""
        missing = [name for name in declared_weights() if name not in self]
        return ", ".join(self) + (f"; not installed: {', '.join(missing)}" if missing else "")


def list_pretrained(filter: str = "", *, include_missing: bool = False) -> list[str]:
    """Pretrained names (``load_pretrained``, ``--weights``, ``create_model(weights=...)``), sorted.

    Only the installed ones unless ``include_missing``; ``filter`` is an fnmatch pattern."""
    import fnmatch

    names = sorted(declared_weights() if include_missing else InstalledWeights())
    return [n for n in names if fnmatch.fnmatch(n, filter)] if filter else names


def get_model_weights(name: str) -> type[WeightsEnum] | None:
    """The weights enum of a registered model name (``'scsonet'`` -> ``SCSONet_Weights``), None if it has none."""
    from ._registry import model_entrypoint

    model_entrypoint(name)  # an unknown name is an error that lists the registered ones
    return next((e for e in WEIGHTS_ENUMS if e.DEFAULT.value.arch == name), None)
