"""Segmentation metrics as pure functions over per-image confusion counts (smp's ``get_stats`` idea).

Two reductions, both reported (smp's ``micro`` and ``micro-imagewise``):

- pooled ("micro"): ONE confusion matrix summed over every pixel of every image. The paper's
  "mIoU" is the lesion IoU ``TP / (TP + FP + FN)`` of that matrix, DSC ``2TP / (2TP + FP + FN)``;
  accuracy, sensitivity and specificity come from the same matrix. This is what the published
  SCSONet / EGE-UNet tables report.
- per image ("micro-imagewise"): Dice and IoU of each image, then their mean and standard
  deviation over images (the ISIC challenge's view; lower, since small lesions weigh as much as
  large ones).

Conventions (as smp's ``zero_division=1``): a ratio whose denominator is 0 scores 1. For Dice and
IoU that is an image with no lesion and nothing predicted, which is a perfect answer; for
sensitivity it is a set without lesion pixels, for specificity one without background pixels.

Predictions are ``probs >= threshold`` (the published code's rule). HD95 is measured in pixels of
the evaluated masks.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

__all__ = ["ConfusionStats", "MetricAccumulator", "get_stats", "hd95", "per_image_metrics",
           "per_image_scores", "pooled_metrics", "summarize_hd95"]

ArrayLike = Union[torch.Tensor, np.ndarray]


class ConfusionStats(NamedTuple):
    """Per-image confusion counts, each an int64 tensor of shape (N,)."""

    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    tn: torch.Tensor

    @classmethod
    def cat(cls, parts: Sequence["ConfusionStats"]) -> "ConfusionStats":
        """Concatenate the counts of several batches, in order."""
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64)
            return cls(empty, empty, empty, empty)
        return cls(*(torch.cat(column) for column in zip(*parts)))


def get_stats(probs_or_preds: ArrayLike, masks: ArrayLike, threshold: float = 0.5) -> ConfusionStats:
    """Per-image TP, FP, FN, TN of a binary lesion prediction.

    Args:
        probs_or_preds: (N, ...) probabilities in [0, 1] (float, thresholded at ``threshold``),
            or predictions already binary (bool or integer {0, 1}).
        masks: ground truth, same shape, bool or integer {0, 1}; float targets are rejected so
            that a soft or 0..255 mask cannot pass unnoticed.
        threshold: a pixel is lesion where ``prob >= threshold`` (0.5).

    Returns:
        ``ConfusionStats(tp, fp, fn, tn)``, int64 tensors of shape (N,) on the input's device.
    """
    preds, masks = torch.as_tensor(probs_or_preds), torch.as_tensor(masks)
    if masks.is_floating_point() or masks.is_complex():
        raise ValueError(f"masks must be bool or integer {{0, 1}}, got {masks.dtype}")
    if preds.shape != masks.shape or preds.ndim < 2:
        raise ValueError(f"predictions {tuple(preds.shape)} and masks {tuple(masks.shape)} must share an (N, ...) shape")
    if masks.numel() and (masks.min() < 0 or masks.max() > 1):
        raise ValueError("masks must hold only 0 and 1 (is it a 0..255 mask?)")
    if preds.is_floating_point():
        preds = preds >= threshold
    elif preds.numel() and (preds.min() < 0 or preds.max() > 1):
        raise ValueError("integer predictions must hold only 0 and 1")
    preds, masks = preds.bool().flatten(1), masks.bool().flatten(1)
    tp = (preds & masks).sum(1, dtype=torch.int64)
    fp = preds.sum(1, dtype=torch.int64) - tp
    fn = masks.sum(1, dtype=torch.int64) - tp
    tn = preds.shape[1] - tp - fp - fn
    return ConfusionStats(tp, fp, fn, tn)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` in float64, 1 where ``den == 0`` (see the module docstring)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num))


def pooled_metrics(stats: ConfusionStats) -> dict[str, float]:
    """The paper's five metrics from one confusion matrix pooled over all pixels of all images.

    Returns ``{"miou", "dsc", "accuracy", "sensitivity", "specificity"}`` as fractions in [0, 1];
    ``miou`` is the IoU of the lesion class (the paper's name for it).
    """
    tp, fp, fn, tn = (column.sum() for column in stats)
    return {
        "miou": _ratio(tp, tp + fp + fn).item(),
        "dsc": _ratio(2 * tp, 2 * tp + fp + fn).item(),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn).item(),
        "sensitivity": _ratio(tp, tp + fn).item(),
        "specificity": _ratio(tn, tn + fp).item(),
    }


def per_image_scores(stats: ConfusionStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of each image (float64, shape (N,)); an empty mask predicted empty scores 1."""
    tp, fp, fn, _ = stats
    return _ratio(2 * tp, 2 * tp + fp + fn), _ratio(tp, tp + fp + fn)


def per_image_metrics(stats: ConfusionStats) -> dict[str, float]:
    """Mean and population standard deviation (ddof 0) over images of per-image Dice and IoU.

    Returns ``{"dice_mean", "dice_std", "iou_mean", "iou_std"}``; NaN for zero images.
    """
    dice, iou = per_image_scores(stats)
    out = {}
    for name, scores in (("dice", dice), ("iou", iou)):
        empty = scores.numel() == 0
        out[f"{name}_mean"] = math.nan if empty else scores.mean().item()
        out[f"{name}_std"] = math.nan if empty else scores.std(correction=0).item()
    return out


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask; pixels on the image edge count as boundary."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)


def hd95(pred: ArrayLike, target: ArrayLike) -> float:
    """95th-percentile symmetric Hausdorff distance, in pixels, between the two masks' boundaries.

    ``max(P95 of d(pred boundary -> target boundary), P95 of d(target boundary -> pred boundary))``,
    Euclidean, with the percentile linearly interpolated (``numpy.percentile``). This is MONAI's
    ``percentile=95`` form; medpy's ``hd95`` takes one percentile of both directions pooled,
    which can be slightly lower.

    Args:
        pred, target: 2-D masks (H, W), bool or {0, 1}; singleton leading axes are squeezed.

    Returns:
        The distance; 0.0 if both masks are empty (nothing to disagree about); NaN if exactly
        one is empty (undefined: :func:`summarize_hd95` leaves it out and counts it).
    """
    from scipy import ndimage

    pred = np.asarray(torch.as_tensor(pred).cpu()).squeeze().astype(bool)
    target = np.asarray(torch.as_tensor(target).cpu()).squeeze().astype(bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"hd95 needs two 2-D masks of one shape, got {pred.shape} and {target.shape}")
    has_pred, has_target = pred.any(), target.any()
    if not has_pred and not has_target:
        return 0.0
    if not has_pred or not has_target:
        return math.nan
    pred_edge, target_edge = _boundary(pred), _boundary(target)
    # distance from every pixel to the nearest boundary pixel of the other mask
    to_target = ndimage.distance_transform_edt(~target_edge)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge)[target_edge]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))


