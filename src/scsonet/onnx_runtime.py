"""Run an exported SCSONet with ONNX Runtime, numpy and Pillow only: no PyTorch needed.

    from scsonet.onnx_runtime import OrtSegmenter

    segmenter = OrtSegmenter("scsonet.onnx", threads=2)
    mask = segmenter.segment("lesion.jpg")  # bool (H, W), at the image's own size

The preprocessing (resize size, mean, std, threshold) travels in the model's ONNX metadata,
written by ``scsonet export``; ``OrtSegmenter`` implements the ``Segmenter`` protocol of
``scsonet.inference``, so ``scsonet predict --backend onnxruntime`` runs the same pipeline
(resizing, thresholding, two-pass, masks, overlays, results) as the PyTorch backend. An export
of weights that ship a reliability model carries it in the metadata too (key ``reliability``):
``OrtSegmenter.reliability`` gives each image's reliability score and review flag.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import onnxruntime as ort

from ._checks import check_preprocessing
from .errors import ScsonetError
from .imageio import TTA_FLIPS, ImageLike, to_rgb_array
from .reliability import ReliabilityModel

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "ModelInfo", "OrtSegmenter", "make_session", "read_metadata",
           "reliability_from_metadata", "session_options", "sigmoid"]

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# Metadata keys that ``OrtSegmenter`` needs; ``scsonet export`` writes these and a few more.
REQUIRED_METADATA = ("resize_size", "mean", "std", "threshold")
MAX_SESSIONS = 4  # sessions an OrtSegmenter keeps, one per batch size seen
RELIABILITY_METADATA = "reliability"  # the reliability model's JSON (``ReliabilityModel.to_dict``), if any


@dataclass(frozen=True)
class ModelInfo:
    """The preprocessing and provenance recorded in an exported model's metadata."""

    resize_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float
    arch: str = "?"
    weights: str = "?"

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> "ModelInfo":
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing:
            raise ScsonetError(f"{source}: ONNX metadata lacks {', '.join(missing)}; "
                               "export the model with `scsonet export`")
        pre = {}
        for key in REQUIRED_METADATA:  # JSON text, then checked as a checkpoint's values are
            try:
                pre[key] = json.loads(metadata[key])
            except ValueError as err:
                raise ScsonetError(f"{source}: malformed scsonet metadata in the ONNX model "
                                   f"({key}={metadata[key][:40]!r}: {err})") from None
        pre = check_preprocessing(pre, source)  # before any session or buffer is sized by it
        return cls(tuple(pre["resize_size"]), tuple(pre["mean"]), tuple(pre["std"]), pre["threshold"],
                   metadata.get("arch", "?"), metadata.get("weights", "?"))


def reliability_from_metadata(metadata: dict[str, str], source: str) -> Optional[ReliabilityModel]:
    """The reliability model embedded by ``scsonet export``, validated; None if there is none."""
    text = metadata.get(RELIABILITY_METADATA)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ScsonetError(f"malformed reliability model in the ONNX metadata ({source}: {err})") from None
    return ReliabilityModel.from_dict(data, f"{source}: ONNX metadata {RELIABILITY_METADATA!r}")


def session_options(threads: Optional[int] = None, fixed_size: Optional[Sequence[int]] = None,
                    batch: Optional[int] = None, optimize: bool = True) -> ort.SessionOptions:
    """ONNX Runtime settings of the fast exact path.

    All graph optimisations (constant folding, operator fusion; exact up to float rounding)
    except the NCHWc layout transform, which on this small network costs more in layout
    reorders than it saves and moves the logits 3x further from the float64 result;
    ``threads`` intra-op threads (ONNX Runtime's default: one per physical core) and sequential
    execution: the graph is a chain, so inter-op parallelism only adds scheduling.
    ``fixed_size`` = (height, width) and ``batch`` pin the model's dynamic axes; with all three
    pinned the optimiser folds the shape arithmetic into constants (a third fewer nodes).
    ``optimize=False`` skips the graph optimisations: the session is built about three times
    faster (a few tenths of a second saved at start-up), each run is about 15 % slower.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.add_session_config_entry("optimization.disable_specified_optimizers", "NchwcTransformer")
    if threads:
        options.intra_op_num_threads = int(threads)
    if fixed_size is not None:
        options.add_free_dimension_override_by_name("height", int(fixed_size[0]))
        options.add_free_dimension_override_by_name("width", int(fixed_size[1]))
    if batch is not None:
        options.add_free_dimension_override_by_name("batch", int(batch))
    options.log_severity_level = 3  # warnings about hardware-specific optimised graphs are noise here
    return options


def _load(path: str | os.PathLike, options: ort.SessionOptions,
          providers: Optional[Sequence[str]] = None) -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise ScsonetError(f"{path}: no such ONNX model")
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as err:  # ONNX Runtime raises its own exception types for corrupt models
        text = str(err).strip()
        raise ScsonetError(f"{path}: ONNX Runtime cannot load it "
                           f"({text.splitlines()[0] if text else type(err).__name__})") from None


def make_session(path: str | os.PathLike, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 fixed_size: Optional[Sequence[int]] = None, batch: Optional[int] = None,
                 optimize: bool = True) -> ort.InferenceSession:
    """An inference session on ``path`` with ``session_options``; a one-line error for a bad file."""
    return _load(path, session_options(threads, fixed_size, batch, optimize), providers)


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        byte = data[pos]  # IndexError past the end: a truncated file
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint longer than 64 bits")


def _protobuf_fields(data: memoryview):
    """(field number, value) of each field of one protobuf message: an int for varints, a
    memoryview for length-delimited fields (a nested message is not parsed, only skipped)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise ValueError("field runs past the end")
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):  # fixed 64 / 32 bits
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        yield key >> 3, value


