"""A contact sheet of prepared pairs, mask outlines drawn on the images: ``scsonet data show``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .._io import atomic_path
from ..errors import ScsonetError
from .dataset import PreparedData

OUTLINE_RGB = (0, 255, 0)
_GAP = 4  # pixels between tiles


def mask_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boolean (H, W): foreground pixels within ``width`` of the background (the image border counts)."""
    inner = np.pad(mask.astype(bool), width, constant_values=False)
    eroded = inner.copy()
    h, w = mask.shape
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            eroded[width:-width, width:-width] &= inner[width + dy:width + dy + h, width + dx:width + dx + w]
    return mask.astype(bool) & ~eroded[width:-width, width:-width]


def make_grid(images: np.ndarray, masks: np.ndarray, ids: list[str], cols: int = 4) -> Image.Image:
    """uint8 images (N, H, W, 3) and {0, 1} masks (N, H, W) -> one RGB picture, IDs written on tiles."""
    n, h, w = masks.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    sheet = Image.new("RGB", (cols * (w + _GAP) + _GAP, rows * (h + _GAP) + _GAP), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k in range(n):
        tile = images[k].copy()
        tile[mask_outline(masks[k])] = OUTLINE_RGB
        x, y = _GAP + (k % cols) * (w + _GAP), _GAP + (k // cols) * (h + _GAP)
        sheet.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 3, y + 2), ids[k], fill=(255, 255, 0), stroke_width=1, stroke_fill=(0, 0, 0))
    return sheet


def write_grid(root: str | Path, out: str | Path, *, split: str = "train", n: int = 8, cols: int = 4,
               seed: int = 0) -> Path:
    """Draw ``n`` pairs of ``split`` (random with ``seed``; seed -1 = the first n) into ``out``."""
    if n < 1:
        raise ScsonetError(f"--n must be positive, got {n}")
    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise ScsonetError(f"{out}: unknown picture format (use .png or .jpg)")
    arrays = PreparedData(root).load(split)
    n = min(n, len(arrays))
    chosen = np.arange(n) if seed < 0 else np.sort(np.random.default_rng(seed).choice(len(arrays), n, replace=False))
    images = arrays.images[chosen].permute(0, 2, 3, 1).numpy()
    masks = arrays.masks[chosen, 0].numpy()
    sheet = make_grid(images, masks, [arrays.ids[i] for i in chosen], cols)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format=fmt)
    return out
