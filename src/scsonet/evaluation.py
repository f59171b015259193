"""Evaluate a model on a prepared split, or on a labelled folder: pooled and per-image metrics,
HD95, optional flip TTA.

Images are normalised with the WEIGHTS' preset (the mean/std the model was trained with), never
with statistics of the evaluated data. Metrics are computed at the resolution of the prepared
masks; if the preset resizes the images, the probabilities are resized back (bilinear) first.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._device import resolve_device
from ._io import write_json_atomic, write_text_atomic
from .errors import ScsonetError
from .imageio import TTA_FLIPS
from .metrics import MetricAccumulator, per_image_metrics, per_image_scores, pooled_metrics, summarize_hd95
from .models import LoadedModel
from .transforms import SegmentationPreset

if TYPE_CHECKING:
    from .inference import Segmenter

__all__ = ["evaluate", "evaluate_folder", "format_report", "predict_probs", "write_report", "REPORT_NAME", "PER_IMAGE_NAME"]

REPORT_NAME = "report.json"
PER_IMAGE_NAME = "per_image.csv"
PER_IMAGE_COLUMNS = ("id", "dice", "iou", "hd95", "tp", "fp", "fn", "tn")
# evaluate_folder's rows also carry what ``scsonet predict`` writes per image (its results.csv's fields)
PREDICT_COLUMNS = ("two_pass", "reliability", "review")



class SplitLike(Protocol):
    """What ``evaluate`` reads from ``scsonet.data.SplitArrays`` (tensors or numpy arrays)."""

    images: torch.Tensor | np.ndarray  # uint8 (N, 3, H, W)
    masks: torch.Tensor | np.ndarray  # uint8 (N, 1, H, W), {0, 1}
    ids: Sequence[str]


PresetLike = Union[SegmentationPreset, tuple[Sequence[float], Sequence[float]], None]


def predict_probs(model: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Sigmoid probabilities of normalised images ``x`` (N, 3, H, W) -> (N, 1, H, W) float32.

    With ``tta``, the mean of the probabilities over the four flips, each flipped back.
    """
    flips = TTA_FLIPS if tta else TTA_FLIPS[:1]
    return sum(_flip(torch.sigmoid(model(_flip(x, dims)).float()), dims) for dims in flips) / len(flips)


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.flip(dims) if dims else x


def _as_preset(preset: PresetLike, size: tuple[int, int]) -> SegmentationPreset:
    if isinstance(preset, SegmentationPreset):
        return preset
    if preset is None:
        raise ValueError("evaluate needs the weights' preprocessing: a SegmentationPreset or (mean, std)")
    mean, std = preset
    return SegmentationPreset.from_stats(mean, std, size)


def _protocol(meta: dict[str, Any]) -> str | None:
    """The training protocol ("honest" or "paper") if the checkpoint or card records it."""
    config = meta.get("config")
    return meta.get("protocol") or (config.get("protocol") if isinstance(config, dict) else None)


def _protocol_note(protocol: str | None, split: str | None) -> str | None:
    """Why figures on this split are not an unbiased estimate, when the protocol says so."""
    trained_on = {"honest": {"train"}, "paper": {"train", "val", "train+val"}}.get(protocol or "", set())
    selected_on = {"honest": "val", "paper": "test"}.get(protocol or "")
    if split in trained_on:
        return f"{protocol} protocol: the model was trained on this split"
    if split == selected_on:
        return f"{protocol} protocol: the checkpoint was selected on this split, so these figures are optimistic"
    return None


