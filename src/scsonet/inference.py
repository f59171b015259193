"""Segment images: a pipeline over a small backend protocol, the PyTorch backend, ``segment()``
and the sample images shipped with the package.

The model runs at its preset size (256 x 256): each image is resized to it (bilinear,
antialiased), and the probability map is resized back to the image's size (bilinear) before
thresholding. Two-pass prediction (``scsonet.twopass``, on by default in ``scsonet predict`` and
``segment()``) adds a second pass on a full-resolution crop around a lesion that is small in the
frame; the reliability score (``scsonet.reliability``) says per image whether the outline is to
be reviewed. Importing this module does not import torch (only ``TorchSegmenter``, ``segment``
and ``find_reliability_model`` do), so an ONNX Runtime backend can reuse ``predict_files``
without PyTorch.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, Sequence

import numpy as np
from PIL import Image

from ._io import atomic_path, fsync_dir, write_json_atomic, write_text_atomic
from .errors import ScsonetError
from .imageio import (ImageLike, LazyImage, encode_mask_png, encode_png, expand_inputs, is_image_suffix, read_draft,
                      to_rgb_array)
from .postprocess import ProbabilityMap, draw_overlay, probabilities_to_uint8, resize_image
from .reliability import ReliabilityModel, default_model_path, reliability_features
from .twopass import TwoPassInfo, two_pass_maps

try:
    import fcntl
except ImportError:  # Windows: no flock; see _Journal
    fcntl = None

if TYPE_CHECKING:
    import torch

    from .models import LoadedModel

__all__ = ["JOURNAL_NAME", "PredictRows", "RESULT_FIELDS", "Segmentation", "Segmenter", "TorchSegmenter",
           "assess", "find_reliability_model", "predict_batch", "predict_files", "predict_maps", "predict_probabilities",
           "reliability_setting", "sample_images", "segment", "segment_image", "shipped_onnx",
           "torch_available"]

RESULT_FIELDS = ["file", "status", "error", "width", "height", "lesion_found", "lesion_area_px",
                 "lesion_fraction", "bbox", "mean_confidence", "two_pass", "reliability", "review"]
# Journal lines written before two-pass and the reliability score lack the last three: still valid rows.
_REQUIRED_FIELDS = RESULT_FIELDS[:RESULT_FIELDS.index("two_pass")]
PROBABILITY_FORMATS = ("png", "npy")
JOURNAL_NAME = "results.jsonl"  # in --out: one line per finished input, every run's
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise translate the newlines
# The installed package's folder (its data files are plain files: ONNX Runtime needs a path anyway);
# importlib.resources would cost start-up time for the same answer.
_PACKAGE = Path(__file__).resolve().parent
# Longest side of the overlay PNG by default (the mask is always at full size): a 12 MP photo's
# full-size overlay costs more to draw and compress than everything else together.
PREVIEW_SIDE = 1024


class Segmenter(Protocol):
    """What the pipeline needs from a backend (PyTorch here; ONNX Runtime can implement it too)."""

    input_size: tuple[int, int]  # (height, width) the model runs at
    # Optionally also ``reliability``: the ``ReliabilityModel`` fitted for these weights, or None.

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB at ``input_size`` -> (B, H, W) float32 lesion probabilities."""
        ...


class TorchSegmenter:
    """A loaded PyTorch model behind the ``Segmenter`` protocol.

    Args:
        loaded: model and preprocessing from ``scsonet.models.load_model``.
        device: where the model runs ("cpu").
        tta: average the probabilities over the four flips (identity, horizontal, vertical, both) (False).
        reliability: the reliability model fitted for these weights (``find_reliability_model``) (None).
    """

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "cpu", tta: bool = False,
                 reliability: Optional[ReliabilityModel] = None):
        self.reliability = reliability
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
    return [probs.dense() for probs, _ in predict_maps(images, segmenter, two_pass=False)]


