"""``scsonet evaluate``: score weights on a prepared split or a labelled folder; print a table,
write JSON + per-image CSV.

    scsonet evaluate --weights runs/exp1/best.pt --data data/isic2017 --split test --tta
    scsonet evaluate --weights scsonet-isic2017 --images ext/images --masks ext/masks

Output goes to ``--out``; by default beside a weights file (``<dir>/eval-<stem>-<split>[-tta]/``)
or, for a pretrained name, under the working directory (``eval/<name>-<split>[-tta]/``); for a
folder, ``<split>`` is the image folder's name.
"""
from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="metrics of weights on a prepared split or a labelled folder",
                              description="Evaluate weights on a prepared split (--data) or on a labelled folder "
                                          "(--images with --masks, paired by stem as `scsonet data prepare "
                                          "--dataset folder` pairs them, scored at each mask's own size through scsonet predict's "
                                          "path, two-pass and reliability score included): the paper's five "
                                          "pooled metrics, per-image Dice/IoU mean and std, and HD95 in pixels.")
    p.add_argument("--weights", required=True, help="pretrained name (scsonet-isic2017), .pt checkpoint or .safetensors")
    p.add_argument("--data", type=Path, default=None, help="prepared dataset directory (scsonet data prepare)")
    p.add_argument("--images", type=Path, default=None, help="instead of --data: folder (or .zip) of images")
    p.add_argument("--masks", type=Path, default=None, help="with --images: folder (or .zip) of their masks")
    p.add_argument("--skip-bad", action="store_true",
                   help="with --images: leave out bad inputs (unpaired, unreadable, non-binary), listed in the report")
    p.add_argument("--no-two-pass", dest="two_pass", action="store_false",
                   help="with --images: one pass only (default: two-pass, as scsonet predict: a second pass on a "
                        "crop around a lesion small in the frame)")
    p.add_argument("--split", default="test", help="split to evaluate (test)")
    p.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold for lesion (0.5)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto)")
    p.add_argument("--no-hd95", dest="hd95", action="store_false", help="skip the Hausdorff distance")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: beside the weights file, eval-<stem>-<split>[-tta]; "
                        "for a pretrained name, eval/<name>-<split>[-tta])")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    p.set_defaults(func=run)


def default_out_dir(weights: str, split: str, tta: bool) -> Path:
    tag = f"{split}-tta" if tta else split
    path = Path(weights)
    if path.is_file():
        return path.parent / f"eval-{path.stem}-{tag}"
    return Path("eval") / f"{weights}-{tag}"


def run(args) -> int:
    from ..data import PreparedData
    from ..errors import ScsonetError
    from ..evaluation import evaluate, evaluate_folder, format_report, write_report
    from ..models import load_model
    from .._device import resolve_device

    if not 0.0 < args.threshold < 1.0:
        raise ScsonetError(f"--threshold {args.threshold} must lie strictly between 0 and 1")
    if args.batch_size < 1:
        raise ScsonetError(f"--batch-size {args.batch_size} must be at least 1")
    folder = args.images is not None or args.masks is not None
    if folder and (args.images is None or args.masks is None or args.data is not None):
        raise ScsonetError("--images and --masks go together, without --data")
    if not folder and args.data is None:
        raise ScsonetError("name a prepared dataset (--data) or a labelled folder (--images with --masks)")
    if args.skip_bad and not folder:
        raise ScsonetError("--skip-bad goes with --images and --masks (a prepared dataset has no bad inputs)")
    if not args.two_pass and not folder:
        raise ScsonetError("--no-two-pass goes with --images and --masks (a prepared split is scored in one pass)")
    device = resolve_device(args.device)
    if folder:
        loaded = load_model(args.weights, device)
        report, rows = evaluate_folder(loaded, args.images, args.masks, batch_size=args.batch_size, device=device,
                                       tta=args.tta, threshold=args.threshold, hd95=args.hd95,
                                       skip_bad=args.skip_bad, progress=not args.json, two_pass=args.two_pass)
        tag = args.images.resolve().name
    else:
        arrays = PreparedData(args.data).load(args.split)
        loaded = load_model(args.weights, device)
        report, rows = evaluate(loaded, arrays, batch_size=args.batch_size, device=device, tta=args.tta,
                                threshold=args.threshold, hd95=args.hd95, split=args.split, progress=not args.json)
        report["data"] = str(args.data)
        tag = args.split
    out_dir = args.out or default_out_dir(args.weights, tag, args.tta)
    report_path, rows_path = write_report(report, rows, out_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        for kind in ("skipped", "warnings", "notes"):  # as `data prepare` lists them
            if report.get(kind):
                print(f"{kind}: {len(report[kind])} (listed in {report_path})")
                for item in report[kind][:5]:
                    print(f"  {item['file']}: {item['reason']}" if isinstance(item, dict) else f"  {item}")
        print(f"\nreport: {report_path}\nper image: {rows_path}")
    return 0
