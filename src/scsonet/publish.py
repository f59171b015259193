"""Turn a training checkpoint into shipped weights: a safetensors file and its model card.

The card's metrics are not typed in: ``pack_weights`` evaluates the packed file on the test split
with ``scsonet.evaluation.evaluate`` (what ``scsonet evaluate`` runs) and stores that report.
"""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any, Sequence

from ._checks import check_preprocessing, is_finite, is_int, show
from ._io import atomic_path, give_usual_mode, write_json_atomic
from .complexity import count_macs, count_params
from .errors import ScsonetError
from .evaluation import evaluate, format_report

LICENSE = "MIT (weights); trained on ISIC 2017 images, CC0 1.0"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# A study run's selected weights, kept in its committed record (checkpoints are not committed), so
# that a later session or another machine can pack or re-evaluate them without retraining.
RECORD_WEIGHTS = "weights.safetensors"


def _card(model, arch: str, model_args: Any, pre: dict[str, Any], recipe: dict[str, Any], docs: str) -> dict[str, Any]:
    threshold = pre.pop("threshold", 0.5)
    return {
        "arch": arch,
        "model_args": model_args,
        "preprocessing": pre,
        "num_params": count_params(model),
        "categories": ["background", "lesion"],
        "min_size": [1, 1],
        "input_size": [model.in_chans, *pre["resize_size"]],
        "mean": pre["mean"],
        "std": pre["std"],
        "interpolation": "bilinear",
        "threshold": threshold,
        "protocol": recipe["protocol"],
        "license": LICENSE,
        # Read by create_model(weights=...) to adapt in_chans and to reset the head (models/_builder.py).
        "first_conv": model.first_conv_name,
        "classifier": model.classifier_name,
        "recipe": recipe,
        "_ops_macs": count_macs(model, tuple(pre["resize_size"])),
        "_docs": docs,
    }


def _card_of_checkpoint(checkpoint: Path, trained_at_commit: str | None, docs: str) -> tuple[dict[str, Any], Any]:
    from .models._loading import checkpoint_model, read_checkpoint

    ckpt = read_checkpoint(checkpoint, require=("epoch",))
    loaded = checkpoint_model(ckpt, str(checkpoint))  # checks every value the card copies
    pre = check_preprocessing(ckpt["preprocessing"], str(checkpoint))  # checked, in plain lists
    recipe = {"config": ckpt.get("config", {}), "protocol": ckpt.get("protocol"),
              "selected_on": loaded.meta.get("select_split"), "best_epoch": ckpt["epoch"] + 1,
              "best_select_dsc": ckpt.get("best_val_dsc"), "trained_at_commit": trained_at_commit}
    return _card(loaded.model, ckpt["model_name"], ckpt.get("model_args", {}), pre, recipe, docs), loaded.model


# What a record's card carries beyond what loading it checks: (check, what is expected).
_RECIPE_CHECKS = {"config": (lambda v: isinstance(v, dict), "a mapping"),
                  "protocol": (lambda v: v is None or isinstance(v, str), "a string"),
                  "selected_on": (lambda v: v is None or isinstance(v, str), "a string"),
                  "best_epoch": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
                  "best_select_dsc": (lambda v: v is None or is_finite(v), "a finite number"),
                  "trained_at_commit": (lambda v: v is None or isinstance(v, str), "a string")}


def _card_of_record(weights: Path, trained_at_commit: str | None, docs: str) -> tuple[dict[str, Any], Any]:
    """The card of a record's ``weights.safetensors``, rebuilt from checked values only."""
    from .models import load_model

    loaded = load_model(weights)  # checks the architecture, its arguments, preprocessing, threshold, weights
    where = weights.with_suffix(".json")
    recipe = loaded.meta.get("recipe")
    if not isinstance(recipe, dict) or set(recipe) != set(_RECIPE_CHECKS):
        raise ScsonetError(f"{where}: recipe: expected a mapping of {', '.join(_RECIPE_CHECKS)}")
    for key, (ok, expected) in _RECIPE_CHECKS.items():
        if not ok(recipe[key]):
            raise ScsonetError(f"{where}: recipe.{key}={show(recipe[key])}: expected {expected}")
    pre = check_preprocessing(loaded.meta["preprocessing"], str(where))
    pre["threshold"] = loaded.meta.get("threshold", 0.5)  # checked by load_model
    recipe = {**recipe, "trained_at_commit": trained_at_commit or recipe["trained_at_commit"]}
    return _card(loaded.model, loaded.name, loaded.meta.get("model_args", {}), pre, recipe, docs), loaded.model


def _write_weights(model, card: dict[str, Any], out: Path) -> Path:
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        give_usual_mode(tmp)  # safetensors writes its file 0600
    card_path = out.with_suffix(".json")
    write_json_atomic(card_path, card)
    return card_path