def predict_maps(images: Sequence[np.ndarray], segmenter: Segmenter, threshold: float = 0.5,
                 two_pass: bool = True) -> list[tuple[ProbabilityMap, Optional[TwoPassInfo]]]:
    """RGB uint8 images of any sizes -> (probabilities at the image's size as a ``ProbabilityMap``,
    two-pass info or None) each; with ``two_pass``, a lesion small in the frame gets a second pass
    on a crop of the image. ``scsonet predict``'s path: a map is made at full size only if asked."""
    if not two_pass:
        batch = np.stack([resize_image(rgb, segmenter.input_size) for rgb in images])
        return [(ProbabilityMap(rgb.shape[:2], p), None) for p, rgb in zip(segmenter.predict_probs(batch), images)]
    return two_pass_maps(images, segmenter, threshold=threshold)  # pass 1 runs inside, on the same batch


def predict_batch(images: Sequence[np.ndarray], segmenter: Segmenter, threshold: float = 0.5,
                  two_pass: bool = True) -> list[tuple[np.ndarray, Optional[TwoPassInfo]]]:
    """``predict_maps`` with float32 (H, W) probabilities: what scoring against a mask reads."""
    return [(probs.dense(), info) for probs, info in predict_maps(images, segmenter, threshold, two_pass)]


def assess(model: Optional[ReliabilityModel], probs: np.ndarray, info: Optional[TwoPassInfo],
           threshold: float) -> dict[str, Any]:
    """{"reliability": 0..1 (3 decimals), "review": bool} of one map; both None without a model."""
    if model is None:
        return {"reliability": None, "review": None}
    verdict = model.assess(reliability_features(probs, info, threshold))
    return {"reliability": round(verdict["reliability"], 3), "review": verdict["review"]}


def reliability_setting(model: Optional[ReliabilityModel], two_pass: bool) -> Optional[str]:
    """How a run's reliability scores were made, for its settings: the weights and split the model
    was fitted for, and a caution when it was fitted on two-pass outputs but this run is one-pass
    (the scores are then computed all the same, but their calibration was not measured)."""
    if model is None:
        return None
    meta = model.meta
    text = f"fitted for {meta.get('weights', '?')} on {meta.get('split', '?')}"
    fitted_two_pass = bool(meta.get("two_pass", False))
    text += ", two-pass" if fitted_two_pass else ", one-pass"
    if fitted_two_pass and not two_pass:
        text += " (this run is one-pass: scores not calibrated for it)"
    return text


def find_reliability_model(weights: str | os.PathLike) -> Optional[ReliabilityModel]:
    """The reliability model shipped beside PyTorch weights (pretrained name, ``.safetensors`` or
    ``.pt``): ``X.reliability.json`` beside ``X.<ext>``, validated; None if there is none."""
    from .models import PRETRAINED

    spec = str(weights)
    sidecar = default_model_path(PRETRAINED[spec].path if spec in PRETRAINED else Path(spec))
    return ReliabilityModel.load(sidecar) if sidecar.is_file() else None


def sample_images() -> list[Path]:
    """The dermoscopic images shipped with the package (ISIC 2017 test set, CC0)."""
    return sorted(p for p in (_PACKAGE / "samples").iterdir() if is_image_suffix(p.suffix))


# The base install (no PyTorch) segments with ONNX exports in scsonet/weights, one per shipped
# version (scripts/shipped_onnx.py builds each). Torch-free, so the names are spelled out here; a
# test checks them against SCSONet_Weights.
SHIPPED_VERSIONS = {"scsonet-isic2017-v1": "scsonet_isic2017_v1.onnx", "scsonet-isic2017-v2": "scsonet_isic2017_v2.onnx"}
DEFAULT_VERSION = {"scsonet-isic2017": "scsonet-isic2017-v1"}  # the short name -> SCSONet_Weights.DEFAULT's
SHIPPED_ONNX = {**{short: SHIPPED_VERSIONS[v] for short, v in DEFAULT_VERSION.items()}, **SHIPPED_VERSIONS}


def shipped_onnx(name: str) -> Optional[Path]:
    """The shipped ONNX export of pretrained weights ``name``, or None if there is none."""
    if name not in SHIPPED_ONNX:
        return None
    path = _PACKAGE / "weights" / SHIPPED_ONNX[name]
    return path if path.is_file() else None


