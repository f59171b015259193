"""Two-pass prediction for photos where the lesion is small in the frame.

The model runs at 256 x 256 and was trained on crops in which the lesion fills much of the frame
(ISIC 2017 train masks: the lesion's bounding box spans a median 0.50 of the image's longer side).
On a large photo of a small lesion, one pass sees the lesion as a few dozen pixels. Here:

1. pass 1 runs on the whole frame resized to the model's size and finds the lesion (the largest
   connected component of the thresholded map);
2. a square window around that component, ``context`` times its longer side (so that the lesion
   spans about 1 / ``context`` of the crop; training's median is 1/2), is cut from the
   FULL-resolution photo; a tight context (1.5) is kept only where its pass 2 lies inside the
   crop and shrinks pass 1's outline, else a wider one (3.0) is used (``_accepts``);
3. pass 2 runs on that crop resized to the model's size, and its probabilities are pasted back
   into a map at the photo's own size (outside the window: zero, see ``OUTSIDE``).

Pass 2 runs only where it can help: pass 1 found a lesion and the window covers at most
``max_crop_share`` of the frame. Otherwise pass 1 is returned unchanged, so a photo whose
lesion fills the frame gets exactly the single-pass result.

Torch-free (numpy and Pillow only): any ``scsonet.inference.Segmenter`` backend works.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .postprocess import ProbabilityMap, crop_resized, resize_image, threshold_resized

if TYPE_CHECKING:
    from .inference import Segmenter

__all__ = ["CONTEXT", "MAX_CROP_SHARE", "TwoPassInfo", "crop_window", "dice", "label_components",
           "largest_component", "two_pass_batch", "two_pass_maps", "two_pass_probabilities"]

# Crop side / pass-1 lesion box's longer side, tightest first (chosen on val: docs/robustness/twopass_v1.md).
# 1.5 zooms a lesion pasted small on a canvas back to training scale; 3.0 is the safe fallback.
CONTEXT = (1.5, 3.0)
GATE_BORDER = 0.02  # a tight crop's pass 2 may touch at most this share of the crop's border ...
GATE_SHRINK = 0.8  # ... and outline at most this share of pass 1's lesion area
MAX_CROP_SHARE = 0.7  # run pass 2 only if the crop covers at most this share of the frame
MIN_CROP_FRACTION = 0.125  # smallest crop side, as a share of the frame's shorter side
MIN_COMPONENT_PX = 4  # a pass-1 component smaller than this (at the model's size) is noise, not a lesion
OUTSIDE = "zero"  # outside the crop: "zero" (drops pass 1's stray blobs) or "pass1"


@dataclass
class TwoPassInfo:
    """What two-pass prediction did for one image; also the signals for the reliability score.

    ``crop`` is [x0, y0, x1, y1] in the image's pixels (x1, y1 exclusive), None if pass 1 found
    nothing. ``agreement`` is the Dice between the pass-1 and pass-2 masks inside the crop (None
    if pass 2 did not run); ``pass2_border`` the share of the crop's border pixels that pass 2
    called lesion (a lesion cut by the crop).
    """

    second_pass: bool
    reason: str  # why pass 2 ran or not: "ran", "no lesion", "fills frame", "crop rejected"
    crop: Optional[list[int]] = None
    crop_share: Optional[float] = None
    agreement: Optional[float] = None
    context: Optional[float] = None  # the context whose pass 2 was kept
    pass2_border: Optional[float] = None
    pass1_small: Optional[np.ndarray] = field(default=None, repr=False)  # pass-1 probabilities at the model's size
    # pass-2 probabilities at the model's size, set only where the final map is pass 2 in the crop and
    # zero outside it; with pass1_small and image_size, the maps the full-size map is resized from
    pass2_small: Optional[np.ndarray] = field(default=None, repr=False)
    image_size: Optional[tuple[int, int]] = None  # (height, width) of the image

    def to_dict(self) -> dict:
        """JSON-ready figures (without the probability maps)."""
        out = asdict(self)
        out.pop("pass1_small")
        out.pop("pass2_small")
        out.pop("image_size")
        return out


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool (H, W) mask -> (int32 labels, 0 = background; count).

    Works on horizontal runs: runs of adjacent rows that overlap are joined with a union-find, so
    the Python loop is over runs (hundreds), not pixels. Labels are numbered in raster order of
    each component's first run.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # same row-major order as the starts: runs pair up
    n = len(rows)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(h + 1))  # runs of row r: row_first[r]:row_first[r + 1]
    for r in range(h - 1):
        a, a_end = row_first[r], row_first[r + 1]
        b, b_end = row_first[r + 1], row_first[r + 2]
        while a < a_end and b < b_end:
            if starts[a] < ends[b] and starts[b] < ends[a]:  # the runs share a column
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends[a] <= ends[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    unique_roots, run_label = np.unique(roots, return_inverse=True)  # roots ascend in raster order
    labels = np.zeros((h, w), dtype=np.int32)
    for i in range(n):
        labels[rows[i], starts[i]:ends[i]] = run_label[i] + 1
    return labels, len(unique_roots)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (bool), all False if empty."""
    labels, count = label_components(mask)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def crop_window(box: Sequence[float], image_size: tuple[int, int], context: float = 2.0,
                min_fraction: float = MIN_CROP_FRACTION) -> list[int]:
    """Square window [x0, y0, x1, y1] centred on ``box`` (same form, image pixels), side ``context``
    times the box's longer side (at least ``min_fraction`` of the frame's shorter side), shifted
    to lie inside the image and clipped to it where the image is narrower than the side."""
    height, width = image_size
    x0, y0, x1, y1 = box
    side = max(context * max(x1 - x0, y1 - y0), min_fraction * min(height, width), 1.0)
    window = []
    for lo, hi, extent in ((x0, x1, width), (y0, y1, height)):
        length = min(int(round(side)), extent)
        start = min(max(int(round((lo + hi) / 2 - length / 2)), 0), extent - length)
        window.append((start, start + length))
    (cx0, cx1), (cy0, cy1) = window
    return [cx0, cy0, cx1, cy1]


