"""Export a model to ONNX or TorchScript; the file appears only once it matches PyTorch.

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
It exports SCSONet with dynamic batch, height and width on every torch from 2.2 on and needs no
package beyond ``onnx``; the dynamo exporter needs ``onnxscript`` and was still experimental in
the older releases that ``scsonet`` supports. By default the ONNX graph is that of
``scsonet.deploy.reparameterize(model)``: the same function re-expressed with fewer and cheaper
operations (a faster graph in ONNX Runtime), still checked against the original eager model.
Otherwise (``reparameterize=False``, other models, TorchScript) it is the plain model's graph
through ``scsonet.deploy.traceable(model)``, the export-time swap that lets one graph serve any
batch and size (the plain model has no branch for tracing).

After writing, the export is checked: ONNX Runtime (or the reloaded TorchScript module) against
the eager PyTorch model on random inputs (batches of 1, 3 and 8 at the preset size and one
250 x 333 image) and on real images. The largest absolute logit difference must stay under
``tolerance`` (1e-4); otherwise nothing is written. ``quantize='int8'`` then quantises the
checked ONNX graph statically (QDQ, per-channel int8 weights, activations calibrated on real
images); that model is approximate, so its check reports the mask agreement instead of failing.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import tempfile
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import __version__, deploy
from ._io import atomic_path
from .errors import ScsonetError
from .models import LoadedModel, load_model

__all__ = ["CheckResult", "ExportReport", "FORMATS", "QUANTIZE", "check_inputs", "export_model", "export_onnx",
           "export_torchscript", "image_batches", "model_metadata", "quantize_int8", "random_batches"]

FORMATS = ("onnx", "torchscript")
QUANTIZE = ("int8",)
DEFAULT_OPSET = 17
TOLERANCE = 1e-4
MIN_MASK_AGREEMENT = 0.9999
ODD_SIZE = (250, 333)  # sides that are not multiples of 32: exercises the model's padding
RANDOM_BATCHES = (1, 3, 8)
MAX_REAL_IMAGES = 50
MAX_CALIBRATION_IMAGES = 64
# Quantised operators: the convolutions and matmuls carry the arithmetic; the attention maps,
# norms and gates stay float (quantising them costs accuracy and some lack int8 kernels).
INT8_OPS = ["Conv", "MatMul"]
INT8_MIN_CHANNELS = 16
CHECK_BATCH = 8
TORCHSCRIPT_METADATA = "scsonet.json"  # extra file inside a TorchScript archive
_DYNAMIC_AXES = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}


@dataclass
class CheckResult:
    """One comparison of an exported model with the eager PyTorch model."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float  # largest |logit difference| to PyTorch in float32
    max_abs_diff_fp64: float  # ... and to PyTorch in float64 (the exact result, to ~1e-12)
    torch_fp32_error: float  # largest |logit difference| of PyTorch float32 itself to float64
    mask_agreement: float  # fraction of pixels on the same side of the threshold as float32 PyTorch

    @property
    def error(self) -> float:
        """The export's distance to the nearer of the two references."""
        return min(self.max_abs_diff, self.max_abs_diff_fp64)

    def passes(self, tolerance: float) -> bool:
        """Within ``tolerance`` of PyTorch, or no further from the exact result than PyTorch's own
        float32 computation, and the masks agree on at least ``MIN_MASK_AGREEMENT`` of the pixels."""
        return self.error <= max(tolerance, self.torch_fp32_error) and self.mask_agreement >= MIN_MASK_AGREEMENT

    def verdict(self, tolerance: float, exact: bool = True) -> str:
        """Why the row passes (or not), in words: which of ``passes``' two allowances it uses."""
        if not exact:
            return "measured (int8 is approximate; not gated)"
        if not self.passes(tolerance):
            return "FAIL"
        if self.error <= tolerance:
            return f"pass: within {tolerance:.0e}"
        return "pass: as close to float64 as torch float32"

    def line(self, tolerance: float = TOLERANCE, exact: bool = True) -> str:
        return (f"{self.name:<26} {'x'.join(map(str, self.shape)):<12} {self.max_abs_diff:>9.1e} "
                f"{self.max_abs_diff_fp64:>9.1e} {self.torch_fp32_error:>10.1e} "
                f"{100 * self.mask_agreement:>9.4f} %  {self.verdict(tolerance, exact)}")