def torch_available() -> bool:
    """Whether PyTorch can be imported (the ``scsonet[torch]`` extra), without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=4)
def _cached_segmenter(weights: str, stamp: Optional[int], device: str, tta: bool) -> Segmenter:
    onnx = Path(weights) if Path(weights).suffix == ".onnx" else None
    if onnx is None and not torch_available():
        onnx = shipped_onnx(weights)
        if onnx is None:
            raise ScsonetError(f"weights {weights!r} need PyTorch: pip install 'scsonet[torch]' "
                               f"(without it: {', '.join(SHIPPED_ONNX)} or an .onnx file from `scsonet export`)")
    if onnx is not None:  # ONNX Runtime: numpy, Pillow and onnxruntime only
        from .onnx_runtime import OrtSegmenter

        return OrtSegmenter(onnx, tta=tta)
    from ._device import resolve_device
    from .models import load_model

    resolved = resolve_device(device)
    return TorchSegmenter(load_model(weights, resolved), resolved, tta, find_reliability_model(weights))


@dataclass(frozen=True)
class Segmentation:
    """``segment_image``'s result for one image, at the image's own size.

    ``two_pass``: whether the outline came from a second pass on a crop (``info`` says why or why
    not; None when two-pass was off). ``reliability`` (0..1, the modelled chance that the outline's
    Dice is >= 0.7) and ``review`` (reliability below the model's threshold: check the outline)
    are None for weights without a reliability model.
    """

    mask: np.ndarray  # bool (H, W)
    map: ProbabilityMap = field(repr=False)  # the probabilities, kept at the model's size until asked for
    two_pass: bool
    reliability: Optional[float]
    review: Optional[bool]
    info: Optional[TwoPassInfo] = None

    @property
    def probabilities(self) -> np.ndarray:
        """float32 (H, W), made at the image's size on first use (at 12 MP: 0.14 s, 48 MB)."""
        return self.map.dense()


def segment_image(image: ImageLike, weights: str | os.PathLike = "scsonet-isic2017", threshold: float = 0.5,
                  tta: bool = False, device: str = "auto", two_pass: bool = True) -> Segmentation:
    """Segment one image (as ``segment``) and say how far to trust it: a ``Segmentation``."""
    path = Path(weights)
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    segmenter = _cached_segmenter(str(weights), stamp, str(device), bool(tta))
    rgb = (read_draft(image, _draft_size(segmenter)) if isinstance(image, (str, os.PathLike))
           else to_rgb_array(image))
    probs, info = predict_maps([rgb], segmenter, threshold, two_pass)[0]
    verdict = assess(segmenter.reliability, probs, info, threshold)
    return Segmentation(probs.mask(threshold), probs, bool(info and info.second_pass), verdict["reliability"],
                        verdict["review"], info)


def segment(image: ImageLike, weights: str | os.PathLike = "scsonet-isic2017", threshold: float = 0.5,
            tta: bool = False, device: str = "auto", two_pass: bool = True) -> np.ndarray:
    """Lesion mask of one image: a path, a PIL image, or an array (H, W), (H, W, 3) or (H, W, 4).

    The model stays loaded between calls (a weights file is reloaded when it changes on disk).
    ``two_pass``: a second pass on a crop of the image around a lesion that is small in the frame.
    Returns a bool array (H, W) at the image's own size (after its EXIF orientation, for files);
    ``segment_image`` gives the probabilities, the reliability score and the review flag too.
    """
    return segment_image(image, weights, threshold, tta, device, two_pass).mask


def _draft_size(segmenter: Segmenter) -> tuple[int, int]:
    """The reduced decode's minimum (height, width): twice the model's input, so that pass 1
    resizes down (antialiased) and the preview overlay is about PREVIEW_SIDE wide."""
    return (2 * segmenter.input_size[0], 2 * segmenter.input_size[1])


def _output_paths(out_dir: Path, stem: str, save_probabilities: Optional[str]) -> dict[str, Path]:
    paths = {"mask": out_dir / f"{stem}_mask.png", "overlay": out_dir / f"{stem}_overlay.png"}
    if save_probabilities:
        paths["probabilities"] = out_dir / f"{stem}_prob.{save_probabilities}"
    return paths


def _write_outputs(paths: dict[str, Path], rgb: np.ndarray | LazyImage, probs: ProbabilityMap, mask: np.ndarray,
                   verdict: dict[str, Any], overlay_side: Optional[int] = None) -> None:
    if "probabilities" in paths:
        with atomic_path(paths["probabilities"]) as tmp:
            if paths["probabilities"].suffix == ".npy":
                with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
                    np.save(f, probs.dense())
            else:
                tmp.write_bytes(encode_png(probabilities_to_uint8(probs)))
    with atomic_path(paths["mask"]) as tmp:
        tmp.write_bytes(encode_mask_png(mask))
    with atomic_path(paths["overlay"]) as tmp:
        picture = _overlay_picture(rgb, overlay_side)
        if picture.shape[:2] != mask.shape:  # the outline drawn on the preview: the mask shrunk to it
            mask = np.asarray(Image.fromarray(mask).resize((picture.shape[1], picture.shape[0]), Image.NEAREST))
        overlay = draw_overlay(picture, mask, bool(verdict["review"]), verdict["reliability"])
        tmp.write_bytes(encode_png(np.asarray(overlay)))


def _overlay_picture(rgb: np.ndarray | LazyImage, side: Optional[int]) -> np.ndarray:
    from .imageio import shrink_to

    if isinstance(rgb, LazyImage):
        return rgb.preview(side)
    return rgb if side is None else shrink_to(rgb, side)


def _error_row(file: str, message: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RESULT_FIELDS)
    row.update(file=file, status="error", error=message)
    return row


class PredictRows(list):
    """``predict_files``' rows; ``already_done`` counts those reused from an earlier run (--continue)."""

    already_done: int = 0


class _Journal:
    """``OUT/results.jsonl``, the record every run into ``OUT`` appends to: one JSON line per
    finished input (its row and the run's settings), written after the image's outputs and synced
    to disk before the next image starts, so nothing finished is lost to kill -9 or a power cut.

    An exclusive ``flock`` on ``OUT/.results.lock`` serialises appends and the rebuilds of
    results.csv/json between concurrent runs. Where ``fcntl`` is missing (Windows) there is no
    lock: each line is still one O_APPEND write, but two runs rebuilding at once may drop rows
    from results.csv/json until the next run rebuilds them from the journal.
    """

    def __init__(self, out_dir: Path):
        self.path = out_dir / JOURNAL_NAME
        self._fd: Optional[int] = None
        try:  # also the check that --out is writable, before any image is read
            self._lock_fd = os.open(out_dir / ".results.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ScsonetError(f"cannot write in the output folder ({out_dir}: {err.strerror or err})") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def append(self, row: dict[str, Any], settings: dict[str, Any]) -> None:
        line = (json.dumps({**row, "settings": settings}) + "\n").encode()
        try:
            with self.locked():
                if self._fd is None:
                    created = not self.path.exists()
                    self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_BINARY, 0o666)
                    if created:
                        fsync_dir(self.path.parent)
                end = os.fstat(self._fd).st_size
                if end:
                    os.lseek(self._fd, end - 1, os.SEEK_SET)  # O_APPEND writes ignore this position
                    if os.read(self._fd, 1) != b"\n":
                        line = b"\n" + line  # a run killed mid-append left a torn line: end it, never extend it
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fsync(self._fd)
        except OSError as err:
            raise ScsonetError(f"cannot record results in {self.path} ({err.strerror or err})") from None

    def read_unlocked(self) -> list[dict[str, Any]]:
        """Every well-formed line, in order; call it holding ``locked()``. A torn or damaged line
        is skipped: its image counts as not done."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise ScsonetError(f"cannot read {self.path} ({err.strerror or err})") from None
        entries = []
        for line in data.split(b"\n"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                    and entry.get("status") in ("ok", "error") and isinstance(entry.get("settings"), dict)
                    and all(key in entry for key in _REQUIRED_FIELDS)):
                entries.append(entry)
        return entries

    def read(self) -> list[dict[str, Any]]:
        with self.locked():
            return self.read_unlocked()

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = None


def _current_entries(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each file's latest journal entry, in order of first appearance, less ok entries whose outputs
    a later ok entry of another file with the same stem (from another run) has overwritten."""
    latest: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}  # output stem -> file whose outputs are in the folder now
    for entry in entries:
        latest[entry["file"]] = entry
        if entry["status"] == "ok":
            owner[Path(entry["file"]).stem] = entry["file"]
    return {file: entry for file, entry in latest.items()
            if entry["status"] != "ok" or owner[Path(file).stem] == file}


