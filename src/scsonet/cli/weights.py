"""``scsonet weights``: pack a checkpoint into shipped weights with a model card, or show a card."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="pack or show pretrained weights and their model card")
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    pack = sub.add_parser("pack", help="checkpoint -> .safetensors + card, evaluated on the test split")
    pack.add_argument("--checkpoint", required=True, help="training checkpoint (best.pt)")
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
    from ..publish import pack_weights

    card = pack_weights(args.checkpoint, args.data, args.out, dataset_name=args.dataset_name,
                        trained_at_commit=args.trained_at_commit, docs=args.docs)
    print(card["_metrics_text"])
    return 0


def run_show(args) -> int:
    from ..errors import ScsonetError
    from ..models import PRETRAINED
    from ..publish import card_markdown, load_card

    if args.name not in PRETRAINED:
        raise ScsonetError(f"unknown pretrained weights {args.name!r}; choose from {', '.join(PRETRAINED)}")
    card = load_card(PRETRAINED[args.name].value.card_path)
    print(card_markdown(card) if args.markdown else json.dumps(card, indent=2))
    return 0
