"""``scsonet benchmark``: the paper's Table 1 on your data (see ``scsonet.benchmark``).

    scsonet benchmark --data data/isic2017 --models scsonet,egeunet,malunet,unext_s,unet \\
        --seeds 42,43,44 --out bench/isic2017 --published isic2017
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
                    "OUT/dsc_vs_macs.png.")
    p.add_argument("--data", required=True, help="prepared dataset folder (scsonet data prepare)")
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
    p.add_argument("--out", required=True, help="benchmark folder (runs/, table.md, table.csv, dsc_vs_macs.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..benchmark import run_benchmark

    result = run_benchmark(args.data, args.models, args.seeds, args.out, config=args.config,
                           overrides=args.overrides, protocol=args.protocol, epochs=args.epochs,
                           published=args.published, figure=args.figure)
    print(result.table_md.read_text())
    return 0
