"""Decode images and lesion masks of any common form into fixed-size uint8 arrays.

EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit inputs become 8-bit RGB.
Images are resized with PIL's bilinear filter, which widens its support when shrinking (an
area-like average, no aliasing); masks are resized with nearest neighbour and then binarised.
A mask goes straight to the output size, as its image does: where the two files differ in size
(the shared ISIC 2017 copy keeps full-resolution masks beside downscaled images) that is the same
plain stretch as resizing the mask to its image first, with one resampling instead of two.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ScsonetError
from ..imageio import _pil_to_rgb as pil_to_rgb  # any mode, 16-bit and float rescaled

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# A mask with more than two values (JPEG noise, anti-aliased edges) is thresholded at half range,
# unless more than this fraction of its pixels is ambiguous (between 10 % and 90 % of the range).
_MAX_AMBIGUOUS_FRACTION = 0.01


def open_image(data: bytes, name: str) -> Image.Image:
    """Decode ``data`` fully and apply its EXIF orientation; ``name`` is used in errors."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        # exif_transpose copies even an upright image: costly for 30-megapixel masks.
        return ImageOps.exif_transpose(img) if img.getexif().get(_EXIF_ORIENTATION, 1) != 1 else img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ScsonetError(f"{name}: unreadable or not an image ({type(err).__name__}: {err})") from None


def read_image(data: bytes, name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Encoded image -> uint8 (H, W, 3), resized to ``size`` = (H, W) when given."""
    img = open_image(data, name)
    if img.mode != "RGB":
        img = Image.fromarray(pil_to_rgb(img))
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def binarize_mask(values: np.ndarray, full_range: int, name: str) -> np.ndarray:
    """Integer mask -> uint8 {0, 1}; raises if it is a label map or a soft (non-binary) mask.

    Two values or fewer, one of them 0: foreground is every non-zero pixel ({0,1}, {0,255},
    palette indices all work). More values: threshold at half of ``full_range``.
    """
    present = np.unique(values)
    if len(present) <= 2 and (len(present) == 1 or present[0] == 0):
        return (values > 0).astype(np.uint8)
    low, high = 0.1 * full_range, 0.9 * full_range
    if present[-1] < low:
        raise ScsonetError(f"{name}: mask is not binary (values {present.tolist()[:8]} look like class labels)")
    ambiguous = float(np.mean((values > low) & (values < high)))
    if ambiguous > _MAX_AMBIGUOUS_FRACTION:
        raise ScsonetError(f"{name}: mask is not binary ({ambiguous:.1%} of pixels are neither background nor lesion)")
    return (values >= full_range / 2).astype(np.uint8)


def read_mask(data: bytes, name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Encoded mask -> uint8 (H, W) in {0, 1}, nearest-resized to ``size`` = (H, W) when given.

    Resizing comes first: nearest neighbour creates no new values, and binarising the small
    array is much cheaper than the full-resolution one.
    """
    img = open_image(data, name)
    if img.mode in _SIXTEEN_BIT_MODES:
        img, full_range = img.convert("I"), 65535
    else:
        img, full_range = (img if img.mode == "L" else img.convert("L")), 255
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return binarize_mask(np.asarray(img), full_range, name)
