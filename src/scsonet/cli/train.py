"""``scsonet train``: train a registered model with the paper's recipe (see ``scsonet.train``)."""
from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model on a prepared dataset",
                              description="Train a registered model on a prepared dataset (scsonet data "
                                          "prepare) with the paper's recipe, or a YAML config and --set "
                                          "overrides. Writes a run folder: config.yaml, log.csv, best.pt (the "
                                          "checkpoint chosen on val, or on test with --protocol paper), last.pt "
                                          "(for --resume) and, at the end, test/report.json of best.pt.")
    p.add_argument("--config", help="YAML config (defaults: the paper's recipe, honest protocol)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key; repeatable (e.g. --set epochs=3 --set protocol=paper)")
    p.add_argument("--protocol", choices=["honest", "paper"], help="shorthand for --set protocol=...")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last completed epoch")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from .._runtime import RUNTIME_ENV  # must reach the environment before torch loads

    for key, value in RUNTIME_ENV.items():
        os.environ.setdefault(key, value)
    from ..train import load_config, train

    overrides = list(args.overrides) + ([f"protocol={args.protocol}"] if args.protocol else [])
    config = args.config
    if args.resume and config is None:
        config = Path(args.resume) / "config.yaml"
    cfg = load_config(config, overrides)
    if cfg.fast:
        from ..fast import tune_cpu_allocator

        tune_cpu_allocator()  # process-wide: the command's choice, never a library side effect
    train(cfg, resume=args.resume)
    return 0