def check_table(checks: Sequence[CheckResult], tolerance: float = TOLERANCE, exact: bool = True) -> str:
    """The export check as a table with a header saying what each column compares and a note
    saying when a row passes (a difference above the tolerance can pass; see ``_gate``)."""
    head = f"{'check':<26} {'input':<12} {'vs f32':>9} {'vs f64':>9} {'f32 vs f64':>10} {'masks':>11}  verdict"
    note = ["vs f32, vs f64: largest |logit difference| of the export to eager PyTorch in float32, in",
            "  float64 (the exact result); f32 vs f64: PyTorch float32's own difference to float64;",
            "  masks: pixels on the same side of the threshold as PyTorch float32."]
    if exact:
        own = max((c.torch_fp32_error for c in checks), default=0.0)
        note += [f"A row passes when the export is within --tolerance ({tolerance:.0e}) of either PyTorch, or",
                 "  no further from float64 than PyTorch float32 is (near the SRU gate's step at 0.5, float32",
                 f"  rounding alone moves logits, here by up to {own:.1e}), and its masks agree on at least",
                 f"  {100 * MIN_MASK_AGREEMENT:.2f} % of pixels."]
    else:
        note += ["An int8 model is approximate: the rows measure it, they do not gate the export."]
    return "\n".join([head, *(c.line(tolerance, exact) for c in checks), *note])


@dataclass
class ExportReport:
    path: Path
    format: str
    checks: list[CheckResult] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    exact: bool = True  # False for int8: the checks measure, they do not gate

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=float("nan"))

    @property
    def max_error(self) -> float:
        return max((c.error for c in self.checks), default=float("nan"))

    @property
    def mask_agreement(self) -> float:
        """Pixel-weighted agreement of the thresholded masks over all checked batches."""
        pixels = [int(np.prod(c.shape)) // c.shape[1] for c in self.checks]
        return float(np.average([c.mask_agreement for c in self.checks], weights=pixels)) if self.checks else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "exact": self.exact,
                "max_abs_diff": self.max_abs_diff, "max_error": self.max_error,
                "mask_agreement": self.mask_agreement, "checks": [asdict(c) for c in self.checks],
                "metadata": self.metadata}


def model_metadata(loaded: LoadedModel, threshold: Optional[float] = None, **extra: str) -> dict[str, str]:
    """What a runtime needs to feed the model and read its output, as string key/value pairs; with
    ``reliability`` (the reliability model shipped beside the weights, as JSON) when there is one,
    so that the one exported file carries it (``scsonet.onnx_runtime`` validates it on loading)."""
    from .inference import find_reliability_model

    preset = loaded.preset
    reliability = find_reliability_model(loaded.source)
    if reliability is not None:
        extra = {"reliability": json.dumps(reliability.to_dict(), separators=(",", ":")), **extra}
    return {
        "arch": loaded.name,
        "weights": loaded.source,
        "input_name": "image",
        "input_layout": "NCHW float32, RGB; any batch, height and width (sides padded to multiples of 32 inside)",
        "input_range": "RGB uint8 0..255, then (x / 255 - mean) / std per channel",
        "resize_size": json.dumps(list(preset.resize_size)),
        "mean": json.dumps(list(preset.mean)),
        "std": json.dumps(list(preset.std)),
        "threshold": str(float(loaded.meta.get("threshold", 0.5) if threshold is None else threshold)),
        "output": "logits (N, 1, H, W); lesion probability = sigmoid(logits); lesion where probability >= threshold",
        "scsonet_version": __version__,
        "torch_version": torch.__version__,
        **extra,
    }


