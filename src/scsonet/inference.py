"""Segment images: a pipeline over a small backend protocol, the PyTorch backend, ``segment()``
and the sample images shipped with the package.

The model runs at its preset size (256 x 256): each image is resized to it (bilinear,
antialiased), and the probability map is resized back to the image's size (bilinear) before
thresholding. Importing this module does not import torch (only ``TorchSegmenter`` and
``segment`` do), so an ONNX Runtime backend can reuse ``predict_files`` without PyTorch.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

from ._io import atomic_path, write_json_atomic, write_text_atomic
from .errors import ScsonetError
from .imageio import IMAGE_SUFFIXES, ImageLike, expand_inputs, read_image, to_rgb_array
from .postprocess import (draw_overlay, probabilities_to_uint8, resize_image, resize_probabilities,
                          summarize)

if TYPE_CHECKING:
    import torch

    from .models import LoadedModel

__all__ = ["RESULT_FIELDS", "Segmenter", "TorchSegmenter", "predict_files", "predict_probabilities",
           "sample_images", "segment"]

RESULT_FIELDS = ["file", "status", "error", "width", "height", "lesion_found", "lesion_area_px",
                 "lesion_fraction", "bbox", "mean_confidence"]
PROBABILITY_FORMATS = ("png", "npy")


class Segmenter(Protocol):
    """What the pipeline needs from a backend (PyTorch here; ONNX Runtime can implement it too)."""

    input_size: tuple[int, int]  # (height, width) the model runs at

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB at ``input_size`` -> (B, H, W) float32 lesion probabilities."""
        ...


