"""Preprocessing presets that travel with a set of weights (torchvision's ``_presets`` idea)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SegmentationPreset:
    """Resize an RGB image to ``resize_size`` (bilinear, antialiased) and normalise it.

    Input: a uint8 tensor or array, (H, W, 3) or (B, 3, H, W); values 0..255.
    Output: float32 (B, 3, *resize_size), ``(x / 255 - mean) / std``.
    """

    resize_size: tuple[int, int] = (256, 256)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.permute(2, 0, 1).unsqueeze(0)
        x = x.float()
        if tuple(x.shape[-2:]) != tuple(self.resize_size):
            x = F.interpolate(x, size=tuple(self.resize_size), mode="bilinear", align_corners=False, antialias=True)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in 0..255 (any float dtype) -> normalised, on x's device."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) * 255.0
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"resize_size": list(self.resize_size), "mean": list(self.mean), "std": list(self.std),
                "input_range": "RGB uint8 0..255, divided by 255 before mean/std"}

    @classmethod
    def from_stats(cls, mean: Sequence[float], std: Sequence[float], size: int | Sequence[int] = 256):
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(tuple(size), tuple(float(m) for m in mean), tuple(float(s) for s in std))
