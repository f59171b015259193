"""Controlled shifts of labelled images that mimic real photos, for the robustness benchmark.

Each transform maps an image (H, W, 3) uint8 RGB and its mask (H, W) uint8 {0, 1} to a new
pair, with the mask following every geometric change, and draws whatever it needs from the
``numpy.random.Generator`` it is given: :func:`shifted_pairs` seeds one per (seed, shift, image
ID), so a shift of an image is the same on every run, in any order, on any machine. Strengths
are fractions of the image's side, so the shifts mean the same at any resolution.

``STANDARD_SHIFTS`` is the benchmark's list (``benchmarks/robustness.py``): zoom-out on a flat
canvas and on real skin from other images, the small-lesion subset, zoom-in, photometric
changes, blur, JPEG, 90-degree rotations and a dermoscope's black frame. ``SIZE_BANDS`` are the
lesion-size bands reported on the unshifted split. Torch-free: numpy and Pillow only.
"""
from __future__ import annotations

import inspect
import io
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["SIZE_BANDS", "STANDARD_SHIFTS", "Shift", "blur", "border_colour", "cleanest_quarter", "colour_temperature",
           "brightness", "contrast", "dermoscope_frame", "donor_pool", "get_shifts", "image_rng", "jpeg",
           "lesion_fraction", "resize_pair", "rotate90", "shifted_pairs", "size_band", "skin_canvas", "zoom_in",
           "zoom_out"]

Pair = tuple[np.ndarray, np.ndarray]

# Lesion share of the image: (name, low inclusive, high exclusive); the last band includes 1.
SIZE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<5 %", 0.0, 0.05), ("5-30 %", 0.05, 0.30), ("30-60 %", 0.30, 0.60), (">60 %", 0.60, 1.0))
SMALL_LESION = 0.05
# A donor image for a skin canvas: its cleanest quarter holds at most this share of lesion.
DONOR_MAX_LESION = 0.01
DONOR_MAX_DARK = 0.05


def lesion_fraction(mask: np.ndarray) -> float:
    """The share of the image's pixels that are lesion."""
    return float(np.count_nonzero(mask)) / mask.size


def size_band(mask: np.ndarray) -> str:
    """The ``SIZE_BANDS`` name of the mask's lesion share."""
    fraction = lesion_fraction(mask)
    for name, low, high in SIZE_BANDS:
        if low <= fraction < high:
            return name
    return SIZE_BANDS[-1][0]  # a mask that is all lesion


def image_rng(seed: int, key: str, image_id: str) -> np.random.Generator:
    """A generator fixed by (seed, key, image ID): stable across runs, orders and platforms."""
    return np.random.default_rng([seed, zlib.crc32(key.encode()), zlib.crc32(str(image_id).encode())])


