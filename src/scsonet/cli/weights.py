"""``scsonet weights``: pack a checkpoint into shipped weights with a model card, or show a card."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="pack or show pretrained weights and their model card")
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    pack = sub.add_parser("pack", help="checkpoint -> .safetensors + card, evaluated on the test split")
    source = pack.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training checkpoint (best.pt)")
    source.add_argument("--best-of", nargs="+", metavar="RUN_DIR",
                        help="run directories (e.g. one model's seeds): pack best.pt of the one with the "
                             "highest val DSC in its log.csv")
    pack.add_argument("--data", required=True, help="prepared dataset whose test split the card reports")
    pack.add_argument("--out", required=True, help="output .safetensors path (the card is written beside it)")
    pack.add_argument("--dataset-name", default="ISIC2017", help="name used in the card's metric keys")
    pack.add_argument("--trained-at-commit", help="commit of the code that trained the checkpoint")
    pack.add_argument("--docs", default="", help="one paragraph: split, seed, epochs, anything unusual")
    pack.set_defaults(func=run_pack)
    show = sub.add_parser("show", help="print a pretrained model card")
    show.add_argument("name", nargs="?", default="scsonet-isic2017", help="pretrained name (scsonet-isic2017)")
    show.add_argument("--markdown", action="store_true", help="only the metrics as a Markdown table")
    show.set_defaults(func=run_show)


def run_pack(args) -> int:
    from ..publish import best_run, pack_weights

    checkpoint, docs = args.checkpoint, args.docs
    if args.best_of:
        run, dsc = best_run(args.best_of)
        checkpoint = run / "best.pt"
        docs = (docs + " " if docs else "") + (f"Best by val DSC ({100 * dsc:.2f} %) of {len(args.best_of)} runs: "
                                               f"{', '.join(p.rstrip('/').rsplit('/', 1)[-1] for p in args.best_of)}; "
                                               f"packed {run.name}.")
    card = pack_weights(checkpoint, args.data, args.out, dataset_name=args.dataset_name,
                        trained_at_commit=args.trained_at_commit, docs=docs)
    print(card["_metrics_text"])
    return 0


def run_show(args) -> int:
    from ..errors import ScsonetError
    from ..models import PRETRAINED
    from ..publish import card_markdown, load_card

    if args.name not in PRETRAINED:
        raise ScsonetError(f"pretrained weights {args.name!r} are not installed; choose from {PRETRAINED.choices()}")
    card = load_card(PRETRAINED[args.name].value.card_path)
    print(card_markdown(card) if args.markdown else json.dumps(card, indent=2))
    return 0