def _as_row(entry: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    row = {key: entry.get(key) for key in RESULT_FIELDS}
    if entry["settings"] != settings:
        row["settings"] = entry["settings"]
    return row


def _write_results(journal: _Journal, settings: dict[str, Any], first: Sequence[str]) -> None:
    """Rebuild results.json and results.csv from the whole journal (every run's rows)."""
    out_dir = journal.path.parent
    columns = [c for c in RESULT_FIELDS if c != "bbox"] + ["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "settings"]
    try:
        with journal.locked():
            current = _current_entries(journal.read_unlocked())
            files = [f for f in dict.fromkeys(first) if f in current] + [f for f in current if f not in set(first)]
            rows = [_as_row(current[f], settings) for f in files]
            write_json_atomic(out_dir / "results.json", {"settings": settings, "images": rows})
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                bbox = row["bbox"] or [None] * 4
                writer.writerow({**{c: row[c] for c in RESULT_FIELDS if c != "bbox"},
                                 **dict(zip(columns[-5:-1], bbox)),
                                 "settings": json.dumps(row["settings"]) if "settings" in row else ""})
            write_text_atomic(out_dir / "results.csv", buf.getvalue())
    except OSError as err:
        raise ScsonetError(f"cannot write results.csv/json in {out_dir} ({err.strerror or err})") from None


def _segment_and_save(path: Path, outputs: dict[str, Path], rgb: np.ndarray | LazyImage, probs: ProbabilityMap,
                      info: Optional[TwoPassInfo], threshold: float,
                      reliability: Optional[ReliabilityModel], overlay_side: Optional[int]) -> dict[str, Any]:
    mask = probs.mask(threshold)
    verdict = assess(reliability, probs, info, threshold)
    _write_outputs(outputs, rgb, probs, mask, verdict, overlay_side)
    return {"file": str(path), "status": "ok", "error": "", **probs.summary(threshold).to_dict(),
            "two_pass": bool(info and info.second_pass), **verdict}


def _open_out_dir(out_dir: Path) -> _Journal:
    if out_dir.exists() and not out_dir.is_dir():
        raise ScsonetError(f"{out_dir}: is a file, not an output folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a path under a file, a read-only place, ...
        raise ScsonetError(f"cannot create the output folder ({out_dir}: {err.strerror or err})") from None
    return _Journal(out_dir)


def predict_files(inputs: Sequence[str | os.PathLike], segmenter: Segmenter, out_dir: str | os.PathLike, *,
                  threshold: float = 0.5, batch_size: int = 8, save_probabilities: Optional[str] = None,
                  skip_existing: bool = False, progress: bool = True,
                  settings: Optional[dict[str, Any]] = None, two_pass: bool = False,
                  reliability: Optional[ReliabilityModel] = None,
                  overlay_side: Optional[int] = PREVIEW_SIDE) -> PredictRows:
    """Segment image files, folders and globs; write masks, overlays and ``results.{jsonl,json,csv}``.

    Per image in ``out_dir``: ``<stem>_mask.png`` (0/255), ``<stem>_overlay.png`` (outline, or a
    "no lesion found" label) and, with ``save_probabilities`` ("png" 0..255 or "npy" float32),
    ``<stem>_prob.<ext>``, each written atomically. The mask (and probabilities) are at the image's
    size; the overlay's longest side is at most ``overlay_side`` (None: full size). A big JPEG is
    decoded at a reduced size for pass 1 and the overlay, and in full only for a second pass. With ``two_pass`` (``scsonet predict``'s default;
    off here, as before it existed), a lesion small in the frame gets a second pass on a crop
    (``scsonet.twopass``). With a ``reliability`` model, each row gets ``reliability`` and
    ``review``, and a reviewed image's overlay an amber "REVIEW" banner. A bad input of any kind (unreadable, truncated,
    over the pixel limit, out of memory) is reported on stderr in one line and becomes an error
    row; the others are still done. A file in a folder (or matched by a pattern) that is not an
    image is named in a "note:" line on stderr and skipped (no row); a file named directly that is
    not an image is a ``ScsonetError``, raised before anything is written.

    The folder's record: as each input is finished, its row (with the run's ``settings``:
    backend, weights, ..., threshold) is appended to ``results.jsonl`` and synced to disk, after
    its outputs. A line cut short by a kill is ignored. ``results.json`` and ``results.csv`` are
    rebuilt from the whole journal (every run into the folder, concurrent ones included) at the
    end, and also when the run is interrupted (KeyboardInterrupt, SystemExit); they hold each
    file's latest row, this run's inputs first, in input order, then the folder's other files.
    A file whose outputs another file with the same stem overwrote in a later run is dropped.
    ``results.json`` is ``{"settings": this run's settings, "images": rows}``; a row made with
    other settings carries them as its own ``"settings"`` key (in results.csv, a JSON
    ``settings`` column, empty for rows made with this run's settings).

    The settings record ``"two_pass": true`` when it is on (rows without the key were one-pass)
    and, with a reliability model, ``"reliability"`` (``reliability_setting``).

    ``skip_existing`` (--continue) reuses an image's row when its latest journal row is ok, has
    the same ``settings`` and its outputs (as this call would write them) exist.

    Returns:
        This run's rows, one per input image and one per input that yields none (a skipped stray
        file yields no row), in input order;
        keys ``RESULT_FIELDS``; ``.already_done`` counts the reused ones.
    """
    if save_probabilities not in (None, *PROBABILITY_FORMATS):
        raise ScsonetError(f"save_probabilities must be one of {PROBABILITY_FORMATS}, not {save_probabilities!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ScsonetError(f"threshold {threshold} is outside 0..1")
    if batch_size < 1:
        raise ScsonetError(f"batch size {batch_size} must be at least 1")
    out_dir = Path(out_dir)
    settings = {**(settings or {}), "threshold": threshold}
    if two_pass:
        settings["two_pass"] = True
    if reliability is not None:
        settings["reliability"] = reliability_setting(reliability, two_pass)
    if overlay_side is None:
        settings["full_overlay"] = True
    paths, input_errors = expand_inputs(inputs)
    for err in input_errors:
        if err.not_an_image:  # before the output folder is made: a wrong command writes nothing
            raise ScsonetError(err.message)
    journal = _open_out_dir(out_dir)
    rows: dict[str, dict[str, Any]] = {}  # by file, filled in any order, returned in input order
    bar = None  # the progress bar, drawn only on a terminal: in a log its redraws would garble the lines

    def log(message: str, stream=sys.stdout) -> None:
        if bar is None:
            print(message, file=stream, flush=True)
        else:
            bar.write(message, file=stream)  # clears the bar, prints the line, redraws the bar below it

    def record(row: dict[str, Any]) -> None:
        journal.append(row, settings)
        rows[row["file"]] = row

    def fail(file: str, message: str) -> None:
        log(f"error: {message}", sys.stderr)
        record(_error_row(file, message))

    order = [err.source for err in input_errors if not err.skipped] + [str(p) for p in paths]
    reused = 0
    try:
        for err in input_errors:
            if err.skipped:  # a stray file in a folder is named, not counted as a failure
                log(f"note: {err.message}", sys.stderr)
            else:
                fail(err.source, err.message)
        current = _current_entries(journal.read()) if skip_existing else {}

        todo: list[tuple[Path, dict[str, Path]]] = []
        owner_of_stem: dict[str, Path] = {}
        other_settings = 0
        for path in paths:
            owner = owner_of_stem.setdefault(path.stem, path)
            outputs = _output_paths(out_dir, path.stem, save_probabilities)
            entry = current.get(str(path))
            ok_before = entry is not None and entry["status"] == "ok"
            if owner != path:
                fail(str(path), f"{path}: its outputs would overwrite those of {owner} ({outputs['mask'].name}); "
                                "predict it into another --out folder")
            elif ok_before and entry["settings"] == settings and all(p.exists() for p in outputs.values()):
                rows[str(path)] = _as_row(entry, settings)
                reused += 1
            else:
                if ok_before and entry["settings"] != settings:
                    other_settings += 1
                todo.append((path, outputs))
        if other_settings:
            log(f"note: {other_settings} image(s) were done in {out_dir} with other settings; predicting "
                f"them again with {settings}")
        if skip_existing and current:
            log(f"--continue: {reused} image(s) already done in {out_dir}")

        if progress and len(todo) > 1 and sys.stderr.isatty():
            from tqdm import tqdm  # imported only when drawn: it costs start-up time

            bar = tqdm(total=len(todo), unit="image", file=sys.stderr)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch = []
            for path, outputs in chunk:
                rgb = _read_or_fail(path, fail, _draft_size(segmenter))
                if rgb is not None:
                    batch.append((path, outputs, rgb))
            for (path, outputs, rgb), (probs, info) in _predict_or_fail(batch, segmenter, fail, threshold, two_pass):
                try:
                    row = _segment_and_save(path, outputs, rgb, probs, info, threshold, reliability, overlay_side)
                except OSError as err:
                    fail(str(path), f"{path}: cannot write its outputs in {out_dir} ({err})")
                    continue
                except MemoryError:
                    fail(str(path), f"{path}: not enough memory to write the outputs of its "
                                    f"{rgb.shape[1]}x{rgb.shape[0]} pixels")
                    continue
                record(row)
                if not row["lesion_found"]:
                    log(f"note: {path}: no lesion found (highest probability {probs.max():.3f} "
                        f"< threshold {threshold})")
                if row["review"]:
                    log(f"note: {path}: review: the outline may be wrong (reliability {row['reliability']:.3f})")
            if bar is not None:
                bar.update(len(chunk))
    finally:  # an interrupted run still rebuilds results.csv/json from what the folder finished
        if bar is not None:
            bar.close()
        try:
            _write_results(journal, settings, order)
        finally:
            journal.close()
    result = PredictRows(rows[f] for f in order if f in rows)
    result.already_done = reused
    return result


def _read_or_fail(path: Path, fail, draft: tuple[int, int]) -> Optional[LazyImage]:
    try:
        return read_draft(path, draft)
    except ScsonetError as err:
        fail(str(path), str(err))
    except Exception as err:  # a hostile file can trip any Pillow plugin; it must not stop the run
        fail(str(path), f"{path}: cannot decode the image ({type(err).__name__}: {err})")
    return None


def _predict_or_fail(batch: list, segmenter: Segmenter, fail, threshold: float, two_pass: bool) -> list:
    """``(item, (probabilities, two-pass info))`` per image of ``batch``; on MemoryError the batch
    is redone one image at a time, so only an image that does not fit on its own fails."""
    try:
        return (list(zip(batch, predict_maps([rgb for *_, rgb in batch], segmenter, threshold, two_pass)))
                if batch else [])
    except MemoryError:
        if len(batch) == 1:
            path, _, rgb = batch[0]
            fail(str(path), f"{path}: not enough memory to segment its {rgb.shape[1]}x{rgb.shape[0]} pixels")
            return []
    return [pair for item in batch for pair in _predict_or_fail([item], segmenter, fail, threshold, two_pass)]