def resize_pair(image: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> Pair:
    """Resize to ``size`` = (H, W): the image bilinear (area-like when shrinking), the mask as a
    bilinear-resampled share of lesion thresholded at one half, so its area scales as the image's."""
    if image.shape[:2] == tuple(size):
        return image, mask
    wh = (size[1], size[0])
    out_image = np.asarray(Image.fromarray(image).resize(wh, Image.Resampling.BILINEAR))
    share = np.asarray(Image.fromarray(mask.astype(np.float32)).resize(wh, Image.Resampling.BILINEAR))
    return out_image, (share >= 0.5).astype(np.uint8)


def border_colour(image: np.ndarray, width: float = 0.04) -> np.ndarray:
    """Mean RGB (float, 3) of the ring of ``width`` x the shorter side along the image's edges."""
    h, w = image.shape[:2]
    k = max(1, round(width * min(h, w)))
    ring = np.ones((h, w), bool)
    ring[k:h - k, k:w - k] = False
    return image[ring].mean(axis=0)


def cleanest_quarter(mask: np.ndarray) -> tuple[slice, slice]:
    """(rows, cols) of the image quarter (top-left, top-right, bottom-left, bottom-right) holding the
    fewest lesion pixels; the first of these in that order on a tie."""
    h, w = mask.shape
    quarters = [(slice(y, y + h // 2), slice(x, x + w // 2)) for y in (0, h - h // 2) for x in (0, w - w // 2)]
    return min(quarters, key=lambda q: int(np.count_nonzero(mask[q])))


def skin_canvas(donor_image: np.ndarray, donor_mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Real skin: the cleanest quarter (:func:`cleanest_quarter`) of a donor image, enlarged to ``size``."""
    quarter = donor_image[cleanest_quarter(donor_mask)]
    return np.asarray(Image.fromarray(quarter).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def donor_pool(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], max_lesion: float = DONOR_MAX_LESION,
               max_dark: float = DONOR_MAX_DARK) -> list[int]:
    """Indices of images fit to lend skin: their cleanest quarter holds at most ``max_lesion``
    lesion (a canvas adds almost no unlabelled lesion) and at most ``max_dark`` near-black pixels
    (every channel under 50: a dermoscope's frame, which is a shift of its own, not skin). All
    indices if fewer than two qualify."""
    def fits(image: np.ndarray, mask: np.ndarray) -> bool:
        quarter = cleanest_quarter(mask)
        dark = float(np.mean((image[quarter] < 50).all(axis=-1)))
        return lesion_fraction(mask[quarter]) <= max_lesion and dark <= max_dark

    pool = [i for i, (image, mask) in enumerate(zip(images, masks)) if fits(image, mask)]
    return pool if len(pool) >= 2 else list(range(len(masks)))


def _off_centre(free: int, rng: np.random.Generator) -> int:
    """A start in 0..free whose offset from the centred start is 1/2 to all of the largest possible."""
    offset = rng.uniform(0.5, 1.0) * free / 2 * rng.choice((-1, 1))
    return int(round(free / 2 + offset))


def zoom_out(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, scale: float,
             canvas: Optional[np.ndarray] = None) -> Pair:
    """Zoom out: the pair shrunk to ``scale`` of its side and placed off-centre on a canvas of its size.

    The canvas is flat, of the image border's mean colour (:func:`border_colour`), or the
    given one (e.g. :func:`skin_canvas` of another image). Along each axis the shrunk image's
    offset from the centre is drawn uniformly between 1/2 and all of the largest one that keeps
    it inside, with a random sign: never centred, never cut. The lesion's area becomes about
    ``scale**2`` of its own; the canvas is background.
    """
    h, w = mask.shape
    small_h, small_w = max(1, round(h * scale)), max(1, round(w * scale))
    small_image, small_mask = resize_pair(image, mask, (small_h, small_w))
    if canvas is None:
        out = np.empty_like(image)
        out[:] = np.rint(border_colour(image)).astype(np.uint8)
    else:
        out = np.array(canvas, dtype=np.uint8)
    out_mask = np.zeros_like(mask)
    y, x = _off_centre(h - small_h, rng), _off_centre(w - small_w, rng)
    out[y:y + small_h, x:x + small_w] = small_image
    out_mask[y:y + small_h, x:x + small_w] = small_mask
    return out, out_mask


def zoom_in(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: float = 0.6,
            margin: float = 0.15) -> Pair:
    """Zoom in: an off-centre crop of ``crop`` of the side (1/crop x magnification), enlarged back.

    The crop cuts away the lesion's surroundings: it holds the lesion's centroid at least
    ``margin`` of the crop side from its edges, at a uniform position otherwise, so the lesion
    sits anywhere in the frame and a large one is cut by it. Without a lesion, the crop is
    anywhere.
    """
    h, w = mask.shape
    ch, cw = max(1, round(h * crop)), max(1, round(w * crop))
    ys, xs = np.nonzero(mask)
    centre = (ys.mean(), xs.mean()) if ys.size else (None, None)
    starts = []
    for c, side, size in zip(centre, (ch, cw), (h, w)):
        if c is None:
            starts.append(int(rng.integers(0, size - side + 1)))
            continue
        low, high = max(0.0, c - side * (1 - margin)), min(size - side, c - side * margin)
        start = rng.uniform(low, high) if low <= high else np.clip(c - side / 2, 0, size - side)
        starts.append(int(round(start)))
    y, x = starts
    return resize_pair(image[y:y + ch, x:x + cw], mask[y:y + ch, x:x + cw], (h, w))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def brightness(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, factor: float) -> Pair:
    """Exposure: every channel times ``factor`` (clipped), as an under- or over-exposed photo."""
    return _to_uint8(image.astype(np.float32) * factor), mask


def contrast(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, factor: float) -> Pair:
    """Contrast: distances from the image's mean grey scaled by ``factor`` (< 1 flat, > 1 harsh)."""
    x = image.astype(np.float32)
    grey = float((x @ np.array([0.299, 0.587, 0.114], np.float32)).mean())
    return _to_uint8((x - grey) * factor + grey), mask


def colour_temperature(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, shift: float) -> Pair:
    """White balance: red times ``1 + shift`` and blue times ``1 - shift`` (``shift`` > 0 warmer,
    as under tungsten light; < 0 cooler, as in shade); green unchanged."""
    gains = np.array([1 + shift, 1.0, 1 - shift], np.float32)
    return _to_uint8(image.astype(np.float32) * gains), mask


def blur(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, sigma: float = 1 / 128) -> Pair:
    """Defocus: a Gaussian blur of standard deviation ``sigma`` x the shorter side (2 px at 256)."""
    radius = sigma * min(image.shape[:2])
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius))), mask


def jpeg(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, quality: int = 30) -> Pair:
    """Compression: encoded and decoded as JPEG at ``quality`` (Pillow's default 4:2:0 chroma)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB")), mask


def rotate90(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> Pair:
    """Orientation: rotated by 90, 180 or 270 degrees (drawn per image), the mask with it; exact."""
    k = int(rng.integers(1, 4))
    return np.ascontiguousarray(np.rot90(image, k)), np.ascontiguousarray(np.rot90(mask, k))


def dermoscope_frame(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                     radius: tuple[float, float] = (0.45, 0.55), shift: float = 0.05, edge: float = 0.02) -> Pair:
    """A contact dermoscope's black circular frame.

    Outside a circle of radius drawn in ``radius`` x the shorter side, its centre off the
    image's by up to ``shift`` of the side along each axis, the image turns near-black (level
    0..12, with noise of +-3), over a soft edge ``edge`` of the side wide. The lesion under the
    frame is no longer visible, so it leaves the mask (where the frame covers over half).
    """
    h, w = mask.shape
    side = min(h, w)
    r = rng.uniform(*radius) * side
    cy, cx = h / 2 + rng.uniform(-shift, shift) * side, w / 2 + rng.uniform(-shift, shift) * side
    yy, xx = np.mgrid[:h, :w]
    distance = np.hypot(yy + 0.5 - cy, xx + 0.5 - cx)
    inside = np.clip((r - distance) / max(edge * side, 1.0) + 0.5, 0.0, 1.0)[..., None]
    black = rng.uniform(0, 12) + rng.uniform(-3, 3, size=image.shape)
    out = image.astype(np.float32) * inside + black * (1 - inside)
    return _to_uint8(out), (mask * (inside[..., 0] >= 0.5)).astype(np.uint8)


Transform = Callable[..., Pair]  # (image, mask, rng[, canvas=...]) -> (image, mask)


@dataclass(frozen=True)
class Shift:
    """One row of the benchmark.

    Args:
        name: key in files and on the command line.
        label: the table's row name.
        transform: ``(image, mask, rng) -> (image, mask)``; None leaves the images as they are.
        keep: only images whose unshifted mask passes this are included (None: all).
        skin: the transform takes ``canvas=``, a :func:`skin_canvas` of another image.
        rng_key: seeds the draws (default ``name``): shifts sharing it draw the same placement.
    """

    name: str
    label: str
    transform: Optional[Transform] = None
    keep: Optional[Callable[[np.ndarray], bool]] = None
    skin: bool = False
    rng_key: Optional[str] = None

    @property
    def description(self) -> str:
        """How the shift is built, in one line: its transform's docstring with its settings, and
        for a skin shift how the canvas is made (empty for an unchanged subset)."""
        func = getattr(self.transform, "func", self.transform)
        if func is None:
            return ""
        parts = [func.__doc__ or ""]
        if self.skin:
            parts += ["Canvas: " + (skin_canvas.__doc__ or ""), f"Donors (max_lesion={DONOR_MAX_LESION}, max_dark={DONOR_MAX_DARK}): " + (donor_pool.__doc__ or "")]
        values = {name: p.default for name, p in inspect.signature(func).parameters.items()
                  if p.default is not inspect.Parameter.empty and name != "canvas"}
        values.update(getattr(self.transform, "keywords", {}))
        settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        text = " ".join(" ".join(part.replace(":func:", "").split()) for part in parts)
        return f"{text} Settings: {settings}." if settings else text


STANDARD_SHIFTS: tuple[Shift, ...] = (
    Shift("none", "as prepared"),
    Shift("small_lesions", "small lesions (< 5 % of the image), unchanged",
          keep=lambda m: lesion_fraction(m) < SMALL_LESION),
    Shift("zoom_out_flat_2", "zoom out to 1/2, off-centre, flat canvas", partial(zoom_out, scale=1 / 2),
          rng_key="zoom_out_2"),
    Shift("zoom_out_flat_3", "zoom out to 1/3, off-centre, flat canvas", partial(zoom_out, scale=1 / 3),
          rng_key="zoom_out_3"),
    Shift("zoom_out_skin_2", "zoom out to 1/2, off-centre, real skin", partial(zoom_out, scale=1 / 2), skin=True,
          rng_key="zoom_out_2"),
    Shift("zoom_out_skin_3", "zoom out to 1/3, off-centre, real skin", partial(zoom_out, scale=1 / 3), skin=True,
          rng_key="zoom_out_3"),
    Shift("zoom_in", "zoom in 1.67x, off-centre crop", partial(zoom_in, crop=0.6)),
    Shift("darker", "darker (x 0.6)", partial(brightness, factor=0.6)),
    Shift("brighter", "brighter (x 1.4)", partial(brightness, factor=1.4)),
    Shift("low_contrast", "low contrast (x 0.6)", partial(contrast, factor=0.6)),
    Shift("high_contrast", "high contrast (x 1.5)", partial(contrast, factor=1.5)),
    Shift("warm", "warmer white balance (R +15 %, B -15 %)", partial(colour_temperature, shift=0.15)),
    Shift("cool", "cooler white balance (R -15 %, B +15 %)", partial(colour_temperature, shift=-0.15)),
    Shift("blur", "blur (sigma 1/128 of the side)", partial(blur, sigma=1 / 128)),
    Shift("jpeg30", "JPEG quality 30", partial(jpeg, quality=30)),
    Shift("rot90", "rotation by 90, 180 or 270 degrees", rotate90),
    Shift("frame", "dermoscope's black circular frame", dermoscope_frame),
)


def get_shifts(names: Optional[Sequence[str]] = None) -> list[Shift]:
    """The standard shifts, or those named, in the given order; raises ``KeyError`` naming an unknown one."""
    by_name = {s.name: s for s in STANDARD_SHIFTS}
    if names is None:
        return list(STANDARD_SHIFTS)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown shift(s) {', '.join(unknown)} (choose from {', '.join(by_name)})")
    return [by_name[n] for n in names]


def shifted_pairs(shift: Shift, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], ids: Sequence[str],
                  seed: int = 0, donors: Optional[list[int]] = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(index, image, mask)`` of each image of a split that ``shift`` keeps, shifted.

    Draws for image ``i`` come from :func:`image_rng` (seed, ``shift.rng_key``, ``ids[i]``). A
    skin shift's donor is another image of the same split, drawn from ``donors`` (default
    :func:`donor_pool` of the split) by a generator of its own, so every skin shift of an image
    uses the same donor, and the same placement as the flat shift sharing its ``rng_key``.
    """
    if shift.skin and donors is None:
        donors = donor_pool(images, masks)
    for i, (image, mask, image_id) in enumerate(zip(images, masks, ids)):
        if shift.keep is not None and not shift.keep(mask):
            continue
        if shift.transform is None:
            yield i, image, mask
            continue
        rng = image_rng(seed, shift.rng_key or shift.name, image_id)
        kwargs = {}
        if shift.skin:
            others = sorted((d for d in donors if d != i), key=lambda d: str(ids[d]))  # by ID: order-free
            if not others:
                raise ValueError("a skin shift needs a split of at least two images")
            donor = others[int(image_rng(seed, "donor", image_id).integers(len(others)))]
            kwargs["canvas"] = skin_canvas(images[donor], masks[donor], mask.shape)
        yield (i, *shift.transform(image, mask, rng, **kwargs))
