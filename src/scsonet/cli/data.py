"""``scsonet data prepare`` and ``scsonet data show``: prepare a dataset, look at its pairs."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare a dataset, or draw a grid of its pairs")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prep = sub.add_parser("prepare", help="pair, resize and split a raw dataset into --out",
                          description="Pair images with masks by ID, resize, split and write a prepared "
                                      "dataset with a manifest (checksums, training statistics).")
    prep.add_argument("--dataset", required=True, choices=["isic2017", "isic2018", "folder"],
                      help="source layout (folder: images/ and masks/ paired by file stem)")
    prep.add_argument("--src", required=True, help="folder with the official folders or .zip files")
    prep.add_argument("--out", required=True, help="prepared dataset folder to create")
    prep.add_argument("--size", default="256", help="output side N, or HxW (256)")
    prep.add_argument("--split-file", default=None, help="CSV with columns image_id, split (train/val/test)")
    prep.add_argument("--seed", type=int, default=42, help="random split seed, without --split-file (42)")
    prep.add_argument("--test-ratio", type=float, default=0.3, help="random split: fraction of all pairs for test (0.3)")
    prep.add_argument("--val-ratio", type=float, default=0.1, help="random split: fraction of the rest for val (0.1)")
    prep.add_argument("--skip-bad", action="store_true", help="leave bad inputs out (listed in the manifest)")
    prep.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prep.add_argument("--workers", type=int, default=None, help="decoding processes (available CPUs)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare)

    show = sub.add_parser("show", help="draw images with their mask outlines into one picture")
    show.add_argument("dir", help="prepared dataset folder")
    show.add_argument("--out", required=True, help="picture to write (.png, .jpg)")
    show.add_argument("--split", default="train", help="split to draw from (train)")
    show.add_argument("--n", type=int, default=8, help="number of pairs (8)")
    show.add_argument("--cols", type=int, default=4, help="pairs per row (4)")
    show.add_argument("--seed", type=int, default=0, help="which pairs: random with this seed; -1 = the first n (0)")
    show.set_defaults(func=run_show)


def run_prepare(args) -> int:
    from ..data.prepare import prepare_dataset

    m = prepare_dataset(args.dataset, args.src, args.out, size=args.size, split_file=args.split_file,
                        seed=args.seed, test_ratio=args.test_ratio, val_ratio=args.val_ratio,
                        skip_bad=args.skip_bad, overwrite=args.overwrite, workers=args.workers,
                        progress=not args.no_progress)
    counts = " / ".join(f"{s} {v['count']:,}" for s, v in m["splits"].items())
    print(f"prepared {args.out}: {counts} pairs at {m['size'][0]}x{m['size'][1]} in {m['seconds']} s")
    print(f"training mean {m['stats']['mean']}  std {m['stats']['std']}")
    for kind in ("skipped", "warnings", "notes"):
        if m[kind]:
            print(f"{kind}: {len(m[kind])} (listed in {args.out}/manifest.json)")
            for item in m[kind][:5]:
                print(f"  {item['file']}: {item['reason']}" if isinstance(item, dict) else f"  {item}")
    return 0


def run_show(args) -> int:
    from ..data.show import write_grid

    path = write_grid(args.dir, args.out, split=args.split, n=args.n, cols=args.cols, seed=args.seed)
    print(f"wrote {path}")
    return 0
