"""Read a prepared dataset (see ``scsonet.data.prepare``), checking it is what was prepared."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import check_preprocessing, show
from ..errors import ScsonetError
from ..transforms import SegmentationPreset
from .prepare import FORMAT, MANIFEST, sha256_file
from .splits import SPLITS

_MANIFEST_KEYS = ("dataset", "size", "splits", "stats", "files")


@dataclass
class SplitArrays:
    """One split in memory: uint8 ``images`` (N, 3, H, W), uint8 ``masks`` (N, 1, H, W) in {0, 1}."""

    images: torch.Tensor
    masks: torch.Tensor
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)


class PreparedData:
    """A prepared dataset folder: its manifest, training statistics and splits.

    Args:
        root: the folder ``scsonet data prepare`` wrote.
        verify: check every file's sha256 against the manifest (True).
    """

    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not self.root.is_dir():
            raise ScsonetError(f"{self.root}: prepared dataset folder not found (create it with `scsonet data prepare`)")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise ScsonetError(f"{manifest_path}: missing; {self.root} is not a prepared dataset") from None
        except (OSError, ValueError) as err:
            raise ScsonetError(f"{manifest_path}: unreadable ({err})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise ScsonetError(f"{manifest_path}: format {found!r} is not {FORMAT!r}; prepare the dataset again")
        if missing := [k for k in _MANIFEST_KEYS if k not in self.manifest]:
            raise ScsonetError(f"{manifest_path}: lacks {', '.join(missing)}; prepare the dataset again")
        stats = self.manifest["stats"]
        if not isinstance(stats, dict):
            raise ScsonetError(f"{manifest_path}: stats={show(stats)}: expected a mapping with mean and std")
        # the normalisation every model trained on it carries: a std of 0 would divide by zero
        check_preprocessing({"resize_size": self.manifest["size"], "mean": stats.get("mean"), "std": stats.get("std")},
                            f"{manifest_path} (its size and stats)")
        for rel, digest in self.manifest["files"].items():
            path = self.root / rel
            if not path.is_file():
                raise ScsonetError(f"{path}: listed in {MANIFEST} but missing")
            if verify and sha256_file(path) != digest:
                raise ScsonetError(f"{path}: checksum differs from {MANIFEST} (changed since it was prepared)")

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.manifest["splits"]]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.manifest["size"])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["stats"]["mean"])

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["stats"]["std"])

    @property
    def preset(self) -> SegmentationPreset:
        """Resize and normalisation with this dataset's training statistics."""
        return SegmentationPreset.from_stats(self.mean, self.std, self.size)

    def _load_one(self, split: str) -> SplitArrays:
        if split not in self.manifest["splits"]:
            raise ScsonetError(f"{self.root}: no split {split!r} (has {', '.join(self.splits)})")
        folder = self.root / split
        try:
            images = np.load(folder / "images.npy")
            masks = np.load(folder / "masks.npy")
            ids = (folder / "ids.txt").read_text().splitlines()
        except (OSError, ValueError) as err:
            raise ScsonetError(f"{folder}: cannot load split ({err})") from None
        n, (h, w) = self.manifest["splits"][split]["count"], self.size
        if images.shape != (n, h, w, 3) or masks.shape != (n, h, w) or images.dtype != np.uint8 \
                or masks.dtype != np.uint8 or ids != self.manifest["splits"][split]["ids"]:
            raise ScsonetError(f"{folder}: arrays or ids.txt do not match {MANIFEST}")
        return SplitArrays(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                           torch.from_numpy(masks).unsqueeze(1), ids)

    def load(self, split: str) -> SplitArrays:
        """Load a split; ``"train+val"`` concatenates splits (the paper protocol trains on both)."""
        parts = [self._load_one(s) for s in split.split("+")]
        if len(parts) == 1:
            return parts[0]
        return SplitArrays(torch.cat([p.images for p in parts]), torch.cat([p.masks for p in parts]),
                           [i for p in parts for i in p.ids])

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.manifest['splits'][s]['count']}" for s in self.splits)
        return f"PreparedData({str(self.root)!r}, {self.manifest['dataset']}, {counts})"