def random_batches(size: tuple[int, int], seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Named standard-normal batches: 1, 3 and 8 images at ``size``, and one 250 x 333 image."""
    gen = torch.Generator().manual_seed(seed)
    batches = [(f"random batch {n}", torch.randn(n, 3, *size, generator=gen)) for n in RANDOM_BATCHES]
    return batches + [("random odd size", torch.randn(1, 3, *ODD_SIZE, generator=gen))]


def image_batches(loaded: LoadedModel, images: Sequence[str | os.PathLike],
                  max_images: int = MAX_REAL_IMAGES) -> list[tuple[str, torch.Tensor]]:
    """Up to ``max_images`` of ``images`` (files, folders, globs), resized and normalised as
    ``scsonet predict`` does, in named batches of ``CHECK_BATCH``."""
    from .imageio import expand_inputs, read_image
    from .postprocess import resize_image

    paths, errors = expand_inputs(images) if images else ([], [])
    if errors:
        raise ScsonetError(errors[0].message)
    paths = paths[:max_images]
    batches = []
    for start in range(0, len(paths), CHECK_BATCH):
        chunk = paths[start:start + CHECK_BATCH]
        rgb = np.stack([resize_image(read_image(p), tuple(loaded.preset.resize_size)) for p in chunk])
        label = chunk[0].name if len(chunk) == 1 else f"{chunk[0].name} +{len(chunk) - 1}"
        batches.append((f"real {label}", loaded.preset.normalize(torch.from_numpy(rgb).permute(0, 3, 1, 2).float())))
    return batches


def check_inputs(loaded: LoadedModel, images: Sequence[str | os.PathLike] = ()) -> list[tuple[str, torch.Tensor]]:
    """The batches an export is checked on: ``random_batches`` then ``image_batches``."""
    return random_batches(tuple(loaded.preset.resize_size)) + image_batches(loaded, images)


def default_check_images() -> list[Path]:
    """The sample images shipped with scsonet, if this installation has them."""
    try:
        from .inference import sample_images

        return sample_images()
    except (ImportError, OSError):
        return []


def _compare(run: Callable[[torch.Tensor], np.ndarray], model: nn.Module, batches, threshold: float) -> list[CheckResult]:
    """Run each batch through the export (``run``) and through ``model`` in float32 and float64."""
    model64 = copy.deepcopy(model).double()
    # Masks compared on logits: sigmoid(l) >= t  <=>  l >= log(t / (1 - t)).
    cut = np.log(threshold / (1 - threshold)) if 0 < threshold < 1 else (-np.inf if threshold <= 0 else np.inf)
    results = []
    with torch.inference_mode():
        for name, x in batches:
            expected, exact = model(x).numpy(), model64(x.double()).numpy()
            got = np.asarray(run(x))
            if got.shape != expected.shape:
                raise ScsonetError(f"exported model gives shape {got.shape} on {name}, PyTorch {expected.shape}")
            results.append(CheckResult(name, tuple(x.shape), float(np.max(np.abs(got - expected))),
                                       float(np.max(np.abs(got - exact))), float(np.max(np.abs(expected - exact))),
                                       float(np.mean((got >= cut) == (expected >= cut)))))
    return results


def _compare_onnx(path: Path, model: nn.Module, batches, threshold: float) -> list[CheckResult]:
    """``_compare`` through the sessions that ``scsonet predict --backend onnxruntime`` uses."""
    from .onnx_runtime import OrtSegmenter

    segmenter = OrtSegmenter(path)
    return _compare(lambda x: segmenter.logits(x.numpy()), model, batches, threshold)


def _gate(checks: list[CheckResult], out: Path, tolerance: float) -> None:
    """Refuse the export unless every batch ``passes``.

    PyTorch's float32 result is not exact either, and for trained SCSONet weights it can be far
    from it: the SRU gate jumps at w = 0.5 (W1 = 1 above, w below), so a rounding difference
    that moves one w across 0.5 changes the logits nearby by up to ~1e-2, and PyTorch float32
    and float64 disagree by that much. An export is therefore also accepted when it is no
    further from the float64 model than PyTorch float32 is; a wrong graph is off by far more.
    """
    for check in checks:
        if not check.passes(tolerance):  # also catches NaN
            raise ScsonetError(f"{out}: export check failed, not written: on {check.name} max |logit difference| "
                               f"to PyTorch {check.max_abs_diff:.3g} (float32), {check.max_abs_diff_fp64:.3g} "
                               f"(float64) > {max(tolerance, check.torch_fp32_error):.3g}, or masks agree on only "
                               f"{100 * check.mask_agreement:.4f} % of pixels")


def _quiet_export(fn: Callable[[], Any]) -> Any:
    """Run an exporter without its deprecation and tracer warnings (the checks judge the result),
    and without what it prints to the process's stdout and stderr itself: on a failure, a dump of
    the whole graph (thousands of lines) before the exception that says why."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as void, warnings.catch_warnings():
            os.dup2(void.fileno(), 1)
            os.dup2(void.fileno(), 2)
            warnings.simplefilter("ignore")
            return fn()
    finally:
        for fd, copy_of_it in zip((1, 2), saved):
            os.dup2(copy_of_it, fd)
            os.close(copy_of_it)


def _write_onnx(model: nn.Module, path: Path, size: tuple[int, int], opset: int, metadata: dict[str, str]) -> None:
    import onnx

    kwargs: dict[str, Any] = dict(input_names=["image"], output_names=["logits"], opset_version=opset,
                                  dynamic_axes=_DYNAMIC_AXES, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # torch >= 2.9 defaults to the dynamo exporter
    example = torch.zeros(1, 3, *size)
    try:
        _quiet_export(lambda: torch.onnx.export(model, (example,), str(path), **kwargs))
    except Exception as err:  # an opset the exporter, or one of the graph's operators, does not support
        text = str(err).strip().splitlines()
        raise ScsonetError(f"opset {opset}: torch {torch.__version__} cannot export the model at it "
                           f"({text[0] if text else type(err).__name__}); the default is {DEFAULT_OPSET}") from None
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "SCSONet skin-lesion segmentation; preprocessing in metadata_props"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_onnx(loaded: LoadedModel, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET, check: bool = True,
                check_images: Sequence[str | os.PathLike] = (), tolerance: float = TOLERANCE,
                threshold: Optional[float] = None, quantize: Optional[str] = None,
                calibration_images: Sequence[str | os.PathLike] = (), reparameterize: bool = True) -> ExportReport:
    """Write ``loaded`` as ONNX to ``out`` (atomically), with its preprocessing in the metadata.

    Args:
        loaded: model and preprocessing from ``scsonet.models.load_model``.
        out: the ``.onnx`` file.
        opset: ONNX opset (17).
        check: compare ONNX Runtime with PyTorch and refuse to write on a mismatch (True).
        check_images: real images (files, folders, globs) for the check, besides random inputs.
        tolerance: largest allowed absolute logit difference (1e-4).
        threshold: probability threshold recorded in the metadata (the weights', else 0.5).
        quantize: None, or ``'int8'`` for a statically quantised model (approximate).
        calibration_images: images that calibrate the int8 activation ranges (default: ``check_images``).
        reparameterize: export ``scsonet.deploy.reparameterize(model)``, the same function with a
            leaner graph (True); the checks still compare with the original model.
    """
    if quantize not in (None, *QUANTIZE):
        raise ScsonetError(f"quantize must be one of {QUANTIZE}, not {quantize!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 1:
        raise ScsonetError(f"opset must be a positive whole number, not {opset!r}")
    out = Path(out)
    model = loaded.model.cpu().eval()
    lean = reparameterize and deploy.is_reparameterizable(model)
    metadata = model_metadata(loaded, threshold, exporter=f"torch {torch.__version__} torch.onnx (TorchScript-based)",
                              opset=str(opset), precision=quantize or "float32", reparameterized=str(lean).lower())
    report = ExportReport(out, "onnx", metadata=metadata, exact=quantize is None)
    threshold = float(metadata["threshold"])
    with atomic_path(out) as tmp:
        graph = deploy.reparameterize(model) if lean else deploy.traceable(model)
        _write_onnx(graph, tmp, tuple(loaded.preset.resize_size), opset, metadata)
        if check or quantize:
            batches = check_inputs(loaded, check_images)
        if check:  # through the sessions that ``scsonet predict --backend onnxruntime`` uses
            report.checks = _compare_onnx(tmp, model, batches, threshold)
            _gate(report.checks, out, tolerance)
        if quantize:
            calibration = image_batches(loaded, calibration_images or check_images, MAX_CALIBRATION_IMAGES)
            if not calibration:
                raise ScsonetError(f"{out}: int8 quantisation needs real images to calibrate on "
                                   "(--calibration-images or --check-images)")
            quantize_int8(tmp, tmp, [x.numpy() for _, x in calibration])
            report.checks = _compare_onnx(tmp, model, batches, threshold)
    return report


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: Sequence[np.ndarray]) -> None:
    """Quantise an ONNX model statically: per-channel int8 weights, uint8 activations (QDQ), the
    activation ranges taken from ``calibration`` batches of normalised images.

    Only convolutions at least ``INT8_MIN_CHANNELS`` wide on both sides and matmuls are
    quantised: ONNX Runtime's int8 kernels are slower than float ones on the narrow layers
    (3 -> 8 channels in the stem, the bridge's 2 -> 1 spatial attention), so quantising those
    would cost accuracy and time.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(calibration)

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {"image": batch}

    proto = onnx.load(str(src))
    weights = {init.name: init.dims for init in proto.graph.initializer}
    narrow = [node.name for node in proto.graph.node if node.op_type == "Conv"
              and min(weights.get(node.input[1], (0, 0))[:2]) < INT8_MIN_CHANNELS]
    metadata = {p.key: p.value for p in proto.metadata_props}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the quantiser logs advice about every non-initializer bias
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # quantize_static writes side files (the augmented model) beside its output: keep them in tmp.
            staged = Path(tmp) / "int8.onnx"
            quantize_static(str(src), str(staged), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=INT8_OPS, nodes_to_exclude=narrow)
            proto = onnx.load(str(staged))
    finally:
        logging.disable(previous)
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(dst))


def export_torchscript(loaded: LoadedModel, out: str | os.PathLike, *, check: bool = True,
                       check_images: Sequence[str | os.PathLike] = (), tolerance: float = TOLERANCE,
                       threshold: Optional[float] = None) -> ExportReport:
    """Trace ``loaded`` to a TorchScript archive at ``out`` (atomically), for C++ and mobile.

    The archive holds ``scsonet.json`` (the preprocessing; ``torch.jit.load(path, _extra_files=...)``
    reads it) and accepts any batch, height and width. ``check`` reloads the archive and compares
    it with the eager model as ``export_onnx`` does. (Recent torch releases deprecate TorchScript
    in favour of ``torch.export``; libtorch and PyTorch Mobile still load these archives.)
    """
    out = Path(out)
    model = loaded.model.cpu().eval()
    metadata = model_metadata(loaded, threshold, exporter=f"torch {torch.__version__} torch.jit.trace")
    report = ExportReport(out, "torchscript", metadata=metadata)
    example = torch.zeros(1, 3, *loaded.preset.resize_size)
    with atomic_path(out) as tmp:
        with torch.no_grad():
            traced = _quiet_export(lambda: torch.jit.trace(deploy.traceable(model), example, check_trace=False))
        _quiet_export(lambda: torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)}))
        if check:
            reloaded = _quiet_export(lambda: torch.jit.load(str(tmp), map_location="cpu"))
            report.checks = _compare(lambda x: reloaded(x).numpy(), model, check_inputs(loaded, check_images),
                                     float(metadata["threshold"]))
            _gate(report.checks, out, tolerance)
    return report


def export_model(weights: str | os.PathLike | LoadedModel, out: str | os.PathLike, fmt: str = "onnx", **kwargs) -> ExportReport:
    """``scsonet export``: load ``weights`` (name, ``.pt`` or ``.safetensors``) and export to ``fmt``."""
    if fmt not in FORMATS:
        raise ScsonetError(f"format must be one of {FORMATS}, not {fmt!r}")
    loaded = weights if isinstance(weights, LoadedModel) else load_model(weights, "cpu")
    return (export_onnx if fmt == "onnx" else export_torchscript)(loaded, out, **kwargs)