class TorchSegmenter:
    """A loaded PyTorch model behind the ``Segmenter`` protocol.

    Args:
        loaded: model and preprocessing from ``scsonet.models.load_model``.
        device: where the model runs ("cpu").
        tta: average the probabilities over the four flips (identity, horizontal, vertical, both) (False).
    """

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu", tta: bool = False):
        self.model = loaded.model.to(device).eval()
        self.preset = loaded.preset
        self.device = device
        self.tta = tta
        self.input_size = tuple(self.preset.resize_size)

    def predict_probs(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        import torch

        from .evaluation import predict_probs  # the same flip TTA as ``scsonet evaluate``

        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or tuple(x.shape[1:]) != (*self.input_size, 3):
            raise ValueError(f"expected (B, {self.input_size[0]}, {self.input_size[1]}, 3) images, got {tuple(x.shape)}")
        x = self.preset.normalize(x.to(self.device).permute(0, 3, 1, 2).float())
        with torch.inference_mode():
            return predict_probs(self.model, x, self.tta)[:, 0].cpu().numpy()


def predict_probabilities(images: Sequence[np.ndarray], segmenter: Segmenter) -> list[np.ndarray]:
    """RGB uint8 images of any sizes -> float32 probability maps, each at its image's size."""
    batch = np.stack([resize_image(rgb, segmenter.input_size) for rgb in images])
    return [resize_probabilities(p, rgb.shape[:2]) for p, rgb in zip(segmenter.predict_probs(batch), images)]


def sample_images() -> list[Path]:
    """The dermoscopic images shipped with the package (ISIC 2017 test set, CC0)."""
    folder = Path(str(resources.files("scsonet").joinpath("samples")))
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@functools.lru_cache(maxsize=4)
def _cached_segmenter(weights: str, stamp: Optional[int], device: str, tta: bool) -> TorchSegmenter:
    from ._device import resolve_device
    from .models import load_model

    resolved = resolve_device(device)
    return TorchSegmenter(load_model(weights, resolved), resolved, tta)


def segment(image: ImageLike, weights: str | os.PathLike = "scsonet-isic2017", threshold: float = 0.5,
            tta: bool = False, device: str = "auto") -> np.ndarray:
    """Lesion mask of one image: a path, a PIL image, or an array (H, W), (H, W, 3) or (H, W, 4).

    The model stays loaded between calls (a weights file is reloaded when it changes on disk).
    Returns a bool array (H, W) at the image's own size (after its EXIF orientation, for files).
    """
    path = Path(weights)
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    segmenter = _cached_segmenter(str(weights), stamp, str(device), bool(tta))
    probs = predict_probabilities([to_rgb_array(image)], segmenter)[0]
    return probs >= threshold


def _output_paths(out_dir: Path, stem: str, save_probabilities: Optional[str]) -> dict[str, Path]:
    paths = {"mask": out_dir / f"{stem}_mask.png", "overlay": out_dir / f"{stem}_overlay.png"}
    if save_probabilities:
        paths["probabilities"] = out_dir / f"{stem}_prob.{save_probabilities}"
    return paths


def _write_outputs(paths: dict[str, Path], rgb: np.ndarray, probs: np.ndarray, mask: np.ndarray) -> None:
    if "probabilities" in paths:
        with atomic_path(paths["probabilities"]) as tmp:
            if paths["probabilities"].suffix == ".npy":
                with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
                    np.save(f, probs.astype(np.float32))
            else:
                Image.fromarray(probabilities_to_uint8(probs)).save(tmp, format="PNG")
    with atomic_path(paths["mask"]) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    with atomic_path(paths["overlay"]) as tmp:
        draw_overlay(rgb, mask).save(tmp, format="PNG", compress_level=1)  # 3x faster than 6, 40% larger


def _error_row(file: str, message: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
    row.update(file=file, status="error", error=message)
    return row


def _write_results(out_dir: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    write_json_atomic(out_dir / "results.json", {"settings": settings, "images": rows})
    buf = io.StringIO()
    columns = [c for c in RESULT_FIELDS if c != "bbox"] + ["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        bbox = row["bbox"] or [None] * 4
        writer.writerow({**{c: row[c] for c in RESULT_FIELDS if c != "bbox"},
                         **dict(zip(columns[-4:], bbox))})
    write_text_atomic(out_dir / "results.csv", buf.getvalue())


def _previous_rows(out_dir: Path, settings: dict[str, Any], log) -> dict[str, dict[str, Any]]:
    """Successful rows of an earlier run into ``out_dir`` with the same settings, by file."""
    try:
        previous = json.loads((out_dir / "results.json").read_text())
        old_settings, rows = previous["settings"], previous["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if old_settings != settings:
        log(f"note: settings differ from the earlier run in {out_dir} ({old_settings} -> {settings}); "
            "predicting every image again")
        return {}
    return {row["file"]: row for row in rows if row.get("status") == "ok"}


def _segment_and_save(path: Path, outputs: dict[str, Path], rgb: np.ndarray, probs: np.ndarray,
                      threshold: float) -> dict[str, Any]:
    mask = probs >= threshold
    _write_outputs(outputs, rgb, probs, mask)
    return {"file": str(path), "status": "ok", "error": "", **summarize(probs, mask).to_dict()}


def predict_files(inputs: Sequence[str | os.PathLike], segmenter: Segmenter, out_dir: str | os.PathLike, *,
                  threshold: float = 0.5, batch_size: int = 8, save_probabilities: Optional[str] = None,
                  skip_existing: bool = False, progress: bool = True,
                  settings: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Segment image files, folders and globs; write masks, overlays and ``results.{json,csv}``.

    Per image in ``out_dir``: ``<stem>_mask.png`` (0/255), ``<stem>_overlay.png`` (outline, or a
    "no lesion found" label) and, with ``save_probabilities`` ("png" 0..255 or "npy" float32),
    ``<stem>_prob.<ext>``. A bad input is reported on stderr in one line and becomes an error row;
    the others are still done. ``skip_existing`` reuses the rows of images whose outputs an
    earlier run with the same ``settings`` (backend, weights, ...) and threshold wrote. Every file
    is written atomically.

    Returns:
        One row per input image, and one per input that yields none; keys ``RESULT_FIELDS``.
    """
    from tqdm import tqdm

    if save_probabilities not in (None, *PROBABILITY_FORMATS):
        raise ScsonetError(f"save_probabilities must be one of {PROBABILITY_FORMATS}, not {save_probabilities!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ScsonetError(f"threshold {threshold} is outside 0..1")
    if batch_size < 1:
        raise ScsonetError(f"batch size {batch_size} must be at least 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ScsonetError(f"{out_dir}: is a file, not an output folder")
    settings = {**(settings or {}), "threshold": threshold}
    rows: dict[str, dict[str, Any]] = {}  # by file, filled in any order, written in input order

    def log(message: str, stream=sys.stdout) -> None:
        tqdm.write(message, file=stream)

    def fail(file: str, message: str) -> None:
        log(f"error: {message}", sys.stderr)
        rows[file] = _error_row(file, message)

    paths, input_errors = expand_inputs(inputs)
    order = [err.source for err in input_errors] + [str(p) for p in paths]
    for err in input_errors:
        fail(err.source, err.message)
    previous = _previous_rows(out_dir, settings, log) if skip_existing else {}

    todo: list[tuple[Path, dict[str, Path]]] = []
    owner_of_stem: dict[str, Path] = {}
    for path in paths:
        owner = owner_of_stem.setdefault(path.stem, path)
        outputs = _output_paths(out_dir, path.stem, save_probabilities)
        if owner != path:
            fail(str(path), f"{path}: its outputs would overwrite those of {owner} ({outputs['mask'].name}); "
                            "predict it into another --out folder")
        elif str(path) in previous and all(p.exists() for p in outputs.values()):
            rows[str(path)] = previous[str(path)]
        else:
            todo.append((path, outputs))
    if skip_existing and previous:
        log(f"--continue: {len(paths) - len(todo)} image(s) already done in {out_dir}")

    out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), unit="image", disable=not progress or len(todo) < 2, file=sys.stderr)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch = []
            for path, outputs in chunk:
                try:
                    batch.append((path, outputs, read_image(path)))
                except ScsonetError as err:
                    fail(str(path), str(err))
            all_probs = predict_probabilities([rgb for *_, rgb in batch], segmenter) if batch else []
            for (path, outputs, rgb), probs in zip(batch, all_probs):
                try:
                    rows[str(path)] = row = _segment_and_save(path, outputs, rgb, probs, threshold)
                except OSError as err:
                    fail(str(path), f"{path}: cannot write its outputs in {out_dir} ({err})")
                    continue
                if not row["lesion_found"]:
                    log(f"note: {path}: no lesion found (highest probability {probs.max():.3f} "
                        f"< threshold {threshold})")
            bar.update(len(chunk))
    finally:  # an interrupted run still records what it finished, for --continue
        bar.close()
        _write_results(out_dir, settings, [rows[f] for f in order if f in rows])
    return [rows[f] for f in order if f in rows]
