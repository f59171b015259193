"""``scsonet export``: ONNX (dynamic batch and sides, preprocessing in its metadata) or TorchScript,
checked against PyTorch before the file is written."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ScsonetError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a model to ONNX or TorchScript, checked against PyTorch",
        description="Export weights to ONNX (dynamic batch, height and width; preprocessing in the model's "
                    "metadata) or TorchScript. The exported model is compared with PyTorch (float32 and float64) "
                    "on random and real images; unless it is within --tolerance of PyTorch or no further from "
                    "the float64 result than PyTorch float32 is, and its masks agree on 99.99 % of pixels, "
                    "nothing is written.")
    p.add_argument("--weights", default="scsonet-isic2017",
                   help="pretrained name, training checkpoint (.pt) or .safetensors with its card (scsonet-isic2017)")
    p.add_argument("--format", dest="fmt", choices=["onnx", "torchscript"], default="onnx", help="(onnx)")
    p.add_argument("--out", "-o", type=Path, required=True, help="output file (.onnx or .pt)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="statically quantise to int8 (ONNX; approximate: the check reports, not gates)")
    p.add_argument("--check-images", nargs="+", default=None, metavar="IMAGE",
                   help="real images (files, folders, globs) for the check (default: the shipped samples)")
    p.add_argument("--calibration-images", nargs="+", default=(), metavar="IMAGE",
                   help="images that calibrate int8 activations (default: the check images)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="allowed |logit difference| to PyTorch (1e-4)")
    p.add_argument("--no-reparameterize", dest="reparameterize", action="store_false",
                   help="export the model's own graph, not its leaner equivalent from scsonet.deploy (ONNX)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the comparison with PyTorch")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import check_table, default_check_images, export_model

    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise ScsonetError(f"--tolerance {args.tolerance}: expected a finite number > 0")
    check_images = default_check_images() if args.check_images is None else args.check_images
    kwargs = dict(check=args.check, check_images=check_images, tolerance=args.tolerance)
    if args.fmt == "onnx":
        kwargs.update(opset=args.opset, quantize=args.quantize, calibration_images=args.calibration_images,
                      reparameterize=args.reparameterize)
    elif args.quantize or args.opset != 17 or not args.reparameterize:
        raise ScsonetError("--opset, --quantize and --no-reparameterize apply to --format onnx only")
    report = export_model(args.weights, args.out, args.fmt, **kwargs)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    if report.checks:
        print(check_table(report.checks, args.tolerance, report.exact))
    if not report.checks:
        verdict = "not checked"
    elif not report.exact:
        verdict = "int8, approximate"
    else:
        verdict = (f"max |logit difference| to PyTorch {report.max_error:.1e}, masks agree on "
                   f"{100 * report.mask_agreement:.4f} % of pixels")
    print(f"wrote {args.out} ({args.fmt}; {verdict})")
    return 0