def keep_record_weights(run_dir: str | Path, trained_at_commit: str | None = None) -> Path:
    """Write ``run_dir/weights.safetensors`` and its card (no metrics) from ``run_dir/best.pt``."""
    run_dir = Path(run_dir)
    card, model = _card_of_checkpoint(run_dir / "best.pt", trained_at_commit,
                                      f"Selected weights of the run record {run_dir.name}.")
    out = run_dir / RECORD_WEIGHTS
    _write_weights(model, card, out)
    return out


def pack_weights(source: str | Path, data: str | Path, out: str | Path, *, dataset_name: str,
                 trained_at_commit: str | None = None, docs: str = "", split: str = "test",
                 device: str = "cpu") -> dict[str, Any]:
    """Write ``out`` (``.safetensors``) and its card ``out.with_suffix('.json')``; return the card.

    ``source`` is a training checkpoint (``best.pt``) or a run record's ``weights.safetensors``.
    """
    from .data import PreparedData
    from .models import load_model

    source, out = Path(source), Path(out)
    if out.suffix != ".safetensors":
        raise ScsonetError(f"{out}: the weights file must end in .safetensors")
    if source.suffix == ".safetensors":
        card, model = _card_of_record(source, trained_at_commit, docs)
    else:
        card, model = _card_of_checkpoint(source, trained_at_commit, docs)
    # Write the weights first: the evaluation loads exactly the file that ships.
    card_path = _write_weights(model, card, out)
    try:
        report, _ = evaluate(load_model(out, device), PreparedData(data).load(split), batch_size=16,
                             device=device, split=split)
    except BaseException:
        out.unlink(missing_ok=True)
        card_path.unlink(missing_ok=True)
        raise
    card["_file_size_mb"] = round(out.stat().st_size / 2**20, 3)
    card["_metrics"] = {f"{dataset_name}-{split}": report}
    card["_metrics_text"] = format_report(report)
    card["_packed_at_commit"] = _git_commit()
    write_json_atomic(card_path, card)
    return card


def find_run_weights(run: Path) -> Path | None:
    """The weights of a run directory: its checkpoint where it trained, else its record's weights."""
    return next((run / name for name in ("best.pt", RECORD_WEIGHTS) if (run / name).is_file()), None)


def run_weights(run: Path) -> Path:
    """``find_run_weights``, or one error line when the run has none."""
    if (found := find_run_weights(run)) is not None:
        return found
    raise ScsonetError(f"{run}: holds neither best.pt nor {RECORD_WEIGHTS} (a record trained before records "
                       f"kept their weights: pack where it trained)")


def best_run(run_dirs: Sequence[str | Path]) -> tuple[Path, float]:
    """The run (and its best val DSC) whose ``log.csv`` holds the highest DSC on val; ties: the first given.

    Only runs that selected on val qualify (the honest protocol): choosing among runs by test would
    leak the test split into the shipped weights.
    """
    best: tuple[Path, float] | None = None
    for run in map(Path, run_dirs):
        log = run / "log.csv"
        try:
            with open(log, newline="") as f:
                rows = list(csv.DictReader(f))
            scores = [float(r["select_dsc"]) for r in rows if r["select_split"] == "val"]
        except FileNotFoundError:
            raise ScsonetError(f"{log}: missing; not a run directory of scsonet train") from None
        except (OSError, KeyError, ValueError, csv.Error) as err:
            raise ScsonetError(f"{log}: not a training log ({type(err).__name__}: {err})") from None
        if not rows or len(scores) != len(rows):
            raise ScsonetError(f"{log}: the run did not select its checkpoint on val (honest protocol)")
        run_weights(run)  # fails early, before any packing, when a run has no weights
        if best is None or max(scores) > best[1]:
            best = (run, max(scores))
    if best is None:
        raise ScsonetError("no run directories given")
    return best


def card_markdown(card: dict[str, Any]) -> str:
    """The card's test metrics as a Markdown table (for the README)."""
    rows = []
    for key, report in card["_metrics"].items():
        p, i, hd = report["pooled"], report["per_image"], report["hd95_pixels"]
        rows.append(f"| {key} | {report['protocol']} | {report['n_images']} | {100 * p['miou']:.2f} | "
                    f"{100 * p['dsc']:.2f} | {100 * p['accuracy']:.2f} | {100 * p['sensitivity']:.2f} | "
                    f"{100 * p['specificity']:.2f} | {100 * i['dice_mean']:.2f} ± {100 * i['dice_std']:.2f} | "
                    f"{100 * i['iou_mean']:.2f} ± {100 * i['iou_std']:.2f} | {hd['mean']:.1f} |")
    head = ("| data-split | protocol | images | mIoU (pooled) % | DSC (pooled) % | Acc % | Sen % | Spe % | "
            "Dice per image % | IoU per image % | HD95 mean px |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    return "\n".join([head, *rows])


def load_card(path: str | Path) -> dict[str, Any]:
    from .models._loading import read_card

    return read_card(Path(path))
