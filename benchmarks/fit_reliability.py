"""Fit the reliability score on val (plain and shifted), or measure how well a fitted one works.

    .venv/bin/python benchmarks/fit_reliability.py fit --weights scsonet-isic2017 --data data/isic2017 \\
        --split val --out src/scsonet/weights/scsonet_isic2017_v1.reliability.json
    .venv/bin/python benchmarks/fit_reliability.py evaluate --model src/scsonet/weights/scsonet_isic2017_v1.reliability.json \\
        --weights scsonet-isic2017 --data data/isic2017 --split test --out docs/robustness/reliability_v1_test.json
    .venv/bin/python benchmarks/fit_reliability.py collect --split test --sample 120 --out ROWS.json
    .venv/bin/python benchmarks/fit_reliability.py evaluate --model MODEL.json --rows ROWS.json --out REPORT.json

Every image of the split and of each ``--shifts`` (``scsonet.shifts``, seeded per image) goes
through two-pass prediction (``scsonet.twopass``, its defaults; ``--one-pass`` to fit without
it), then ``scsonet.reliability.reliability_features`` and its Dice against the mask. ``fit``
fits the logistic model (target: Dice >= 0.7) on all of them, chooses the review threshold so
that ``--catch`` of the images with Dice < 0.5 fall under it, and writes the JSON (``fit``
refuses any split but val). ``evaluate`` reports AUROC (Dice < 0.7 against the rest) on the
unshifted split and on the shifted images pooled, and what the review flag catches; ``collect``
only writes the rows (features and Dice per image), which ``evaluate --rows`` scores later.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from twopass_eval import load_segmenter  # noqa: E402

from scsonet._io import write_json_atomic  # noqa: E402
from scsonet.data import PreparedData  # noqa: E402
from scsonet.errors import ScsonetError  # noqa: E402
from scsonet.postprocess import resize_probabilities  # noqa: E402
from scsonet.reliability import FEATURES, ReliabilityModel, auroc, choose_review_threshold, reliability_features  # noqa: E402
from scsonet.shifts import get_shifts, shifted_pairs  # noqa: E402
from scsonet.twopass import two_pass_batch  # noqa: E402

# The shifts fitted on and evaluated: the zoom-outs and zoom-in (where v1 fails most) and one of
# each other kind (a photometric change, JPEG, a frame); the rest behave as the plain split.
DEFAULT_SHIFTS = ("small_lesions", "zoom_out_flat_2", "zoom_out_flat_3", "zoom_out_skin_2", "zoom_out_skin_3",
                  "zoom_in", "low_contrast", "jpeg30", "frame")
FITTED = tuple(f for f in FEATURES if f != "flip_disagreement")  # no flips at run time by default
GOOD_DICE = 0.7


def collect(segmenter, images, masks, ids, shift_names, *, two_pass: bool = True, seed: int = 0,
            threshold: float = 0.5, batch_size: int = 50, log=print) -> list[dict[str, Any]]:
    """One row per (shift, image): shift, id, dice, features."""
    rows = []
    for shift in get_shifts(["none", *shift_names]):
        start = time.perf_counter()
        pairs = list(shifted_pairs(shift, images, masks, ids, seed=seed))
        for k in range(0, len(pairs), batch_size):
            chunk = pairs[k:k + batch_size]
            batch = [image for _, image, _ in chunk]
            results = two_pass_batch(batch, segmenter, threshold=threshold, **({} if two_pass else {"max_crop_share": -1.0}))
            for (i, _, mask), (probs, info) in zip(chunk, results):
                if not two_pass:
                    probs, info = resize_probabilities(info.pass1_small, mask.shape), None
                pred, truth = probs >= threshold, mask.astype(bool)
                total = int(pred.sum()) + int(truth.sum())
                dice = 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total
                rows.append({"shift": shift.name, "id": ids[i], "dice": round(dice, 5),
                             **reliability_features(probs, info, threshold)})
        log(f"{shift.name}: {len(pairs)} images in {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def _summary(scores: np.ndarray, dices: np.ndarray, threshold: float) -> dict[str, Any]:
    review = scores < threshold
    bad, poor = dices < 0.5, dices < GOOD_DICE
    return {"n": int(len(dices)), "dice_below_0.7": int(poor.sum()), "dice_below_0.5": int(bad.sum()),
            "auroc": None if np.isnan(area := auroc(scores, (dices >= GOOD_DICE).astype(int))) else round(area, 4),
            "review_rate": round(float(review.mean()), 4) if len(review) else None,
            "review_catches_dice_below_0.5": round(float(review[bad].mean()), 4) if bad.any() else None,
            "review_catches_dice_below_0.7": round(float(review[poor].mean()), 4) if poor.any() else None,
            "mean_dice_reviewed": round(float(dices[review].mean()), 4) if review.any() else None,
            "mean_dice_not_reviewed": round(float(dices[~review].mean()), 4) if (~review).any() else None}


def evaluate_rows(model: ReliabilityModel, rows: list[dict[str, Any]]) -> dict[str, Any]:
    scores = model.score_many(rows)
    dices = np.array([r["dice"] for r in rows])
    plain = np.array([r["shift"] == "none" for r in rows])
    out = {"unshifted": _summary(scores[plain], dices[plain], model.review_threshold),
           "shifted_pooled": _summary(scores[~plain], dices[~plain], model.review_threshold), "per_shift": {}}
    for name in dict.fromkeys(r["shift"] for r in rows):
        keep = np.array([r["shift"] == name for r in rows])
        out["per_shift"][name] = _summary(scores[keep], dices[keep], model.review_threshold)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["fit", "evaluate", "collect"],
                   help="fit (val), evaluate a fitted model, or collect: only write the rows (features, Dice)")
    p.add_argument("--weights", default="scsonet-isic2017", help="weights name or file (scsonet-isic2017)")
    p.add_argument("--data", type=Path, default=Path("data/isic2017"), help="prepared dataset (data/isic2017)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split (val)")
    p.add_argument("--out", type=Path, required=True, help="fit: the model JSON; evaluate: the report JSON")
    p.add_argument("--model", type=Path, help="evaluate: the fitted model JSON")
    p.add_argument("--rows", type=Path, action="append", help="evaluate: rows written by collect (repeatable) instead of predicting")
    p.add_argument("--shifts", default=",".join(DEFAULT_SHIFTS), help="comma-separated shift names")
    p.add_argument("--one-pass", action="store_true", help="predict with one pass, not two")
    p.add_argument("--catch", type=float, default=0.9, help="share of Dice < 0.5 images the review flag must catch (0.9)")
    p.add_argument("--l2", type=float, default=1e-2, help="L2 penalty on the standardised coefficients (0.01)")
    p.add_argument("--backend", default="onnx", choices=["torch", "onnx"], help="(onnx: the same outputs, faster)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the split (all)")
    p.add_argument("--sample", type=int, default=None, help="only N images of the split drawn at random with --seed (all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    try:
        return _run(args, sys.argv[1:] if argv is None else argv)
    except ScsonetError as err:
        print(f"fit_reliability.py: error: {err}", file=sys.stderr)
        return 2


def _run(args, argv: list[str]) -> int:
    if args.mode == "fit" and args.split != "val":
        raise ScsonetError(f"the reliability score is fitted on val only (--split {args.split})")
    if args.mode == "evaluate" and args.model is None:
        raise ScsonetError("evaluate needs --model")
    model = ReliabilityModel.load(args.model) if args.mode == "evaluate" else None
    command = shlex.join([".venv/bin/python", "benchmarks/fit_reliability.py", *argv])
    if args.mode == "evaluate" and args.rows:
        rows = []
        for path in args.rows:
            try:
                rows += json.loads(path.read_text())["rows"]
            except (OSError, ValueError, KeyError) as err:
                raise ScsonetError(f"--rows: unreadable rows file ({path}: {err})") from None
        summary = evaluate_rows(model, rows)
        write_json_atomic(args.out, {"command": command, "model": str(args.model), "rows_from": [str(r) for r in args.rows],
                                     **summary})
        for part in ("unshifted", "shifted_pooled"):
            print(part, summary[part])
        return 0
    shift_names = [s for s in args.shifts.split(",") if s]
    try:
        get_shifts(shift_names)
    except KeyError as err:
        raise ScsonetError(f"--shifts: {err.args[0]}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    arrays = PreparedData(args.data).load(args.split)
    keep = np.arange(args.limit or len(arrays.ids))
    if args.sample:  # the first images of a split are not a fair sample (ISIC's older, larger lesions)
        keep = np.sort(np.random.default_rng(args.seed).choice(len(arrays.ids), min(args.sample, len(arrays.ids)), replace=False))
    images = list(arrays.images[keep].permute(0, 2, 3, 1).numpy())
    masks = list(arrays.masks[keep, 0].numpy())
    ids = [arrays.ids[i] for i in keep]
    segmenter = load_segmenter(args.weights, args.backend)
    rows = collect(segmenter, images, masks, ids, shift_names, two_pass=not args.one_pass, seed=args.seed)
    if args.mode == "collect":
        write_json_atomic(args.out, {"command": command, "weights": args.weights, "split": args.split,
                                     "n_split_images": len(ids), "shifts": ["none", *shift_names], "rows": rows})
        print(f"wrote {args.out} ({len(rows)} rows) in {time.perf_counter() - started:.0f} s")
        return 0
    if args.mode == "fit":
        labels = [int(r["dice"] >= GOOD_DICE) for r in rows]
        model = ReliabilityModel.fit(rows, labels, FITTED, l2=args.l2, command=command, weights=args.weights,
                                     split=args.split, shifts=["none", *shift_names], seed=args.seed,
                                     two_pass=not args.one_pass, n_images=len(rows), n_dice_ge_0_7=sum(labels))
        scores = model.score_many(rows)
        model.review_threshold = round(choose_review_threshold(scores, [r["dice"] for r in rows], args.catch), 4)
        model.meta["review_rule"] = f"catches {args.catch:g} of the fitted images with Dice < 0.5"
        model.meta["fit"] = evaluate_rows(model, rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        model.save(args.out)
        summary = model.meta["fit"]
    else:
        summary = evaluate_rows(model, rows)
        write_json_atomic(args.out, {"command": command, "model": str(args.model), "weights": args.weights,
                                     "split": args.split, "n_split_images": len(ids), "seconds": round(time.perf_counter() - started),
                                     **summary, "rows": rows})
    for part in ("unshifted", "shifted_pooled"):
        print(part, summary[part])
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