def summarize_hd95(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and median of the defined HD95 values; ``n`` used, ``undefined`` (one mask empty) left out."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return {
        "mean": float(defined.mean()) if defined.size else None,
        "median": float(np.median(defined)) if defined.size else None,
        "n": int(defined.size),
        "undefined": int(values.size - defined.size),
    }


class MetricAccumulator:
    """Collects per-image confusion counts (and optionally HD95) batch by batch.

    ``update`` is cheap: counts are computed on the batch's device and moved to the CPU as four
    integers per image. HD95 needs a distance transform per image on the CPU, so it is off unless
    asked for.

    Args:
        threshold: probability at or above which a pixel is lesion (0.5).
        hd95: also compute the per-image HD95 (False).
    """

    def __init__(self, threshold: float = 0.5, hd95: bool = False):
        self.threshold = threshold
        self.with_hd95 = hd95
        self._stats: list[ConfusionStats] = []
        self._hd95: list[float] = []

    def reset(self) -> None:
        self._stats.clear()
        self._hd95.clear()

    def update(self, probs_or_preds: ArrayLike, masks: ArrayLike) -> ConfusionStats:
        """Add one batch, (N, 1, H, W) or (N, H, W); returns this batch's counts."""
        stats = get_stats(probs_or_preds, masks, self.threshold)
        stats = ConfusionStats(*(column.cpu() for column in stats))
        self._stats.append(stats)
        if self.with_hd95:
            preds = torch.as_tensor(probs_or_preds)
            preds = preds >= self.threshold if preds.is_floating_point() else preds.bool()
            preds, masks = preds.cpu().numpy(), torch.as_tensor(masks).cpu().numpy()
            self._hd95.extend(hd95(p, m) for p, m in zip(preds, masks))
        return stats

    @property
    def stats(self) -> ConfusionStats:
        """All counts so far, concatenated in update order."""
        return ConfusionStats.cat(self._stats)

    @property
    def hd95_values(self) -> list[float]:
        return list(self._hd95)

    def compute(self) -> dict[str, float]:
        """Flat dict: pooled ``miou, dsc, accuracy, sensitivity, specificity``, per-image
        ``dice_mean, dice_std, iou_mean, iou_std``, ``n_images``, and ``hd95_*`` when enabled."""
        stats = self.stats
        out: dict[str, float] = {**pooled_metrics(stats), **per_image_metrics(stats), "n_images": len(stats.tp)}
        if self.with_hd95:
            out.update({f"hd95_{k}": v for k, v in summarize_hd95(self._hd95).items()})
        return out
