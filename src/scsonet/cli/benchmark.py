"""``scsonet benchmark``: the paper's Table 1 on your data (see ``scsonet.benchmark``), or a whole
study of record from its spec (see ``scsonet.study``).

    scsonet benchmark --data data/isic2017 --models scsonet,egeunet,malunet,unext_s,unet \\
        --seeds 42,43,44 --out bench/isic2017 --published isic2017
    scsonet benchmark --study configs/study/isic2017.yaml [--no-train] [--only MODEL ...] [--max-runs N]
"""
from __future__ import annotations

import argparse


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list")
    return names


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "benchmark", help="train and test models over seeds; write the comparison table and figure",
        description="Train and test every model with every seed (resuming what is already done), then write "
                    "OUT/table.md, OUT/table.csv (the paper's Table 1 columns, mean ± std over seeds) and "
                    "OUT/dsc_vs_macs.png. With --study SPEC, run a study of record instead: train what its "
                    "committed records lack (Table 1 first, seed by seed) and rebuild its tables, paired "
                    "bootstrap verdicts and summary from those records (--no-train: rebuild only).")
    p.add_argument("--study", default=None, metavar="SPEC",
                   help="run a study of record from its YAML spec (configs/study/isic2017.yaml): train what is "
                        "missing, Table 1 first, then write its tables; --data, --models, --seeds, --out and the "
                        "training settings come from the spec")
    p.add_argument("--train", dest="train", action=argparse.BooleanOptionalAction, default=True,
                   help="with --study: train missing runs (--no-train: rebuild the outputs from the committed "
                        "records only, without data or checkpoints)")
    p.add_argument("--tables-only", dest="train", action="store_false", help="with --study: same as --no-train")
    p.add_argument("--only", nargs="+", action="extend", default=[], metavar="MODEL",
                   help="with --study: train only these models (comma or space separated)")
    p.add_argument("--max-runs", type=int, default=None, metavar="N", help="with --study: train at most N runs")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="with --study: measure CPU latency into latency.json (default: when training)")
    p.add_argument("--data", default=None, help="prepared dataset folder (scsonet data prepare)")
    p.add_argument("--models", type=_names, default=["scsonet", "egeunet", "malunet", "unext_s", "unet"],
                   help="comma-separated registered models, in table order (scsonet,egeunet,malunet,unext_s,unet)")
    p.add_argument("--seeds", type=_seeds, default=[42], help="comma-separated training seeds (42)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (the config's; the paper's 300)")
    p.add_argument("--protocol", choices=["honest", "paper"], default=None,
                   help="honest: select on val; paper: fit on train+val, select on test (the config's; honest)")
    p.add_argument("--config", default=None, help="training config YAML for every run (the paper's recipe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one training setting for every run; repeatable (e.g. --set threads=2)")
    p.add_argument("--published", default=None, metavar="DATASET",
                   help="add the paper's printed figures for isic2017 or isic2018 as rows and points "
                        "marked 'published'")
    p.add_argument("--no-figure", dest="figure", action="store_false", help="skip dsc_vs_macs.png")
    p.add_argument("--out", default=None, help="benchmark folder (runs/, table.md, table.csv, dsc_vs_macs.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..benchmark import run_benchmark
    from ..errors import ScsonetError

    if args.study is not None:
        return run_study(args)
    if args.data is None or args.out is None:
        raise ScsonetError("--data and --out are required (or give a study spec with --study)")

    result = run_benchmark(args.data, args.models, args.seeds, args.out, config=args.config,
                           overrides=args.overrides, protocol=args.protocol, epochs=args.epochs,
                           published=args.published, figure=args.figure)
    print(result.table_md.read_text())
    return 0


def run_study(args) -> int:
    from ..errors import ScsonetError
    from ..study import load_study, run_study as run

    given = [flag for flag, value in (("--data", args.data), ("--out", args.out), ("--config", args.config),
                                      ("--epochs", args.epochs), ("--protocol", args.protocol),
                                      ("--published", args.published)) if value is not None]
    if given or args.overrides:
        raise ScsonetError(f"{(given or ['--set'])[0]}: a study takes its settings from its spec ({args.study})")
    only = [name for item in args.only for name in item.split(",") if name]
    study = load_study(args.study)
    result = run(study, train=args.train, only=only, max_runs=args.max_runs, latency=args.latency)
    print(result.outputs["summary.md"].read_text())
    return 0
