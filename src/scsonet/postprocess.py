"""From an image to the model's input size and back: resizing, thresholding, lesion figures, overlays.

Torch-free (numpy and Pillow only): every backend (PyTorch, ONNX Runtime) shares these steps,
so they give the same masks from the same probabilities.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

__all__ = ["LesionSummary", "ProbabilityMap", "REVIEW_COLOR", "crop_resized", "draw_overlay", "erode", "outline",
           "probabilities_to_uint8", "resize_image", "resize_probabilities", "summarize", "threshold_resized",
           "upsampled_probabilities"]

OUTLINE_COLOR = (0, 255, 0)  # green stands out on brown, red and pink skin alike
REVIEW_COLOR = (255, 176, 0)  # amber banner of an outline to review: unlike the green outline and the label


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> ``size`` = (height, width), bilinear (antialiased when shrinking). A
    ``scsonet.imageio.LazyImage`` is resized from its reduced decode (no full decode)."""
    if hasattr(rgb, "resized"):
        return rgb.resized(size)
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


def crop_resized(rgb: np.ndarray, window: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The region ``window`` = (x0, y0, x1, y1) of an image, resized to ``size`` = (height, width).
    A ``scsonet.imageio.LazyImage`` crops from a decode just fine enough for it (not always full)."""
    if hasattr(rgb, "crop_resized"):
        return rgb.crop_resized(window, size)
    x0, y0, x1, y1 = window
    return resize_image(np.ascontiguousarray(rgb[y0:y1, x0:x1]), size)


def resize_probabilities(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float probabilities -> ``size`` = (height, width), bilinear, float32."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape == tuple(size):
        return probs
    return np.asarray(Image.fromarray(probs).resize((size[1], size[0]), Image.BILINEAR))


def probabilities_to_uint8(probs: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(probs) * 255.0), 0, 255).astype(np.uint8)


def _enlarged_in_8_bits(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (``size``): ``probs`` in 1/255 steps, resized. Enlarging a map in 8 bits is 4x faster
    than in float on a 12 MP photo, at the precision of the saved probability PNG."""
    return np.asarray(Image.fromarray(probabilities_to_uint8(probs)).resize((size[1], size[0]), Image.BILINEAR))


def _enlarges(probs: np.ndarray, size: tuple[int, int]) -> bool:
    return size[0] * size[1] > probs.size


def upsampled_probabilities(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``resize_probabilities``, but in 8 bits where it enlarges (a map onto a big photo): float32."""
    probs = np.asarray(probs, dtype=np.float32)
    if not _enlarges(probs, size):
        return resize_probabilities(probs, size)
    return _enlarged_in_8_bits(probs, size).astype(np.float32) / np.float32(255)


def threshold_resized(probs: np.ndarray, size: tuple[int, int], threshold: float) -> np.ndarray:
    """``upsampled_probabilities(probs, size) >= threshold`` (bool), without the float map."""
    probs = np.asarray(probs, dtype=np.float32)
    if not _enlarges(probs, size):
        return resize_probabilities(probs, size) >= threshold
    steps = np.arange(256, dtype=np.float32) / np.float32(255)  # the values an 8-bit map can take
    level = int(np.count_nonzero(~(steps >= threshold)))  # the first 8-bit value at the threshold
    return _enlarged_in_8_bits(probs, size) >= level


CONFIDENCE_SIDE = 1024  # longest side at which a larger image's mean confidence is read


class ProbabilityMap:
    """The lesion probabilities of one image at its size ``shape`` = (height, width), kept as the
    model-size maps they are resized from and made at full size only when asked for: a 12 MP
    photo's float map costs more than the network (48 MB), its mask a quarter of that. Each map is
    resized by ``upsampled_probabilities``; ``mask(t)`` is exactly ``dense() >= t``.

    ``base`` covers the whole image (None: zero everywhere); ``patch`` covers ``window`` =
    (x0, y0, x1, y1), x1 and y1 exclusive, and replaces the base there (two-pass's second pass).
    ``np.asarray(m)`` is ``m.dense()``.
    """

    def __init__(self, shape: tuple[int, int], base: Optional[np.ndarray],
                 window: Optional[Sequence[int]] = None, patch: Optional[np.ndarray] = None):
        if base is None and patch is None:
            raise ValueError("a probability map needs a base map, a patch or both")
        if (window is None) != (patch is None):
            raise ValueError("a patch needs its window, and a window its patch")
        self.shape = (int(shape[0]), int(shape[1]))
        self.base = None if base is None else np.asarray(base, dtype=np.float32)
        self.window = None if window is None else tuple(int(v) for v in window)
        self.patch = None if patch is None else np.asarray(patch, dtype=np.float32)
        self._dense: Optional[np.ndarray] = None
        self._masks: dict[float, np.ndarray] = {}

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def _window_size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.window
        return y1 - y0, x1 - x0

    def _paint(self, whole, part, dtype) -> np.ndarray:
        out = whole(self.base) if self.base is not None else np.zeros(self.shape, dtype)
        if self.patch is not None:
            if self.base is not None:
                out = out.copy()  # a resized map can be read-only
            x0, y0, x1, y1 = self.window
            out[y0:y1, x0:x1] = part(self.patch)
        return out

    def dense(self) -> np.ndarray:
        """float32 (H, W), made once."""
        if self._dense is None:
            self._dense = self._paint(lambda m: upsampled_probabilities(m, self.shape),
                                      lambda m: upsampled_probabilities(m, self._window_size()), np.float32)
        return self._dense

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        dense = self.dense()
        return dense if dtype is None else dense.astype(dtype, copy=False)

    def mask(self, threshold: float) -> np.ndarray:
        """bool (H, W): ``threshold_resized`` of each map, made once per threshold."""
        key = float(threshold)
        if key not in self._masks:
            self._masks[key] = self._paint(lambda m: threshold_resized(m, self.shape, key),
                                           lambda m: threshold_resized(m, self._window_size(), key), bool)
        return self._masks[key]

    def max(self) -> float:
        """The highest probability (of the model-size maps; resizing makes none higher)."""
        values = [float(m.max()) for m in (self.base, self.patch) if m is not None]
        if self.patch is not None and self.base is None and self._window_size() != self.shape:
            values.append(0.0)  # the zero outside the window
        return max(values)

    def summary(self, threshold: float) -> LesionSummary:
        """``summarize`` of the mask at ``threshold``. On an image whose longer side exceeds
        ``CONFIDENCE_SIDE``, the mean confidence is read from the map made at that side instead:
        the same bilinear surface sampled more sparsely (within 0.001 of the full-size mean)."""
        mask = self.mask(threshold)
        scale = CONFIDENCE_SIDE / max(self.shape)
        if scale >= 1:
            return summarize(self.dense(), mask)
        height, width = (max(1, round(n * scale)) for n in self.shape)
        window = None if self.window is None else [round(v * scale) for v in self.window]
        sample = ProbabilityMap((height, width), self.base, window, self.patch).dense()
        inside = sample[sample >= threshold]
        confidence = float(inside.mean(dtype=np.float64)) if inside.size else None
        return _summary(mask, lambda: confidence)


@dataclass(frozen=True)
class LesionSummary:
    """Figures of one predicted mask; ``bbox`` is [x0, y0, x1, y1] with x1, y1 exclusive."""

    width: int
    height: int
    lesion_found: bool
    lesion_area_px: int
    lesion_fraction: float
    bbox: Optional[list[int]]
    mean_confidence: Optional[float]  # mean probability inside the predicted lesion

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(probs: np.ndarray, mask: np.ndarray) -> LesionSummary:
    """Area, fraction, bounding box and mean confidence of ``mask`` (bool, H x W)."""
    return _summary(mask, lambda: float(probs[mask].mean(dtype=np.float64)))


def _summary(mask: np.ndarray, confidence) -> LesionSummary:
    height, width = mask.shape
    area = int(np.count_nonzero(mask))
    if area == 0:
        return LesionSummary(width, height, False, 0, 0.0, None, None)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
    value = confidence()
    return LesionSummary(width, height, True, area, area / mask.size, bbox,
                         None if value is None else round(value, 6))


def outline_width(height: int, width: int) -> int:
    """3 px up to about 1500 px, wider on large photographs so that it stays visible when shown smaller."""
    return max(3, round(max(height, width) / 512))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2 radius + 1) square, one axis at a time; beyond the border counts as
    the border pixel. (Pillow's MinFilter gives the same, 20x slower on a 4288 x 2848 mask.)"""
    for axis in (0, 1):
        pad = [(radius, radius) if a == axis else (0, 0) for a in (0, 1)]
        mask = sliding_window_view(np.pad(mask, pad, mode="edge"), 2 * radius + 1, axis=axis).all(axis=-1)
    return mask


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The band of ``width`` pixels just inside the edge of ``mask``; the image border is no edge."""
    return mask & ~erode(mask, width)


def _label_font(image_height: int) -> ImageFont.ImageFont:
    from PIL import ImageFont  # only labels need it (and its FreeType module): kept off start-up

    try:
        return ImageFont.load_default(size=max(12, image_height // 16))
    except TypeError:  # Pillow < 10.1: only the small bitmap font
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, texts: tuple[str, ...], height: int, width: int, bottom: bool,
           fill: tuple[int, int, int], color: tuple[int, int, int], banner: bool) -> None:
    """The first of ``texts`` that fits the width (else the last), in a box at the top left, or in a
    full-width banner along the bottom edge."""
    font = _label_font(height)
    margin = max(2, height // 64)
    for text in texts:
        box = draw.textbbox((0, 0), text, font=font)
        if box[2] + 2 * margin <= width:
            break
    y = height - margin - box[3] if bottom else margin  # the box ends at the bottom edge
    x0, x1 = (0, width) if banner else (box[0], margin + box[2] + margin)
    draw.rectangle((x0, y + box[1] - margin, x1, y + box[3] + margin), fill=fill)
    draw.text((margin, y), text, fill=color, font=font)


def draw_overlay(rgb: np.ndarray, mask: np.ndarray, review: bool = False,
                 reliability: Optional[float] = None) -> Image.Image:
    """The image with the lesion outline drawn on it, or with a "no lesion found" label; with
    ``review``, an amber banner along the bottom edge says that the outline may be wrong (and gives
    ``reliability`` when known)."""
    height, width = mask.shape
    canvas = rgb.copy()
    if mask.any():
        canvas[outline(mask, outline_width(height, width))] = OUTLINE_COLOR
    image = Image.fromarray(canvas)
    if mask.any() and not review:
        return image
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    if not mask.any():
        _label(draw, ("no lesion found",), height, width, False, (0, 0, 0), (255, 255, 0), False)
    if review:
        score = "" if reliability is None else f" (reliability {reliability:.2f})"
        _label(draw, (f"REVIEW: outline may be wrong{score}", f"REVIEW{score}", "REVIEW"), height, width,
               True, REVIEW_COLOR, (0, 0, 0), True)
    return image