def _border_share(mask: np.ndarray) -> float:
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(border.mean()) if border.size else 0.0


def _accepts(p2_mask: np.ndarray, pass1_area: int) -> bool:
    """A tight crop's pass 2 is kept only if its lesion lies inside the crop and is smaller than
    pass 1's: zooming in found the lesion within what pass 1 outlined (a photo pasted on a
    canvas, a patch of skin). Otherwise the tight crop cut the lesion or pass 2 outlined the
    whole crop, and the next, wider context is tried."""
    return _border_share(p2_mask) <= GATE_BORDER and int(p2_mask.sum()) <= GATE_SHRINK * pass1_area


def two_pass_maps(images: Sequence[np.ndarray], segmenter: Segmenter, *, threshold: float = 0.5,
                  context: float | Sequence[float] = CONTEXT, max_crop_share: float = MAX_CROP_SHARE,
                  outside: str = OUTSIDE, first: Optional[np.ndarray] = None) -> list[tuple[ProbabilityMap, TwoPassInfo]]:
    """Two-pass probabilities of RGB uint8 images of any sizes; each pass runs as one batch.

    ``context``: crop side / lesion box side; a sequence tries each in turn (tightest first), an
    earlier one kept only where ``_accepts`` its pass 2, the last one always. ``first``: pass-1
    probabilities (B, h, w) at the model's size if already computed (None: run pass 1 here).
    Returns, per image, its probabilities at the image's size (a ``ProbabilityMap``: no float map
    at full size is made) and its ``TwoPassInfo``. The masks that decide (pass 1's area, pass 2's
    border and agreement) are those the map gives, so a photo's outline is decided as it is drawn.
    """
    if outside not in ("zero", "pass1"):
        raise ValueError(f"outside must be 'zero' or 'pass1', got {outside!r}")
    contexts = [float(context)] if np.isscalar(context) else [float(c) for c in context]
    size = tuple(segmenter.input_size)
    if first is None:
        first = segmenter.predict_probs(np.stack([resize_image(rgb, size) for rgb in images]))
    elif len(first) != len(images) or tuple(first.shape[1:]) != size:
        raise ValueError(f"first: expected ({len(images)}, {size[0]}, {size[1]}) probabilities, got {first.shape}")
    results: list[tuple[ProbabilityMap, TwoPassInfo]] = []
    boxes: dict[int, tuple[float, float, float, float]] = {}  # pass-1 lesion box in image pixels
    for k, (rgb, p1) in enumerate(zip(images, first)):
        p1 = np.asarray(p1, dtype=np.float32)
        shape = tuple(rgb.shape[:2])
        pass1 = ProbabilityMap(shape, p1)
        lesion = largest_component(p1 >= threshold)
        if lesion.sum() < MIN_COMPONENT_PX:
            results.append((pass1, TwoPassInfo(False, "no lesion", pass1_small=p1, image_size=shape)))
            continue
        sy, sx = rgb.shape[0] / size[0], rgb.shape[1] / size[1]
        bx0, by0, bx1, by1 = _bbox(lesion)
        boxes[k] = (bx0 * sx, by0 * sy, bx1 * sx, by1 * sy)
        results.append((pass1, TwoPassInfo(False, "fills frame", pass1_small=p1, image_size=shape)))
    pending = list(boxes)
    for step, ctx in enumerate(contexts):
        last = step == len(contexts) - 1
        crops = []
        for k in pending:
            shape = images[k].shape[:2]
            window = crop_window(boxes[k], shape, ctx)
            share = (window[2] - window[0]) * (window[3] - window[1]) / (shape[0] * shape[1])
            info = results[k][1]
            info.crop, info.crop_share = window, round(share, 6)
            if share <= max_crop_share:
                crops.append((k, window))
            elif step:  # a tighter crop was rejected and this one covers too much: pass 1 stays
                info.reason = "crop rejected"
        if not crops:
            break
        batch = np.stack([crop_resized(images[k], window, size) for k, window in crops])
        pending = []
        for (k, window), p2_small in zip(crops, segmenter.predict_probs(batch)):
            pass1, info = results[k]
            x0, y0, x1, y1 = window
            p2_mask = threshold_resized(p2_small, (y1 - y0, x1 - x0), threshold)
            pass1_mask = pass1.mask(threshold)
            if not last and not _accepts(p2_mask, int(np.count_nonzero(pass1_mask))):
                pending.append(k)
                continue
            final = ProbabilityMap(pass1.shape, pass1.base if outside == "pass1" else None, window, p2_small)
            info.second_pass, info.reason, info.context = True, "ran", ctx
            info.pass2_small = final.patch if outside == "zero" else None
            info.agreement = round(dice(pass1_mask[y0:y1, x0:x1], p2_mask), 6)
            info.pass2_border = round(_border_share(p2_mask), 6)
            results[k] = (final, info)
    return results


def two_pass_batch(images: Sequence[np.ndarray], segmenter: Segmenter, **kwargs) -> list[tuple[np.ndarray, TwoPassInfo]]:
    """``two_pass_maps`` with each map made at full size: float32 (H, W) probabilities per image."""
    return [(probs.dense(), info) for probs, info in two_pass_maps(images, segmenter, **kwargs)]


def two_pass_probabilities(rgb: np.ndarray, segmenter: Segmenter, **kwargs) -> tuple[np.ndarray, TwoPassInfo]:
    """Two-pass probabilities of one RGB uint8 image (H, W, 3) at its own size, and what was done;
    keyword arguments as for ``two_pass_batch``."""
    return two_pass_batch([rgb], segmenter, **kwargs)[0]
