"""``scsonet evaluate``: score weights on a prepared split; print a table, write JSON + per-image CSV.

    scsonet evaluate --weights runs/exp1/best.pt --data data/isic2017 --split test --tta

Output goes to ``--out``; by default beside a weights file (``<dir>/eval-<stem>-<split>[-tta]/``)
or, for a pretrained name, under the working directory (``eval/<name>-<split>[-tta]/``).
"""
from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="metrics of weights on a prepared split (pooled, per image, HD95)",
                              description="Evaluate weights on a prepared split: the paper's five pooled metrics, "
                                          "per-image Dice/IoU mean and std, and HD95 in pixels.")
    p.add_argument("--weights", required=True, help="pretrained name (scsonet-isic2017), .pt checkpoint or .safetensors")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset directory (scsonet prepare)")
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
    from ..evaluation import evaluate, format_report, write_report
    from ..models import load_model
    from .._device import resolve_device

    if not 0.0 < args.threshold < 1.0:
        raise ScsonetError(f"--threshold {args.threshold} must lie strictly between 0 and 1")
    if args.batch_size < 1:
        raise ScsonetError(f"--batch-size {args.batch_size} must be at least 1")
    device = resolve_device(args.device)
    arrays = PreparedData(args.data).load(args.split)
    loaded = load_model(args.weights, device)
    report, rows = evaluate(loaded, arrays, batch_size=args.batch_size, device=device, tta=args.tta,
                            threshold=args.threshold, hd95=args.hd95, split=args.split, progress=not args.json)
    report["data"] = str(args.data)
    out_dir = args.out or default_out_dir(args.weights, args.split, args.tta)
    report_path, rows_path = write_report(report, rows, out_dir)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        print(f"\nreport: {report_path}\nper image: {rows_path}")
    return 0
