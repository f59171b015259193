"""Robustness benchmark: lesion outlines on a prepared split under shifts that mimic real photos.

    .venv/bin/python benchmarks/robustness.py --weights v1=scsonet-isic2017 --data data/isic2017 \\
        --split test --out docs/robustness/v1_test.md

Each shift of ``scsonet.shifts.STANDARD_SHIFTS`` (or those named by ``--shifts``) is applied to
every image of the split, seeded per image (``--seed``), and every image goes through
``scsonet predict``'s path: ``scsonet.inference.predict_batch`` with a ``TorchSegmenter``,
two-pass by default as in ``scsonet predict`` (``--no-two-pass``: one pass), then
``probability >= --threshold``. Per shift and weights: pooled DSC, mean per-image Dice and the
failure rate (share of images with Dice < 0.5); the unshifted split is also cut into the
lesion-size bands of ``scsonet.shifts.SIZE_BANDS``. Several ``--weights`` share one table and
see the same shifted images. Choices are made on ``--split val``, never on test.

Writes OUT (Markdown), OUT with .json (settings, every figure, and per image and shift the Dice,
TP, FP and FN, for fitting a reliability score) and with .csv (one row per weights and row).

Predictor hook: ``--predictor MODULE:FACTORY`` (or ``path/to/file.py:FACTORY``) replaces the
default ``torch_predictor`` (``--no-two-pass`` does not reach it): ``FACTORY(weights, device, tta)`` returns a callable that maps a
list of RGB uint8 images (H, W, 3) to a list of float probability maps (H, W), one per image at
its size. Two-pass prediction, TTA or ensembles are measured by passing such a factory;
``run_benchmark`` takes the callables directly.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import io
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from scsonet._device import resolve_device
from scsonet._io import write_json_atomic, write_text_atomic
from scsonet.data import PreparedData
from scsonet.errors import ScsonetError
from scsonet.inference import TorchSegmenter, predict_batch
from scsonet.metrics import ConfusionStats, get_stats, per_image_scores, pooled_metrics
from scsonet.models import load_model
from scsonet.shifts import SIZE_BANDS, Shift, get_shifts, lesion_fraction, shifted_pairs, size_band

Predictor = Callable[[list[np.ndarray]], list[np.ndarray]]
FAILURE_DICE = 0.5


def torch_predictor(weights: str, device: str = "cpu", tta: bool = False, *, two_pass: bool = True,
                    threshold: float = 0.5) -> Predictor:
    """``scsonet predict``'s path: a ``TorchSegmenter`` of ``weights`` behind ``predict_batch``,
    two-pass by default as in ``scsonet predict`` (``threshold`` finds pass 1's lesion)."""
    resolved = resolve_device(device)
    segmenter = TorchSegmenter(load_model(weights, resolved), resolved, tta)

    def predict(images: list[np.ndarray]) -> list[np.ndarray]:
        return [probs for probs, _ in predict_batch(images, segmenter, threshold, two_pass)]
    return predict


def load_split(data: Path, split: str, limit: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """A prepared split as lists: RGB uint8 images (H, W, 3), bool-valued masks (H, W) and ids,
    only the first ``limit`` images if given."""
    arrays = PreparedData(data).load(split)
    stop = limit or len(arrays.ids)
    return (list(arrays.images[:stop].permute(0, 2, 3, 1).numpy()), list(arrays.masks[:stop, 0].numpy()),
            list(arrays.ids[:stop]))


def load_factory(spec: str) -> Callable[..., Predictor]:
    """``MODULE:NAME`` or ``FILE.py:NAME`` -> the predictor factory it names."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ScsonetError(f"--predictor {spec!r} is not MODULE:FACTORY or FILE.py:FACTORY")
    if where.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(where).stem, where)
        if module_spec is None or not Path(where).is_file():
            raise ScsonetError(f"--predictor: no such file ({where})")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not callable(factory := getattr(module, name, None)):
        raise ScsonetError(f"--predictor: {where} has no callable {name!r}")
    return factory


def _counts(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """(N, 3) TP, FP, FN of each image (sizes may differ between images)."""
    out = []
    for p, m in zip(probs, masks):
        if p.shape != m.shape:
            raise ValueError(f"the predictor returned a {p.shape} map for a {m.shape} image")
        stats = get_stats(torch.from_numpy(np.array(p[None], np.float32)), torch.from_numpy(m[None]), threshold)
        out.append([int(stats.tp), int(stats.fp), int(stats.fn)])
    return np.array(out, np.int64).reshape(-1, 3)


def summarize(counts: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Row figures (n, pooled DSC, mean Dice, failure rate) and each image's Dice from (N, 3) counts."""
    tp, fp, fn = (torch.from_numpy(np.ascontiguousarray(counts[:, k])) for k in range(3))
    stats = ConfusionStats(tp, fp, fn, torch.zeros_like(tp))  # TN enters neither Dice
    dice = per_image_scores(stats)[0].numpy()
    n = len(dice)
    row = {"n": n, "pooled_dsc": pooled_metrics(stats)["dsc"] if n else None,
           "mean_dice": float(dice.mean()) if n else None,
           "failure_rate": float((dice < FAILURE_DICE).mean()) if n else None,
           "failures": int((dice < FAILURE_DICE).sum())}
    return row, dice


def run_benchmark(predictors: dict[str, Predictor], images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  ids: Sequence[str], shifts: Sequence[Shift], *, seed: int = 0, threshold: float = 0.5,
                  batch_size: int = 32, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score every predictor on every shift and on the size bands of the unshifted images.

    Shifts without a transform (subsets) reuse the unshifted predictions. Returns
    ``{"rows": {label: {row: figures}}, "per_image": {label: {shift: {index, dice, tp, fp, fn}}},
    "predict_seconds": {label: s}}``; row names are the shifts' names and ``band <5 %`` etc.
    """
    counts: dict[str, dict[str, tuple[list[int], np.ndarray]]] = {label: {} for label in predictors}
    seconds = dict.fromkeys(predictors, 0.0)
    plain = get_shifts(["none"])[0]
    todo = [plain] + [s for s in shifts if s.transform is not None]
    for shift in todo:
        start = time.perf_counter()
        index, parts = [], {label: [] for label in predictors}
        pairs = shifted_pairs(shift, images, masks, ids, seed=seed)
        while chunk := [pair for _, pair in zip(range(batch_size), pairs)]:
            index += [i for i, *_ in chunk]
            batch, batch_masks = [c[1] for c in chunk], [c[2] for c in chunk]
            for label, predictor in predictors.items():
                t = time.perf_counter()
                probs = predictor(batch)
                seconds[label] += time.perf_counter() - t
                parts[label].append(_counts(probs, batch_masks, threshold))
        for label in predictors:
            counts[label][shift.name] = (index, np.concatenate(parts[label]))
        figures = ", ".join(f"{label} {100 * summarize(counts[label][shift.name][1])[0]['pooled_dsc']:.1f}"
                            for label in predictors)
        log(f"{shift.name}: {len(index)} images in {time.perf_counter() - start:.1f} s; pooled DSC {figures}")
    for shift in shifts:
        if shift.transform is None and shift.name != plain.name:
            keep = [i for i, *_ in shifted_pairs(shift, images, masks, ids, seed=seed)]
            for label in predictors:
                counts[label][shift.name] = (keep, counts[label][plain.name][1][keep])

    bands = [size_band(m) for m in masks]
    result: dict[str, Any] = {"rows": {}, "per_image": {}, "predict_seconds": seconds}
    for label in predictors:
        rows, per_image = {}, {}
        for shift in shifts:
            index, c = counts[label][shift.name]
            rows[shift.name], dice = summarize(c)
            per_image[shift.name] = {"dice": [round(float(d), 5) for d in dice], "tp": c[:, 0].tolist(),
                                     "fp": c[:, 1].tolist(), "fn": c[:, 2].tolist()}
            if shift.keep is not None:  # a subset: which images of the split
                per_image[shift.name]["index"] = index
        for name, *_ in SIZE_BANDS:
            keep = [i for i, band in enumerate(bands) if band == name]
            rows[f"band {name}"] = summarize(counts[label][plain.name][1][keep])[0]
        result["rows"][label], result["per_image"][label] = rows, per_image
    return result


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def format_markdown(report: dict[str, Any]) -> str:
    labels = list(report["weights"])
    head = "| row | images | " + " | ".join(f"{l} pooled DSC | {l} mean Dice | {l} Dice < 0.5" for l in labels) + " |"
    rule = "| --- | ---: | " + " | ".join("---: | ---: | ---:" for _ in labels) + " |"

    def table(names: list[str], titles: dict[str, str]) -> list[str]:
        lines = [head, rule]
        for name in names:
            first = report["rows"][labels[0]][name]
            cells = [f"{_pct(r['pooled_dsc'], 2)} | {_pct(r['mean_dice'], 2)} | {_pct(r['failure_rate'])} % ({r['failures']})"
                     for r in (report["rows"][l][name] for l in labels)]
            lines.append(f"| {titles[name]} | {first['n']} | " + " | ".join(cells) + " |")
        return lines

    shift_titles = {s["name"]: s["label"] for s in report["shifts"]}
    band_names = [f"band {name}" for name, *_ in SIZE_BANDS]
    weights = ", ".join(f"{label} = `{spec}`" for label, spec in report["weights"].items())
    seconds = ", ".join(f"{label} {s:.0f} s" for label, s in report["predict_seconds"].items())
    cpu = f", CPU time {report['cpu_seconds']:.0f} s," if "cpu_seconds" in report else ""  # absent before it was kept
    lines = [
        f"# Robustness on the {report['split']} split ({report['n_images']} images)", "",
        f"Written by `{report['command']}`.", "",
        f"Weights: {weights}. Predictor: {report['predictor']}; threshold {report['threshold']}, "
        f"TTA {'on' if report['tta'] else 'off'}, seed {report['seed']}. Wall time {report['wall_seconds']:.0f} s "
        f"(predictions: {seconds}){cpu} on {report['machine']}.", "",
        "Pooled DSC and mean per-image Dice in %; Dice < 0.5: share of images (count) whose outline fails.", "",
        "## Shifts", "", *table([s["name"] for s in report["shifts"]], shift_titles), "",
        "## Lesion-size bands of the unshifted split (lesion share of the image)", "",
        *table(band_names, {n: n.removeprefix("band ") for n in band_names}), "",
        "## How each shift is built", "",
        "Seeded per image (`scsonet.shifts.image_rng`); see `src/scsonet/shifts.py` for every parameter.", "",
    ]
    lines += [f"- **{s['name']}** ({s['label']}): {s['description'] or 'the images as they are.'}"
              for s in report["shifts"]]
    return "\n".join(lines) + "\n"


def compare_markdown(reports: dict[str, dict[str, Any]]) -> str:
    """One table of several saved reports side by side (``--compare``): per row, each column's
    pooled DSC and failure rate; a column is LABEL (a report with one weights) or LABEL WEIGHTS."""
    first = next(iter(reports.values()))
    columns = []  # (title, rows of one weights)
    for label, report in reports.items():
        if report["split"] != first["split"] or report["ids"] != first["ids"] or report["seed"] != first["seed"]:
            raise ScsonetError(f"--compare {label}: another split, image set or seed than the first report")
        for weights, rows in report["rows"].items():
            columns.append((label if len(report["rows"]) == 1 else f"{label} {weights}", rows))
    head = "| row | images | " + " | ".join(f"{t} pooled DSC | {t} Dice < 0.5" for t, _ in columns) + " |"
    names = [(s["name"], s["label"]) for s in first["shifts"]] + \
            [(f"band {name}", f"lesion {name} of the image (unshifted)") for name, *_ in SIZE_BANDS]
    lines = [head, "| --- | ---: | " + " | ".join("---: | ---:" for _ in columns) + " |"]
    for name, title in names:
        if any(name not in rows for _, rows in columns):
            raise ScsonetError(f"--compare: row {name!r} is missing from a report")
        cells = [f"{_pct(rows[name]['pooled_dsc'], 2)} | {_pct(rows[name]['failure_rate'])} % ({rows[name]['failures']})"
                 for _, rows in columns]
        lines.append(f"| {title} | {columns[0][1][name]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["weights", "row", "n", "pooled_dsc", "mean_dice", "failure_rate", "failures"])
    for label, rows in report["rows"].items():
        for name, r in rows.items():
            writer.writerow([label, name, r["n"], *(f"{r[k]:.6f}" if r[k] is not None else "" for k in
                                                    ("pooled_dsc", "mean_dice", "failure_rate")), r["failures"]])
    return buffer.getvalue()


def _read_report(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ScsonetError(f"cannot read the saved report {path} ({err})") from None


def _parse_weights(specs: list[str], option: str = "--weights") -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        label, sep, weights = spec.partition("=")
        label, weights = (label, weights) if sep else (spec, spec)
        if not label or not weights or label in out:
            raise ScsonetError(f"{option} {spec!r}: give VALUE or LABEL=VALUE, each label once")
        out[label] = weights
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", action="append", default=None,
                   help="weights name, .pt or .safetensors, optionally LABEL=WEIGHTS; repeat to compare")
    p.add_argument("--data", type=Path, default=Path("data/isic2017"), help="prepared dataset (data/isic2017)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (test)")
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write; .json and .csv beside it")
    p.add_argument("--shifts", default=None, help="comma-separated shift names (all of scsonet.shifts.STANDARD_SHIFTS)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shifts' draws (0)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability at or above which a pixel is lesion (0.5)")
    p.add_argument("--tta", action="store_true", help="flip TTA in the default predictor")
    p.add_argument("--no-two-pass", dest="two_pass", action="store_false",
                   help="one pass in the default predictor (default: two-pass, as scsonet predict)")
    p.add_argument("--predictor", default=None, help="MODULE:FACTORY or FILE.py:FACTORY (the scsonet predict path)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per prediction call (32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split (all)")
    p.add_argument("--render", action="store_true",
                   help="only rewrite OUT and its .csv from its saved .json (after a change of format; no predictions)")
    p.add_argument("--compare", action="append", default=None, metavar="LABEL=FILE.json",
                   help="only print one Markdown table of saved reports side by side (repeat; no predictions)")
    return run_script("robustness.py", _run, p.parse_args(argv), argv)


def run_script(name: str, run: Callable[[argparse.Namespace, list[str] | None], int],
               args: argparse.Namespace, argv: list[str] | None) -> int:
    """``run(args, argv)``; a ``ScsonetError`` becomes one line ``NAME: error: ...`` and status 2."""
    try:
        return run(args, argv)
    except ScsonetError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2


def _run(args, argv: list[str] | None) -> int:
    started, started_cpu = time.perf_counter(), time.process_time()
    if args.compare:
        print(compare_markdown({label: _read_report(Path(path)) for label, path in
                                _parse_weights(args.compare, "--compare").items()}), end="")
        return 0
    if not 0.0 < args.threshold < 1.0:
        raise ScsonetError(f"--threshold {args.threshold} must lie strictly between 0 and 1")
    if args.out is None or (args.weights is None and not args.render):
        raise ScsonetError("give --weights and --out (or --out with --render, or --compare)")
    if args.out.suffix != ".md":
        raise ScsonetError(f"--out {args.out} must name a .md file")
    if args.render:
        report = _read_report(args.out.with_suffix(".json"))
        for entry in report["shifts"]:  # labels and descriptions as the code now words them; figures unchanged
            shift = get_shifts([entry["name"]])[0]
            entry.update(label=shift.label, description=shift.description)
        write_json_atomic(args.out.with_suffix(".json"), report)
        _write_outputs(args.out, report)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = _parse_weights(args.weights)
    try:
        shifts = get_shifts(args.shifts.split(",") if args.shifts else None)
    except KeyError as err:
        raise ScsonetError(f"--shifts: {err.args[0]}") from None
    images, masks, ids = load_split(args.data, args.split, args.limit)
    factory = load_factory(args.predictor) if args.predictor else \
        partial(torch_predictor, two_pass=args.two_pass, threshold=args.threshold)
    predictors = {label: factory(spec, args.device, args.tta) for label, spec in weights.items()}
    result = run_benchmark(predictors, images, masks, ids, shifts, seed=args.seed, threshold=args.threshold,
                           batch_size=args.batch_size, log=lambda m: print(m, flush=True))
    argv = sys.argv[1:] if argv is None else argv
    report = {
        "command": shlex.join([".venv/bin/python", "benchmarks/robustness.py", *argv]),
        "data": str(args.data), "split": args.split, "n_images": len(ids), "seed": args.seed,
        "threshold": args.threshold, "tta": args.tta,
        "two_pass": None if args.predictor else args.two_pass,  # a --predictor decides for itself
        "predictor": args.predictor or f"scsonet predict's path (predict_batch, TorchSegmenter, "
                                       f"{'two-pass' if args.two_pass else 'one pass'})",
        "weights": weights,
        "machine": f"{torch.get_num_threads()} CPU thread(s)" if resolve_device(args.device).type == "cpu"
        else str(resolve_device(args.device)),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - started_cpu, 1),  # wall time inflates on a shared machine
        "predict_seconds": {k: round(v, 1) for k, v in result["predict_seconds"].items()},
        "shifts": [{"name": s.name, "label": s.label, "description": s.description,
                    "n": result["rows"][next(iter(weights))][s.name]["n"]} for s in shifts],
        "bands": [{"name": name, "low": low, "high": high} for name, low, high in SIZE_BANDS],
        "rows": result["rows"],
        "ids": ids,
        "lesion_fraction": [round(lesion_fraction(m), 6) for m in masks],
        "per_image": result["per_image"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), report)
    _write_outputs(args.out, report)
    return 0


def _write_outputs(out: Path, report: dict[str, Any]) -> None:
    write_text_atomic(out.with_suffix(".csv"), format_csv(report))
    write_text_atomic(out, format_markdown(report))
    print(f"wrote {out} (+ .json, .csv); the run took {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
