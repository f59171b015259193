"""Two-pass prediction (``scsonet.twopass``) against one pass, on the robustness shifts and on large photos.

    .venv/bin/python benchmarks/twopass_eval.py --weights scsonet-isic2017 --data data/isic2017 \\
        --split val --out docs/robustness/twopass_v1_val.md

Part 1 runs ``benchmarks/robustness.py``'s ``run_benchmark`` with two predictors on the same
shifted images: "one-pass" (``scsonet predict``'s path today) and "two-pass"
(``two_pass_batch`` with the module's defaults, or ``--context``, ``--max-crop-share``,
``--outside``). The benchmark's shifted images are 256 x 256 (made from the prepared data), so
pass 2 enlarges its crop; that still tests the logic.

Part 2 (``--large N``) builds N large photos from the split: each image is enlarged to its
ground-truth mask's original resolution (the prepared image was squashed from it), shrunk to
1 / ``--large-zoom`` of that side and pasted off-centre on a canvas of that original size made
of another image's most lesion-free quarter, enlarged. Dice is scored at full resolution.

``--truth-crop`` adds a third column, the bound of a perfect pass 1: pass 2 on a crop of the
tightest context around the GROUND TRUTH's lesion box (the image unchanged where it has no
lesion). Where two-pass falls far below it, finding the lesion is what fails, not outlining it.

Writes OUT (Markdown) and OUT with .json. Choices are made on ``--split val``, never on test.
"""
from __future__ import annotations

import argparse
import shlex
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from robustness import FAILURE_DICE, load_split, run_benchmark, run_script, summarize  # noqa: E402

from scsonet._device import resolve_device  # noqa: E402
from scsonet._io import write_json_atomic, write_text_atomic  # noqa: E402
from scsonet.errors import ScsonetError  # noqa: E402
from scsonet.inference import TorchSegmenter  # noqa: E402
from scsonet.models import load_model  # noqa: E402
from scsonet.postprocess import ProbabilityMap, crop_resized, resize_image, resize_probabilities  # noqa: E402
from scsonet.shifts import donor_pool, get_shifts, image_rng, shifted_pairs, skin_canvas, zoom_out  # noqa: E402
from scsonet.twopass import CONTEXT, MAX_CROP_SHARE, OUTSIDE, _bbox, crop_window, two_pass_batch  # noqa: E402

ZOOM_OUT = "zoom_out"  # shifts whose name contains this are the default set


