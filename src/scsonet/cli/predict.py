"""``scsonet predict``: masks, outlined overlays and lesion figures for images, folders and globs."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..errors import ScsonetError

# Up to this many images, the onnxruntime backend builds its session without graph optimisations:
# that saves more start-up time than the slower runs cost (``session_options``).
FEW_IMAGES = 32


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="segment images: binary masks, overlays and lesion figures",
        description="Segment dermoscopic images (JPEG/PNG/BMP/TIFF, any size and mode). Per image, writes "
                    "<stem>_mask.png and <stem>_overlay.png into --out, and one row to results.jsonl as it goes "
                    "(results.csv and results.json are rebuilt from it at the end; they list every image "
                    "predicted into --out). A lesion small in the frame is outlined again from a crop of the "
                    "full-resolution image (two-pass). With weights that ship a reliability model (the pretrained "
                    "ones, and ONNX exports of them), each image gets a reliability score (0..1) and a review flag; "
                    "a reviewed image's overlay carries an amber REVIEW banner. "
                    "A folder's files that are not images are each named in a note and skipped; a file named "
                    "directly that is not an image is an error (exit status 2, nothing written). "
                    "Exit status 1 if any input failed; the others are still done.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders (not recursive) or glob patterns")
    p.add_argument("--out", "-o", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--samples", action="store_true", help="also segment the sample images shipped with scsonet")
    p.add_argument("--weights", default="scsonet-isic2017",
                   help="pretrained name, training checkpoint (.pt) or .safetensors with its card (scsonet-isic2017)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (auto)")
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto",
                   help="torch; onnxruntime (no PyTorch needed) with --weights MODEL.onnx from `scsonet export` or a "
                        "pretrained name (its shipped export); auto: onnxruntime for an .onnx file or when "
                        "PyTorch is not installed, else torch (auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the onnxruntime backend (one per core)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability at or above which a pixel is lesion (0.5)")
    p.add_argument("--tta", action="store_true", help="average over horizontal and vertical flips (4 passes)")
    p.add_argument("--no-two-pass", dest="two_pass", action="store_false",
                   help="one pass on the whole image resized to the model's size, no second pass on a crop "
                        "(the reliability score was fitted on two-pass outputs)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")
    p.add_argument("--save-probabilities", nargs="?", const="png", choices=["png", "npy"], default=None,
                   help="also write <stem>_prob.png (0..255) or, with 'npy', float32 <stem>_prob.npy")
    p.add_argument("--continue", dest="skip_existing", action="store_true",
                   help="skip images that an earlier (or interrupted) run with the same settings finished in --out")
    p.add_argument("--full-overlay", action="store_true",
                   help="write the overlay at the image's full size (default: longest side at most 1024; "
                        "the mask is always full size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..inference import PREVIEW_SIDE, predict_files, sample_images, torch_available

    inputs = [*args.inputs, *(sample_images() if args.samples else [])]
    if not inputs:
        raise ScsonetError("no inputs: name image files, folders or glob patterns, or pass --samples")
    if args.backend == "auto":
        args.backend = ("onnxruntime" if Path(args.weights).suffix == ".onnx" or not torch_available()
                        else "torch")
    if args.backend == "onnxruntime":
        from ..imageio import expand_inputs

        segmenter, source = _onnxruntime_segmenter(args, optimize=len(expand_inputs(inputs)[0]) > FEW_IMAGES)
    else:
        segmenter, source = _torch_segmenter(args)
    previous = _terminate_on_sigterm()
    try:
        rows = predict_files(inputs, segmenter, args.out, threshold=args.threshold, batch_size=args.batch_size,
                             save_probabilities=args.save_probabilities, skip_existing=args.skip_existing,
                             progress=not args.quiet,
                             settings={"backend": args.backend, "weights": source, "tta": args.tta},
                             two_pass=args.two_pass, reliability=getattr(segmenter, "reliability", None),
                             overlay_side=None if args.full_overlay else PREVIEW_SIDE)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    failed = sum(row["status"] == "error" for row in rows)
    no_lesion = sum(row["status"] == "ok" and not row["lesion_found"] for row in rows)
    review = sum(row["status"] == "ok" and bool(row["review"]) for row in rows)
    done = f", {rows.already_done} already done" if args.skip_existing else ""
    print(f"{len(rows) - failed - rows.already_done} image(s) segmented{done} ({no_lesion} with no lesion found, "
          f"{review} to review), "
          f"{failed} failed; masks, overlays and results.csv in {args.out}")
    return 1 if failed else 0


def _terminate_on_sigterm():
    """Make SIGTERM unwind like Ctrl-C (results.csv/json are rebuilt from the journal on the way
    out; exit status 143); returns the previous handler, or None off the main thread."""
    def terminate(signum, frame):
        print("scsonet predict: terminated; finished images are recorded, rerun with --continue",
              file=sys.stderr)
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # signal handlers can only be set from the main thread
        return None


def _torch_segmenter(args):
    from .._device import resolve_device
    from ..inference import TorchSegmenter, find_reliability_model
    from ..models import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.weights, device)
    return TorchSegmenter(loaded, device, tta=args.tta, reliability=find_reliability_model(args.weights)), loaded.source


def _onnxruntime_segmenter(args, optimize: bool = True):
    try:
        from ..onnx_runtime import OrtSegmenter
    except ImportError as err:
        raise ScsonetError(f"--backend onnxruntime needs the onnxruntime package ({err})") from None
    from ..inference import SHIPPED_ONNX, shipped_onnx

    model = Path(args.weights) if Path(args.weights).suffix == ".onnx" else shipped_onnx(args.weights)
    if model is None:
        raise ScsonetError(f"--backend onnxruntime needs --weights MODEL.onnx (from `scsonet export`) or "
                           f"{', '.join(SHIPPED_ONNX)}, not {args.weights!r}")
    if args.device not in ("auto", "cpu"):
        raise ScsonetError(f"--backend onnxruntime runs on the CPU; --device {args.device} is not supported")
    # A pretrained name is recorded as given, as the torch backend records it.
    return OrtSegmenter(model, threads=args.threads, tta=args.tta, optimize=optimize), str(args.weights)