def evaluate(
        model: nn.Module | LoadedModel,
        arrays: SplitLike,
        preset: PresetLike = None,
        *,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        tta: bool = False,
        threshold: float = 0.5,
        hd95: bool = True,
        split: str | None = None,
        progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``model`` on one prepared split.

    Args:
        model: a network returning logits, or a ``LoadedModel`` (its preset, source and
            protocol then go into the report).
        arrays: the split: ``images`` uint8 (N, 3, H, W), ``masks`` uint8 (N, 1, H, W), ``ids``.
        preset: the weights' preprocessing, a ``SegmentationPreset`` or ``(mean, std)``;
            optional with a ``LoadedModel``.
        batch_size: images per forward pass (16).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ... (``"cpu"``).
        tta: average probabilities over identity, horizontal, vertical and both flips (False).
        threshold: lesion where the probability is at least this (0.5).
        hd95: compute the per-image 95th-percentile Hausdorff distance (True).
        split: the split's name, recorded in the report.
        progress: show a progress bar (False).

    Returns:
        ``(report, rows)``: the report dict (see ``write_report``) and one row per image with
        ``id, dice, iou, hd95, tp, fp, fn, tn``.
    """
    from tqdm import tqdm

    loaded = model if isinstance(model, LoadedModel) else None
    net = loaded.model if loaded else model
    num_images = len(arrays.ids)
    if num_images == 0:
        raise ScsonetError(f"split {split or '?'} holds no images")
    if arrays.images.shape[0] != num_images or arrays.masks.shape[0] != num_images:
        raise ScsonetError(f"split {split or '?'}: {num_images} ids but {arrays.images.shape[0]} images "
                           f"and {arrays.masks.shape[0]} masks")
    mask_size = tuple(arrays.masks.shape[-2:])
    preset = _as_preset(preset if preset is not None or loaded is None else loaded.preset, mask_size)
    device = resolve_device(device)
    was_training = net.training
    net.eval().to(device)
    acc = MetricAccumulator(threshold, hd95=hd95)
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, num_images, batch_size), desc="evaluate", unit="batch",
                              disable=not progress, leave=False):
                stop = start + batch_size
                images = torch.as_tensor(arrays.images[start:stop]).to(device)
                masks = torch.as_tensor(arrays.masks[start:stop]).to(device)
                probs = predict_probs(net, preset(images), tta)
                if tuple(probs.shape[-2:]) != mask_size:
                    probs = F.interpolate(probs, size=mask_size, mode="bilinear", align_corners=False)
                acc.update(probs, masks)
    finally:
        net.train(was_training)

    rows, metrics = _rows_and_metrics(acc, arrays.ids, hd95)
    report: dict[str, Any] = {
        "split": split,
        "n_images": num_images,
        **_model_fields(loaded, net),
        "threshold": threshold,
        "tta": tta,
        "resolution": list(mask_size),
        "preprocessing": preset.to_dict(),
        **metrics,
    }
    if note := _protocol_note(report["protocol"], split):
        report["note"] = note
    return report, rows


def _model_fields(loaded: LoadedModel | None, net: Any) -> dict[str, Any]:
    meta = loaded.meta if loaded else {}
    return {
        "weights": loaded.source if loaded else None,
        "model": loaded.name if loaded else type(net).__name__,
        "protocol": _protocol(meta),
        "checkpoint_epoch": meta.get("epoch"),  # as the checkpoint stores it (scsonet train: 0-based)
    }


def _rows_and_metrics(acc: MetricAccumulator, ids: Sequence[str], hd95: bool
                      ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-image rows and the report's ``pooled``, ``per_image`` and ``hd95_pixels`` entries."""
    stats = acc.stats
    dice, iou = per_image_scores(stats)
    hd95_values = acc.hd95_values if hd95 else [math.nan] * len(ids)
    rows = [{"id": str(image_id), "dice": float(d), "iou": float(j), "hd95": float(h),
             "tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)}
            for image_id, d, j, h, tp, fp, fn, tn in zip(ids, dice, iou, hd95_values, *stats)]
    metrics = {"pooled": pooled_metrics(stats), "per_image": per_image_metrics(stats),
               "hd95_pixels": summarize_hd95(acc.hd95_values) if hd95 else None}
    return rows, metrics


def evaluate_folder(
        model: LoadedModel | Segmenter,
        images: str | Path,
        masks: str | Path,
        *,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        tta: bool = False,
        threshold: float = 0.5,
        hd95: bool = True,
        skip_bad: bool = False,
        progress: bool = False,
        two_pass: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a labelled folder, each image at its mask's own resolution, as ``scsonet predict`` sees it.

    Images and masks are paired by stem and decoded as ``scsonet data prepare --dataset folder``
    does (a mask may carry a suffix such as ``_mask``; either folder may be a .zip): unpaired,
    duplicated, unreadable and non-binary files are bad inputs, fatal unless ``skip_bad``.
    Probabilities come from ``scsonet predict``'s function, ``scsonet.inference.predict_batch``
    (the image resized to the model's input, the map resized back to the image; with
    ``two_pass``, as ``scsonet predict`` by default, a lesion small in the frame gets a second
    pass on a crop of the image), then, where a mask's size differs from its image's, are
    stretched to the mask (a note says so). Each row also gets predict's ``two_pass``,
    ``reliability`` and ``review`` (None without a reliability model). With images at the
    model's input size and ``two_pass=False`` this gives the figures of ``evaluate`` on the same
    pairs prepared.

    Args:
        model: a ``LoadedModel`` (run by ``TorchSegmenter`` with the reliability model shipped
            beside its weights, as ``scsonet predict`` runs it) or any ``Segmenter`` backend (its
            ``reliability`` attribute, if any).
        images, masks: the image folder and the mask folder (or .zip archives).
        batch_size: images per forward pass (8).
        device: where a ``LoadedModel`` runs (``"cpu"``).
        tta: flip TTA of a ``LoadedModel``; another backend brings its own (False).
        threshold: lesion where the probability is at least this (0.5).
        hd95: compute the per-image HD95, in pixels of the mask (True).
        skip_bad: leave bad inputs out and list them in the report's ``skipped`` (False).
        progress: show a progress bar (False).
        two_pass: two-pass prediction, as ``scsonet predict`` (True).

    Returns:
        ``(report, rows)`` as ``evaluate`` returns them, the rows with ``PREDICT_COLUMNS`` added;
        the report also has ``images``, ``masks``, ``two_pass``, ``second_passes`` (images whose
        outline came from pass 2), ``reliability`` (how the scores were made, as predict's
        settings say it), ``reviews`` (images flagged for review), ``skipped``, ``warnings``
        (masks without foreground or background) and ``notes``; ``resolution`` is None when the
        masks differ in size.
    """
    from tqdm import tqdm

    from .data.layouts import list_folder_pairs
    from .data.prepare import _check_problems, _decode, _mask_warning
    from .inference import TorchSegmenter, assess, find_reliability_model, predict_batch, reliability_setting
    from .postprocess import resize_probabilities

    if batch_size < 1:
        raise ScsonetError(f"batch size {batch_size} must be at least 1")
    listing = list_folder_pairs(images, masks)
    problems = list(listing.problems)
    _check_problems(problems, skip_bad)  # pairing problems: fail before the slow part
    loaded = model if isinstance(model, LoadedModel) else None
    segmenter = (TorchSegmenter(loaded, resolve_device(device), tta, find_reliability_model(loaded.source))
                 if loaded else model)
    reliability = getattr(segmenter, "reliability", None)
    extra: list[dict[str, Any]] = []  # PREDICT_COLUMNS of each scored image
    acc = MetricAccumulator(threshold, hd95=hd95)
    ids: list[str] = []
    warnings: list[str] = []
    notes = list(listing.notes)
    sizes = set()
    pairs = listing.pairs
    with tqdm(total=len(pairs), desc="evaluate", unit="image", disable=not progress, leave=False) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = []
            for pair in pairs[start:start + batch_size]:
                _, image, mask, problem = _decode(pair, None)  # None: each file at its own size
                if problem:
                    problems.append(problem)
                else:
                    chunk.append((pair, image, mask))
                bar.update()
            if not chunk or (problems and not skip_bad):
                continue  # the run will fail: only look for further bad inputs, to name them all
            predicted = predict_batch([c[1] for c in chunk], segmenter, threshold, two_pass)
            for (pair, image, mask), (probs, info) in zip(chunk, predicted):
                # as predict scores it: on the map at the image's size, before any stretch to the mask
                extra.append({"two_pass": bool(info and info.second_pass), **assess(reliability, probs, info, threshold)})
                if probs.shape != mask.shape:
                    notes.append(f"{pair.id}: mask {mask.shape[1]}x{mask.shape[0]} differs from its image "
                                 f"{image.shape[1]}x{image.shape[0]}: scored at the mask's size, the "
                                 f"probabilities stretched to it ({pair.mask})")
                    probs = resize_probabilities(probs, mask.shape)
                acc.update(np.array(probs[None]), mask[None])  # a copy: a resized map is read-only
                if warning := _mask_warning(pair.id, mask, str(pair.mask)):
                    warnings.append(warning)
                ids.append(pair.id)
                sizes.add(mask.shape)
    _check_problems(problems, skip_bad)
    if not ids:
        raise ScsonetError(f"{images}: no pair could be scored")

    rows, metrics = _rows_and_metrics(acc, ids, hd95)
    rows = [{**row, **more} for row, more in zip(rows, extra)]
    preset = getattr(segmenter, "preset", None)
    report: dict[str, Any] = {
        "split": None,
        "images": str(images),
        "masks": str(masks),
        "n_images": len(ids),
        **_model_fields(loaded, segmenter),
        "threshold": threshold,
        "tta": bool(getattr(segmenter, "tta", tta)),
        "resolution": list(sizes.pop()) if len(sizes) == 1 else None,
        "preprocessing": preset.to_dict() if preset is not None else None,
        "two_pass": two_pass,
        "second_passes": sum(e["two_pass"] for e in extra),
        "reliability": reliability_setting(reliability, two_pass),
        "reviews": sum(bool(e["review"]) for e in extra) if reliability is not None else None,
        **metrics,
        "skipped": [{"file": p.file, "reason": p.reason, "id": p.id} for p in problems],
        "warnings": sorted(warnings),
        "notes": notes,
    }
    return report, rows


def _csv_cell(key: str, value: Any) -> Any:
    if value is None:  # no reliability model: an empty cell, as in predict's results.csv
        return ""
    if isinstance(value, float) and key not in PREDICT_COLUMNS:  # predict's columns as predict writes them
        return "" if math.isnan(value) else f"{value:.6f}"
    return value


def write_report(report: dict[str, Any], rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``per_image.csv`` (NaN HD95 and None as empty cells) into ``out_dir``,
    atomically; the CSV has ``PREDICT_COLUMNS`` too where the rows have them (``evaluate_folder``)."""
    out_dir = Path(out_dir)
    columns = PER_IMAGE_COLUMNS + tuple(c for c in PREDICT_COLUMNS if rows and c in rows[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _csv_cell(key, row[key]) for key in columns} for row in rows)
    report_path, rows_path = out_dir / REPORT_NAME, out_dir / PER_IMAGE_NAME
    write_text_atomic(rows_path, buffer.getvalue())
    write_json_atomic(report_path, report)
    return report_path, rows_path


def format_report(report: dict[str, Any]) -> str:
    """A readable table of every metric in ``report``: percentages with 2 decimals, HD95 in pixels."""
    pooled, per_image, hd = report["pooled"], report["per_image"], report["hd95_pixels"]
    where = f"split {report['split'] or '?'}" if report.get("images") is None else \
        f"images {report['images']} with masks {report['masks']}"
    header = (f"{where}, {report['n_images']} images, threshold {report['threshold']:.2f}, "
              f"TTA {'on' if report['tta'] else 'off'}, protocol {report['protocol'] or 'unknown'}")
    if "two_pass" in report:  # a folder, scored through scsonet predict's path
        header += (f"\nscsonet predict's path, two-pass {'on' if report['two_pass'] else 'off'}"
                   f" (pass 2 ran on {report['second_passes']})"
                   + (f", {report['reviews']} flagged for review (reliability {report['reliability']})"
                      if report.get("reliability") else ", no reliability model"))
    lines = [f"weights: {report['weights'] or report['model']}", header, ""]
    table = [
        ("IoU of the lesion, pooled (paper 'mIoU')", f"{100 * pooled['miou']:.2f} %"),
        ("DSC, pooled", f"{100 * pooled['dsc']:.2f} %"),
        ("accuracy, pooled", f"{100 * pooled['accuracy']:.2f} %"),
        ("sensitivity, pooled", f"{100 * pooled['sensitivity']:.2f} %"),
        ("specificity, pooled", f"{100 * pooled['specificity']:.2f} %"),
        ("Dice per image, mean ± std", f"{100 * per_image['dice_mean']:.2f} ± {100 * per_image['dice_std']:.2f} %"),
        ("IoU per image, mean ± std", f"{100 * per_image['iou_mean']:.2f} ± {100 * per_image['iou_std']:.2f} %"),
    ]
    if hd is not None:
        value = "n/a" if hd["mean"] is None else f"{hd['mean']:.2f} / {hd['median']:.2f}"
        table.append(("HD95 in pixels, mean / median", f"{value}  ({hd['n']} images, {hd['undefined']} undefined)"))
    width = max(len(name) for name, _ in table)
    lines += [f"{'metric':<{width}}  value", "-" * (width + 24)]
    lines += [f"{name:<{width}}  {value}" for name, value in table]
    if hd is not None and hd["undefined"]:
        lines.append("(HD95 is undefined where exactly one of prediction and mask is empty; left out of mean/median)")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)