class SharedPasses:
    """One- and two-pass predictors over one segmenter that share pass 1 on the same batch."""

    def __init__(self, segmenter: Any, **options):
        self.segmenter, self.options = segmenter, options
        self._key, self._result = None, None
        self.infos: list = []  # every image's TwoPassInfo, in call order

    def _run(self, batch: list[np.ndarray]):
        if self._key is not batch:  # run_benchmark hands both predictors the same list object
            self._key, self._result = batch, two_pass_batch(batch, self.segmenter, **self.options)
            self.infos += [info for _, info in self._result]
        return self._result

    def one_pass(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        return [resize_probabilities(info.pass1_small, rgb.shape[:2]) for rgb, (_, info) in zip(batch, self._run(batch))]

    def two_pass(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        return [probs for probs, _ in self._run(batch)]


def load_segmenter(weights: str, backend: str = "torch", device: str = "cpu", cache: Path | None = None) -> Any:
    """A ``Segmenter`` of ``weights``: ``TorchSegmenter``, or ``OrtSegmenter`` of the weights exported
    (and checked against PyTorch) to ``cache`` (default: a temporary file), about twice as fast on a CPU."""
    resolved = resolve_device(device)
    loaded = load_model(weights, resolved)
    if backend == "torch":
        return TorchSegmenter(loaded, resolved)
    from scsonet.export import export_onnx
    from scsonet.onnx_runtime import OrtSegmenter

    path = cache or Path(tempfile.mkdtemp()) / "model.onnx"
    if not path.exists():
        export_onnx(loaded, path)
    return OrtSegmenter(path, threads=torch.get_num_threads())


def two_pass_predictor(weights: str, device: str = "cpu", tta: bool = False, **options) -> Callable:
    """Factory for ``robustness.py --predictor benchmarks/twopass_eval.py:two_pass_predictor``."""
    resolved = resolve_device(device)
    return SharedPasses(TorchSegmenter(load_model(weights, resolved), resolved, tta), **options).two_pass


def _raw_mask(raw: Path, image_id: str) -> np.ndarray:
    for folder in ("ISIC-2017_Training_Part1_GroundTruth", "ISIC-2017_Validation_Part1_GroundTruth"):
        path = raw / folder / f"{image_id}_segmentation.png"
        if path.is_file():
            return np.asarray(Image.open(path).convert("L")) >= 128
    raise ScsonetError(f"no original-resolution mask for {image_id} under {raw}")


def large_photos(images: list[np.ndarray], masks: list[np.ndarray], ids: list[str], raw: Path, count: int,
                 zoom: float, seed: int = 0):
    """Yield (id, photo, mask) at the masks' original resolution: the image enlarged to it, then
    ``scsonet.shifts.zoom_out`` to 1 / ``zoom`` on a skin canvas from another image of the split."""
    picks = np.random.default_rng(seed).choice(len(ids), size=min(count, len(ids)), replace=False)
    donors = donor_pool(images, masks)
    for k in sorted(int(i) for i in picks):
        truth = _raw_mask(raw, ids[k]).astype(np.uint8)
        image = resize_image(images[k], truth.shape)
        others = [d for d in donors if d != k]
        donor = others[int(image_rng(seed, "large-donor", ids[k]).integers(len(others)))]
        canvas = skin_canvas(images[donor], masks[donor], truth.shape)
        photo, mask = zoom_out(image, truth, image_rng(seed, "large", ids[k]), 1 / zoom, canvas=canvas)
        yield ids[k], photo, mask


def _dice(probs: np.ndarray, mask: np.ndarray, threshold: float) -> tuple[float, np.ndarray]:
    pred, truth = probs >= threshold, mask.astype(bool)
    tp = int((pred & truth).sum())
    counts = np.array([tp, int(pred.sum()) - tp, int(truth.sum()) - tp])
    return 2 * tp / max(2 * tp + counts[1] + counts[2], 1), counts


def run_large(passes: SharedPasses, images, masks, ids, raw: Path, count: int, zoom: float, threshold: float,
              log=print) -> dict[str, Any]:
    rows, counts = [], {"one-pass": [], "two-pass": []}
    for image_id, photo, mask in large_photos(images, masks, ids, raw, count, zoom):
        start = time.perf_counter()
        batch = [photo]
        two = passes.two_pass(batch)[0]
        seconds = time.perf_counter() - start
        one = passes.one_pass(batch)[0]
        info = passes.infos[-1]
        d1, c1 = _dice(one, mask, threshold)
        d2, c2 = _dice(two, mask, threshold)
        counts["one-pass"].append(c1)
        counts["two-pass"].append(c2)
        rows.append({"id": image_id, "size": list(photo.shape[:2]), "dice_one": round(d1, 5), "dice_two": round(d2, 5),
                     "two_pass_seconds": round(seconds, 3), **info.to_dict()})
        log(f"large {image_id} {photo.shape[1]}x{photo.shape[0]}: Dice one {d1:.3f} two {d2:.3f} ({info.reason}, {seconds:.2f} s)")
    summary = {label: summarize(np.array(c).reshape(-1, 3))[0] for label, c in counts.items()}
    return {"zoom": zoom, "rows": rows, "summary": summary}


def truth_crop_rows(segmenter: Any, shifts, images, masks, ids, context: float, threshold: float, seed: int = 0,
                    batch_size: int = 50) -> dict[str, dict[str, Any]]:
    """Per shift, the figures of pass 2 on a crop around each image's ground-truth lesion box."""
    size = tuple(segmenter.input_size)
    rows = {}
    for shift in shifts:
        counts = []
        pairs = shifted_pairs(shift, images, masks, ids, seed=seed)
        while chunk := [pair for _, pair in zip(range(batch_size), pairs)]:
            windows = [crop_window(_bbox(mask), mask.shape, context) if mask.any() else [0, 0, mask.shape[1], mask.shape[0]]
                       for _, _, mask in chunk]
            patches = segmenter.predict_probs(np.stack([crop_resized(image, w, size) for (_, image, _), w in zip(chunk, windows)]))
            for (_, _, mask), window, patch in zip(chunk, windows, patches):
                counts.append(_dice(ProbabilityMap(mask.shape, None, window, patch).dense(), mask, threshold)[1])
        rows[shift.name] = summarize(np.array(counts).reshape(-1, 3))[0]
    return rows


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.2f}"


def format_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Two-pass prediction on the {report['split']} split ({report['n_images']} images)", "",
             f"Written by `{report['command']}`.", "",
             f"Weights `{report['weights']}`; two-pass options {report['options']}; threshold {report['threshold']}; "
             f"{report['machine']}, {report['wall_seconds']:.0f} s.", "",
             f"Pooled DSC in %, failure: Dice < {FAILURE_DICE}. \"pass 2 ran\": images where two-pass used its crop.", ""]
    truth = any("truth-crop" in r for r in report["rows"].values())
    if truth:
        lines += ["Truth crop: pass 2 on a crop around the ground truth's lesion box (context "
                  f"{report['options']['context'][0]:g}), the bound of a pass 1 that always finds the lesion.", ""]
    extra = " truth-crop DSC | truth-crop failures |" if truth else ""
    lines += ["| shift | images | one-pass DSC | two-pass DSC | one-pass failures | two-pass failures | pass 2 ran |" + extra,
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: | ---: |" * truth]
    for name, r in report["rows"].items():
        one, two = r["one-pass"], r["two-pass"]
        cells = f" {_pct(r['truth-crop']['pooled_dsc'])} | {_pct(r['truth-crop']['failure_rate'])} % " \
                f"({r['truth-crop']['failures']}) |" if truth else ""
        lines.append(f"| {name} | {one['n']} | {_pct(one['pooled_dsc'])} | {_pct(two['pooled_dsc'])} | "
                     f"{_pct(one['failure_rate'])} % ({one['failures']}) | {_pct(two['failure_rate'])} % ({two['failures']}) | "
                     f"{r['ran']} |" + cells)
    if report.get("large"):
        large = report["large"]
        one, two = large["summary"]["one-pass"], large["summary"]["two-pass"]
        secs = [r["two_pass_seconds"] for r in large["rows"]]
        sizes = sorted({f"{r['size'][1]}x{r['size'][0]}" for r in large["rows"]})
        lines += ["", f"## Large photos (zoomed out to 1/{large['zoom']:g} on skin, scored at full resolution)", "",
                  f"{one['n']} photos of sizes {', '.join(sizes[:6])}{' ...' if len(sizes) > 6 else ''}; "
                  f"two-pass {np.median(secs):.2f} s median per photo.", "",
                  "| | pooled DSC | failures |", "| --- | ---: | ---: |",
                  f"| one-pass | {_pct(one['pooled_dsc'])} | {_pct(one['failure_rate'])} % ({one['failures']}) |",
                  f"| two-pass | {_pct(two['pooled_dsc'])} | {_pct(two['failure_rate'])} % ({two['failures']}) |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="scsonet-isic2017", help="weights name or file (scsonet-isic2017)")
    p.add_argument("--data", type=Path, default=Path("data/isic2017"), help="prepared dataset (data/isic2017)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split (val)")
    p.add_argument("--out", type=Path, required=True, help="Markdown file; .json beside it")
    p.add_argument("--shifts", default=None, help=f"comma-separated shift names (none, small_lesions, zoom_in and every *{ZOOM_OUT}*)")
    p.add_argument("--context", type=lambda v: [float(c) for c in v.split(",")], default=list(CONTEXT),
                   help=f"crop side / lesion side, comma-separated, tightest first ({','.join(map(str, CONTEXT))})")
    p.add_argument("--max-crop-share", type=float, default=MAX_CROP_SHARE, help=f"({MAX_CROP_SHARE})")
    p.add_argument("--outside", default=OUTSIDE, choices=["zero", "pass1"], help=f"({OUTSIDE})")
    p.add_argument("--truth-crop", action="store_true",
                   help="also pass 2 on a crop around the ground truth's lesion (the bound of a perfect pass 1)")
    p.add_argument("--large", type=int, default=0, help="number of large photos to build and score (0)")
    p.add_argument("--large-zoom", type=float, default=3.0, help="the large photos' zoom-out factor (3)")
    p.add_argument("--raw", type=Path, default=Path("../shared/data/isic2017"), help="raw ISIC 2017 (original-size masks)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="torch", choices=["torch", "onnx"],
                   help="torch, or onnx: ONNX Runtime on the weights exported to a temporary file (torch)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--limit", type=int, default=None, help="only the first N images (all)")
    return run_script("twopass_eval.py", _run, p.parse_args(argv), argv)


def _run(args, argv) -> int:
    started = time.perf_counter()
    if args.out.suffix != ".md":
        raise ScsonetError(f"--out {args.out} must name a .md file")
    try:
        if args.shifts:
            shifts = get_shifts(args.shifts.split(","))
        else:
            shifts = [s for s in get_shifts(None) if s.name in ("none", "small_lesions", "zoom_in") or ZOOM_OUT in s.name]
    except KeyError as err:
        raise ScsonetError(f"--shifts: {err.args[0]}") from None
    images, masks, ids = load_split(args.data, args.split, args.limit)
    device = resolve_device(args.device)
    options = {"context": args.context, "max_crop_share": args.max_crop_share, "outside": args.outside,
               "threshold": args.threshold}
    passes = SharedPasses(load_segmenter(args.weights, args.backend, args.device), **options)
    labels = ("one-pass", "two-pass")
    result = run_benchmark({"one-pass": passes.one_pass, "two-pass": passes.two_pass}, images, masks, ids, shifts,
                           seed=args.seed, threshold=args.threshold, batch_size=args.batch_size,
                           log=lambda m: print(m, flush=True))
    # run_benchmark predicts the unshifted images, then each shift with a transform, all images each
    predicted = ["none"] + [s.name for s in shifts if s.transform is not None and s.name != "none"]
    if len(passes.infos) != len(predicted) * len(ids):
        raise RuntimeError("run_benchmark predicted another set of images than expected")
    ran = {name: sum(i.second_pass for i in passes.infos[k * len(ids):(k + 1) * len(ids)])
           for k, name in enumerate(predicted)}
    rows: dict[str, Any] = {}
    for shift in shifts:
        rows[shift.name] = {label: result["rows"][label][shift.name] for label in labels}
        rows[shift.name]["ran"] = ran.get(shift.name, "")  # a subset's images were predicted unshifted
        rows[shift.name]["per_image"] = {label: result["per_image"][label][shift.name]["dice"] for label in labels}
    if args.truth_crop:
        for name, figures in truth_crop_rows(passes.segmenter, shifts, images, masks, ids, args.context[0],
                                             args.threshold, args.seed, args.batch_size).items():
            rows[name]["truth-crop"] = figures
    large = run_large(passes, images, masks, ids, args.raw, args.large, args.large_zoom, args.threshold) \
        if args.large else None
    argv = sys.argv[1:] if argv is None else argv
    report = {"command": shlex.join([".venv/bin/python", "benchmarks/twopass_eval.py", *argv]),
              "weights": args.weights, "data": str(args.data), "split": args.split, "n_images": len(ids),
              "seed": args.seed, "threshold": args.threshold, "options": options,
              "backend": args.backend,
              "machine": f"{torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else str(device),
              "wall_seconds": round(time.perf_counter() - started, 1), "rows": rows, "large": large}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), report)
    write_text_atomic(args.out, format_markdown(report))
    print(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
