"""From an image to the model's input size and back: resizing, thresholding, lesion figures, overlays.

Torch-free (numpy and Pillow only): every backend (PyTorch, ONNX Runtime) shares these steps,
so they give the same masks from the same probabilities.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

if TYPE_CHECKING:
    from PIL import ImageDraw, ImageFont

__all__ = ["LesionSummary", "REVIEW_COLOR", "crop_resized", "draw_overlay", "erode", "outline", "probabilities_to_uint8", "resize_image",
           "resize_probabilities", "summarize"]

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
    return np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)


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
    height, width = mask.shape
    area = int(mask.sum())
    if area == 0:
        return LesionSummary(width, height, False, 0, 0.0, None, None)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
    confidence = float(probs[mask].mean(dtype=np.float64))
    return LesionSummary(width, height, True, area, area / mask.size, bbox, round(confidence, 6))


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