_METADATA_PROPS = 14  # ModelProto.metadata_props: repeated StringStringEntryProto {1: key, 2: value}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model, read from the file's top-level protobuf fields
    (the graph is skipped, not parsed): a session built only to read them costs as much as the
    one that runs the model. A file that is not a protobuf message gets ONNX Runtime's error."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except OSError as err:
        raise ScsonetError(f"{path}: no such ONNX model" if not path.exists()
                           else f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        metadata = {}
        for field, value in _protobuf_fields(data):
            if field == _METADATA_PROPS and isinstance(value, memoryview):
                entry = {f: bytes(v).decode() for f, v in _protobuf_fields(value) if isinstance(v, memoryview)}
                metadata[entry.get(1, "")] = entry.get(2, "")
        return metadata
    except (ValueError, IndexError):  # UnicodeDecodeError is a ValueError
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return dict(_load(path, options).get_modelmeta().custom_metadata_map)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings for large negative logits."""
    e = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


class OrtSegmenter:
    """An exported SCSONet behind the ``Segmenter`` protocol of ``scsonet.inference``.

    Args:
        path: ``.onnx`` file written by ``scsonet export`` (its metadata gives the preprocessing).
        threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        providers: ONNX Runtime execution providers (``["CPUExecutionProvider"]``).
        tta: average the probabilities over the four flips, as ``scsonet predict --tta`` (False).
        optimize: optimise the graph when building the session (True; False for a few images,
            where building the session costs more than the faster runs save: ``session_options``).
    """

    def __init__(self, path: str | os.PathLike, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None, tta: bool = False, optimize: bool = True):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.info = ModelInfo.from_metadata(self.metadata, str(self.path))
        self.reliability = reliability_from_metadata(self.metadata, str(self.path))
        self.input_size: tuple[int, int] = tuple(self.info.resize_size)
        self.threshold = self.info.threshold
        self.tta = tta
        self.threads = threads
        self.providers = providers
        self.optimize = optimize
        self._sessions: dict[Optional[int], ort.InferenceSession] = {}
        self._scale = np.asarray(self.info.std, np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
        self._shift = np.asarray(self.info.mean, np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
        self.session_for(1)  # load now: a bad model fails here, not on the first image

    def session_for(self, batch: Optional[int]) -> ort.InferenceSession:
        """The session for ``batch`` images at ``input_size``, with every axis pinned (so shape
        arithmetic folds away and ODConv runs as a plain convolution at batch 1); ``None``: the
        fully dynamic session, for other sizes. Sessions are built on first use and kept."""
        if batch not in self._sessions:
            if len(self._sessions) >= MAX_SESSIONS:  # predict uses two batch sizes: full and remainder
                self._sessions.pop(next(iter(self._sessions)))
            fixed = None if batch is None else self.input_size
            self._sessions[batch] = make_session(self.path, self.threads, self.providers, fixed, batch, self.optimize)
        return self._sessions[batch]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 images (N, 3, H, W), any size -> logits (N, 1, H, W)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        session = self.session_for(x.shape[0] if tuple(x.shape[2:]) == self.input_size else None)
        return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, ``(x / 255 - mean) / std`` (as the PyTorch preset)."""
        x = images.transpose(0, 3, 1, 2).astype(np.float32)
        return (x - self._shift) / self._scale

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB at ``input_size`` -> (B, H, W) float32 lesion probabilities."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != (*self.input_size, 3):
            raise ValueError(f"expected (B, {self.input_size[0]}, {self.input_size[1]}, 3) images, "
                             f"got {images.shape}")
        x = self.normalize(images)
        flips = TTA_FLIPS if self.tta else TTA_FLIPS[:1]
        # All flips in one run: the batch is the cheap dimension.
        logits = self.logits(np.concatenate([np.flip(x, axes) if axes else x for axes in flips]))
        views = np.split(sigmoid(logits[:, 0:1]), len(flips))
        probs = sum(np.flip(p, axes) if axes else p for p, axes in zip(views, flips)) / len(flips)
        return np.ascontiguousarray(probs[:, 0], dtype=np.float32)

    def segment(self, image: ImageLike, threshold: Optional[float] = None) -> np.ndarray:
        """Lesion mask of one image (path, PIL image or array) as bool (H, W) at its own size."""
        from .inference import predict_probabilities

        probs = predict_probabilities([to_rgb_array(image)], self)[0]
        return probs >= (self.threshold if threshold is None else threshold)

    def describe(self) -> dict[str, Any]:
        """Model file, architecture, weights and preprocessing, for logs and result files."""
        return {"model": str(self.path), "arch": self.info.arch, "weights": self.info.weights,
                "resize_size": list(self.input_size), "mean": list(self.info.mean), "std": list(self.info.std),
                "threshold": self.threshold, "providers": self.session_for(1).get_providers()}
