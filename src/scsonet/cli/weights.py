"""``scsonet weights``: pack a checkpoint into shipped weights with a model card, list or show them."""
from __future__ import annotations

import json
import textwrap


def register(subparsers) -> None:
    p = subparsers.add_parser("weights", help="pack, list or show pretrained weights and their model card")
    sub = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    pack = sub.add_parser("pack", help="checkpoint -> .safetensors + card, evaluated on the test split",
                          description="Pack a training checkpoint (or the best by val DSC of several runs) into "
                                      "shipped weights: OUT (.safetensors) and its model card OUT.json, with the "
                                      "test split of --data evaluated into the card's metrics.")
    source = pack.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training checkpoint (best.pt)")
    source.add_argument("--best-of", nargs="+", metavar="RUN_DIR",
                        help="run directories (e.g. one model's seeds): pack the one with the highest val DSC "
                             "in its log.csv (its best.pt, or its record's weights.safetensors)")
    pack.add_argument("--data", required=True, help="prepared dataset whose test split the card reports")
    pack.add_argument("--out", required=True, help="output .safetensors path (the card is written beside it)")
    pack.add_argument("--dataset-name", default="ISIC2017", help="name used in the card's metric keys")
    pack.add_argument("--trained-at-commit", help="commit of the code that trained the checkpoint")
    pack.add_argument("--docs", default="", help="one paragraph: split, seed, epochs, anything unusual")
    pack.set_defaults(func=run_pack)
    average = sub.add_parser("average", help="weighted mean of fine-tunes of one model (a model soup) -> .pt",
                             description="Average the weights of networks of one architecture and preprocessing "
                                         "fine-tuned from one starting point (WiSE-FT, model soups): OUT is a "
                                         "checkpoint that evaluate, predict and weights pack read, recording its "
                                         "sources and coefficients. Choose the coefficients on val.")
    average.add_argument("sources", nargs="+", metavar="WEIGHTS",
                         help="pretrained names, .pt checkpoints or .safetensors files (two or more)")
    average.add_argument("--coefficients", nargs="+", type=float, required=True, metavar="C",
                         help="one per source, >= 0, summing to 1")
    average.add_argument("--out", required=True, help="output .pt checkpoint")
    average.set_defaults(func=run_average)
    listing = sub.add_parser("list", help="list the pretrained weights and whether each is installed",
                             description="List every declared pretrained name (what --weights, load_pretrained "
                                         "and create_model(name, weights=...) take), its model and weights enum "
                                         "member, whether its file and card are installed, and its test DSC.")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)
    show = sub.add_parser("show", help="print a pretrained model card",
                          description="Print a pretrained model card as a short summary: architecture, "
                                      "parameters, preprocessing, protocol, test metrics and how the weights "
                                      "were made. --json prints the whole card, --markdown only the metrics.")
    show.add_argument("name", nargs="?", default="scsonet-isic2017", help="pretrained name (scsonet-isic2017)")
    form = show.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="only the metrics as a Markdown table")
    form.add_argument("--json", action="store_true", help="the raw card as JSON")
    show.set_defaults(func=run_show)


def run_pack(args) -> int:
    from ..publish import best_run, pack_weights, run_weights

    checkpoint, docs = args.checkpoint, args.docs
    if args.best_of:
        run, dsc = best_run(args.best_of)
        checkpoint = run_weights(run)
        docs = (docs + " " if docs else "") + (f"Best by val DSC ({100 * dsc:.2f} %) of {len(args.best_of)} runs: "
                                               f"{', '.join(p.rstrip('/').rsplit('/', 1)[-1] for p in args.best_of)}; "
                                               f"packed {run.name}.")
    card = pack_weights(checkpoint, args.data, args.out, dataset_name=args.dataset_name,
                        trained_at_commit=args.trained_at_commit, docs=docs)
    print(card["_metrics_text"])
    return 0


def run_average(args) -> int:
    from ..soup import write_average

    out = write_average(args.sources, args.coefficients, args.out)
    print(f"wrote {out}: " + " + ".join(f"{c:g} x {s}" for s, c in zip(args.sources, args.coefficients)))
    return 0


def pretrained_rows() -> list[dict]:
    """One row per declared pretrained name: model, enum member, installed, test DSC of its card."""
    from ..models._weights import declared_weights

    rows = []
    for name, member in sorted(declared_weights().items()):
        installed = member.value.installed
        metrics = member.meta.get("_metrics", {}) if installed else {}
        split, report = next(iter(metrics.items()), (None, {}))
        rows.append({"name": name, "model": member.value.arch, "weights": f"{type(member).__name__}.{member.name}",
                     "installed": installed, "split": split, "dsc": report.get("pooled", {}).get("dsc")})
    return rows


def run_list(args) -> int:
    rows = pretrained_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("name", "model", "weights", "installed", "test DSC")]
    table += [(r["name"], r["model"], r["weights"], "yes" if r["installed"] else "no",
               f"{100 * r['dsc']:.2f} % ({r['split']})" if r["dsc"] is not None else "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def run_show(args) -> int:
    from ..errors import ScsonetError
    from ..models import PRETRAINED
    from ..publish import card_markdown, load_card

    if args.name not in PRETRAINED:
        raise ScsonetError(f"pretrained weights {args.name!r} are not installed; choose from {PRETRAINED.choices()}")
    weights = PRETRAINED[args.name]
    card = load_card(weights.value.card_path)
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        print(card_markdown(card) if args.markdown else readable_card(args.name, card, weights.path))
    return 0


def _floats(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def readable_card(name: str, card: dict, path) -> str:
    """A card as a person reads it: what the model is, what it expects, how it was made and
    tested; the raw keys stay in ``--json``."""
    from ..publish import card_markdown

    pre = card.get("preprocessing", {})
    recipe = card.get("recipe", {})
    size = "x".join(map(str, pre.get("resize_size", card.get("input_size", [0, 0, 0])[1:])))
    macs = f", {card['_ops_macs'] / 1e6:.1f} M multiply-accumulates at {size}" if "_ops_macs" in card else ""
    made = [f"protocol {card.get('protocol', recipe.get('protocol', '?'))}"]
    if recipe.get("selected_on"):
        made.append(f"checkpoint selected on {recipe['selected_on']} (epoch {recipe.get('best_epoch', '?')})")
    if recipe.get("trained_at_commit"):
        made.append(f"trained at commit {recipe['trained_at_commit']}")
    rows = [("architecture", f"{card['arch']}, {card.get('num_params', 0):,} parameters{macs}"),
            ("file", f"{path} ({card.get('_file_size_mb', '?')} MB)"),
            ("input", f"RGB resized to {size} ({card.get('interpolation', 'bilinear')}), normalised by "
                      f"mean {_floats(pre.get('mean', card.get('mean', [])))} and std "
                      f"{_floats(pre.get('std', card.get('std', [])))}"),
            ("output", f"lesion probability per pixel, mask at threshold {card.get('threshold', 0.5)}"),
            ("made", "; ".join(made)),
            ("license", card.get("license", "?"))]
    width = max(len(label) for label, _ in rows)
    lines = [f"{name}", ""] + [f"  {label:<{width}}  {text}" for label, text in rows]
    metrics = card.get("_metrics_text") or card_markdown(card)
    lines += ["", "Test metrics:", *("  " + line if line else "" for line in metrics.splitlines())]
    if card.get("_docs"):
        lines += ["", "How these weights were made:", textwrap.fill(card["_docs"], 100, initial_indent="  ",
                                                                     subsequent_indent="  ")]
    lines += ["", f"The whole card: scsonet weights show {name} --json"]
    return "\n".join(lines)
