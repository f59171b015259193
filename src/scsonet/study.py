"""The study of record: the paper's Tables 1-3 re-run under one recipe, from committed run records.

    scsonet benchmark --study configs/study/isic2017.yaml             # train what is missing, then tables
    scsonet benchmark --study configs/study/isic2017.yaml --no-train  # tables from the records alone

A study spec (YAML) names the data, the recipe every run shares (protocol, schedule, optimiser), the
runs folder, the three tables' rows and seeds, and the 300-epoch reference that prices the short
schedule. Each (model, seed) is one run directory ``RUNS/<model>-<protocol>-s<seed>`` of
``scsonet train``; its record is what gets committed: ``config.yaml``, ``log.csv``,
``test/report.json``, ``test/per_image.csv`` and the selected weights, ``weights.safetensors``
with its card ``weights.json`` (a few hundred kB; checkpoints are not committed), from which
``scsonet weights pack --best-of`` and ``qualitative.png`` work in any later session. Every output is a pure
function of those records, of the model code (parameter and MAC counts) and of ``latency.json``
(CPU latency, written only when it is measured), so a ``--no-train`` rebuild reproduces the
outputs byte for byte. A record trained with another recipe is refused, never averaged in.

Outputs (in the spec's ``out`` folder): ``table1.md`` ... with ``.csv`` twins, ``paired.csv`` (per-image
Dice of each model against the reference, bootstrap CI over images), ``cost.md`` (50 against 300
epochs), ``summary.md`` (all of it, the README's block), ``dsc_vs_macs.png`` and, only where the
checkpoints and the data are present, ``qualitative.png``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from ._io import atomic_path, write_json_atomic, write_text_atomic
from .benchmark import PUBLISHED, TableRow, ensure_run, plot_dsc_vs_macs
from .errors import ScsonetError
from .publish import RECORD_WEIGHTS, find_run_weights, keep_record_weights
from .train import PROTOCOLS, TrainConfig, load_config, read_segments

__all__ = ["Study", "StudyTable", "StudyRow", "Record", "load_study", "read_records", "build_outputs",
           "paired_bootstrap", "verdict", "rebuild", "run_study", "measure_latency"]

# Recipe keys a record must match besides the spec's own: what the network is.
IDENTITY_KEYS = ("model", "seed", "model_args")
SPEC_KEYS = {"name", "data", "split", "runs", "out", "recipe", "execution", "reference", "failure_dice",
             "bootstrap", "latency", "qualitative", "tables", "cost"}
LATENCY_FILE = "latency.json"
REPORT, PER_IMAGE, CONFIG, LOG = Path("test/report.json"), Path("test/per_image.csv"), "config.yaml", "log.csv"


@dataclass(frozen=True)
class StudyRow:
    model: str
    label: str
    published: str | None = None  # key in PUBLISHED[table.published]
    gpu_only: bool = False  # trained only where CUDA is present (UNet: 12 G MACs per image)


@dataclass(frozen=True)
class StudyTable:
    key: str
    title: str
    seeds: tuple[int, ...]
    rows: tuple[StudyRow, ...]
    published: str | None = None  # dataset of the paper's figures shown beside ours
    note: str = ""


@dataclass(frozen=True)
class CostReference:
    """The 300-epoch run that prices the study's short schedule (same model, seed and recipe)."""

    model: str
    seed: int
    epochs: int
    log: Path  # its log.csv (val curve)
    config: Path  # its resolved config.yaml
    card: Path  # model card holding its test report


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    data: Path
    split: str
    runs: Path
    out: Path
    recipe: dict[str, Any]  # TrainConfig keys every record must match
    execution: dict[str, Any]  # TrainConfig keys of how runs execute (not checked)
    reference: str
    failure_dice: float
    bootstrap: dict[str, Any]
    latency: dict[str, Any]
    qualitative: dict[str, Any]
    tables: tuple[StudyTable, ...]
    cost: CostReference | None

    @property
    def protocol(self) -> str:
        return self.recipe["protocol"]

    @property
    def schedule(self) -> str:
        r = self.recipe
        return f"{r['epochs']} ep, cosine T {r['t_max']}"

    def run_dir(self, model: str, seed: int) -> Path:
        return self.runs / f"{model}-{self.protocol}-s{seed}"

    def train_config(self, model: str, seed: int) -> TrainConfig:
        base = _config({**self.recipe, **self.execution})
        return dataclasses.replace(base, data=str(self.data.resolve()), model=model, seed=seed,
                                   out_dir=str(self.runs.resolve()), run_name=self.run_dir(model, seed).name)

    def models(self) -> list[str]:
        return list(dict.fromkeys(row.model for table in self.tables for row in table.rows))

    def jobs(self, gpu: bool) -> list[tuple[str, int]]:
        """Every (model, seed) to train, table by table, seed by seed: Table 1 fills first."""
        jobs = []
        for table in self.tables:
            for seed in table.seeds:
                jobs += [(row.model, seed) for row in table.rows if gpu or not row.gpu_only]
        return list(dict.fromkeys(jobs))


def _config(values: dict[str, Any]) -> TrainConfig:
    """``load_config`` (its type checks) on settings given as values; YAML text keeps 1e-05 a float."""
    return load_config(None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).splitlines()[0]}"
                              for k, v in values.items()])


def _need(mapping: dict, key: str, kind: type | tuple[type, ...], where: str):
    if key not in mapping:
        raise ScsonetError(f"{where}: missing {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ScsonetError(f"{where}: {key}={value!r} has the wrong type")
    return value


def load_study(path: str | Path) -> Study:
    """Parse and check a study spec; paths in it are relative to the current folder."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ScsonetError(f"{path}: study spec not found") from None
    except (OSError, yaml.YAMLError) as err:
        raise ScsonetError(f"{path}: not a readable YAML spec ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ScsonetError(f"{path}: a study spec is a mapping")
    if unknown := sorted(set(spec) - SPEC_KEYS):
        raise ScsonetError(f"{path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(SPEC_KEYS))}")
    recipe = dict(_need(spec, "recipe", dict, str(path)))
    execution = dict(spec.get("execution") or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in [*recipe, *execution]:
        if key not in known or key in (*IDENTITY_KEYS, "data", "out_dir", "run_name"):
            raise ScsonetError(f"{path}: recipe/execution key {key!r} is not a per-study training setting")
    for key in ("protocol", "epochs", "t_max"):
        _need(recipe, key, (str, int), f"{path} recipe")
    try:
        _config({**recipe, **execution})
    except ScsonetError as err:
        raise ScsonetError(f"{path}: {err}") from None

    tables = []
    for i, t in enumerate(_need(spec, "tables", list, str(path))):
        where = f"{path} tables[{i}]"
        if not isinstance(t, dict):
            raise ScsonetError(f"{where}: a table is a mapping")
        published = t.get("published")
        if published is not None and published not in PUBLISHED:
            raise ScsonetError(f"{where}: published {published!r}: choose from {', '.join(PUBLISHED)}")
        seeds = _need(t, "seeds", list, where)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ScsonetError(f"{where}: seeds must be a non-empty list of integers")
        rows = []
        for j, r in enumerate(_need(t, "rows", list, where)):
            r = {"model": r} if isinstance(r, str) else r
            if not isinstance(r, dict):
                raise ScsonetError(f"{where} rows[{j}]: a model name or a mapping")
            model = _need(r, "model", str, f"{where} rows[{j}]")
            key = r.get("published", model if published else None)
            if published and key is not None and key not in PUBLISHED[published]:
                key = None  # no printed figure for this row
            rows.append(StudyRow(model, str(r.get("label", model)), key, bool(r.get("gpu_only", False))))
        if len({r.model for r in rows}) != len(rows):
            raise ScsonetError(f"{where}: a model appears twice")
        tables.append(StudyTable(_need(t, "key", str, where), str(t.get("title", t["key"])),
                                 tuple(dict.fromkeys(seeds)), tuple(rows), published, str(t.get("note", ""))))
    if len({t.key for t in tables}) != len(tables):
        raise ScsonetError(f"{path}: two tables share a key")

    from .models import list_models

    names = set(list_models())
    for table in tables:
        for row in table.rows:
            if row.model not in names:
                raise ScsonetError(f"{path}: {table.key}: unknown model {row.model!r}")
    reference = str(spec.get("reference", "scsonet"))
    cost = None
    if (c := spec.get("cost")) is not None:
        where = f"{path} cost"
        cost = CostReference(_need(c, "model", str, where), _need(c, "seed", int, where),
                             _need(c, "epochs", int, where), Path(_need(c, "log", str, where)),
                             Path(_need(c, "config", str, where)), Path(_need(c, "card", str, where)))
    failure = spec.get("failure_dice", 0.5)
    if not isinstance(failure, (int, float)) or not 0 < failure < 1:
        raise ScsonetError(f"{path}: failure_dice={failure!r}: expected a number in (0, 1)")
    bootstrap = {"resamples": 10000, "seed": 0, "level": 0.95, **(spec.get("bootstrap") or {})}
    latency = {"size": 256, "batch": 1, "threads": 2, "warmup": 3, "repeats": 20, **(spec.get("latency") or {})}
    qualitative = {"per_kind": 2, **(spec.get("qualitative") or {})}
    return Study(path, str(spec.get("name", path.stem)), Path(_need(spec, "data", str, str(path))),
                 str(spec.get("split", "")), Path(_need(spec, "runs", str, str(path))),
                 Path(_need(spec, "out", str, str(path))), recipe, execution, reference, float(failure),
                 bootstrap, latency, qualitative, tuple(tables), cost)


# -- records -----------------------------------------------------------------------------------


@dataclass
class Record:
    """What is committed of one (model, seed) run."""

    model: str
    seed: int
    run_dir: Path
    status: str  # "done" (test report present), "partial" (training, epochs_done so far) or "missing"
    epochs_done: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    ids: tuple[str, ...] = ()
    dice: np.ndarray | None = None  # per-image Dice, in the order of ids
    seconds: float = 0.0  # training wall-clock from log.csv

    @property
    def done(self) -> bool:
        return self.status == "done"


def _read_log(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    except (OSError, csv.Error) as err:
        raise ScsonetError(f"{path}: unreadable training log ({err})") from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ScsonetError(f"{path}: cannot read the run's config ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ScsonetError(f"{path}: not a config mapping")
    return config


def check_recipe(study: Study, config: dict[str, Any], model: str, seed: int, where: Path,
                 ignore: Sequence[str] = ()) -> None:
    """Raise unless a record's resolved config is the study's recipe for (model, seed)."""
    defaults = TrainConfig()
    asked = {**study.recipe, "model": model, "seed": seed, "model_args": {}}
    differ = [f"{key}={config.get(key, getattr(defaults, key))!r} there, {value!r} in {study.path}"
              for key, value in asked.items() if key not in ignore and config.get(key, getattr(defaults, key)) != value]
    if differ:
        raise ScsonetError(f"{where}: made with another recipe ({'; '.join(differ)}); results of two recipes "
                           f"are never pooled: move that run away or change the spec")


def read_record(study: Study, model: str, seed: int) -> Record:
    run_dir = study.run_dir(model, seed)
    record = Record(model, seed, run_dir, "missing")
    if not (run_dir / CONFIG).is_file():
        return record
    record.config = _read_config(run_dir / CONFIG)
    check_recipe(study, record.config, model, seed, run_dir / CONFIG)
    log = _read_log(run_dir / LOG)
    try:
        record.epochs_done = max((int(r["epoch"]) for r in log), default=0)
        record.seconds = sum(float(r["seconds"]) for r in log)
    except (KeyError, ValueError) as err:
        raise ScsonetError(f"{run_dir / LOG}: not a training log ({type(err).__name__}: {err})") from None
    if not (run_dir / REPORT).is_file():
        record.status = "partial"
        return record
    try:
        record.report = json.loads((run_dir / REPORT).read_text())
        for key in ("miou", "dsc"):
            float(record.report["pooled"][key])
        with open(run_dir / PER_IMAGE, newline="") as f:
            rows = list(csv.DictReader(f))
        record.ids = tuple(r["id"] for r in rows)
        record.dice = np.array([float(r["dice"]) for r in rows], dtype=np.float64)
    except FileNotFoundError as err:
        raise ScsonetError(f"{err.filename}: missing from a finished run's record") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ScsonetError(f"{run_dir / 'test'}: not a test record ({type(err).__name__}: {err})") from None
    if len(record.ids) != record.report.get("n_images"):
        raise ScsonetError(f"{run_dir / PER_IMAGE}: {len(record.ids)} rows, report says {record.report.get('n_images')}")
    record.status = "done"
    return record


def read_records(study: Study) -> dict[tuple[str, int], Record]:
    """Every (model, seed) of every table, as committed; the test images must be the same for all."""
    records = {}
    for table in study.tables:
        for row in table.rows:
            for seed in table.seeds:
                if (row.model, seed) not in records:
                    records[row.model, seed] = read_record(study, row.model, seed)
    done = [r for r in records.values() if r.done]
    if done and any(set(r.ids) != set(done[0].ids) for r in done):
        odd = next(r for r in done if set(r.ids) != set(done[0].ids))
        raise ScsonetError(f"{odd.run_dir / PER_IMAGE}: other test images than {done[0].run_dir / PER_IMAGE}")
    return records


# -- statistics --------------------------------------------------------------------------------


def seed_averaged_dice(records: Sequence[Record]) -> tuple[tuple[str, ...], np.ndarray]:
    """Per-image Dice averaged over the given finished runs, images in sorted-id order."""
    ids = tuple(sorted(records[0].ids))
    stacked = []
    for r in records:
        by_id = dict(zip(r.ids, r.dice))
        stacked.append([by_id[i] for i in ids])
    return ids, np.mean(np.array(stacked, dtype=np.float64), axis=0)


def paired_bootstrap(diff: np.ndarray, resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``diff`` and its percentile bootstrap CI, resampling images with replacement."""
    diff = np.asarray(diff, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = 1000  # bounded memory: 1000 x n indices at a time
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        means[start:stop] = diff[rng.integers(0, len(diff), size=(stop - start, len(diff)))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(diff.mean()), float(lo), float(hi)


def verdict(lo: float, hi: float, reference: str) -> str:
    if lo > 0:
        return f"better than {reference}"
    if hi < 0:
        return f"worse than {reference}"
    return f"no detectable difference from {reference}"


# -- tables ------------------------------------------------------------------------------------

METRIC_KEYS = ("miou", "dsc", "dice", "fail")


def _per_seed(record: Record, failure: float) -> dict[str, float]:
    return {"miou": 100 * record.report["pooled"]["miou"], "dsc": 100 * record.report["pooled"]["dsc"],
            "dice": 100 * float(record.dice.mean()), "fail": 100 * float((record.dice < failure).mean())}


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _seeds_cell(table: StudyTable, records: dict, model: str, gpu_only: bool) -> str:
    done = [s for s in table.seeds if records[model, s].done]
    text = f"{len(done)}/{len(table.seeds)}" + (f" ({', '.join(map(str, done))})" if done else "")
    pending = []
    for s in table.seeds:
        r = records[model, s]
        if r.status == "partial":
            pending.append(f"s{s} at epoch {r.epochs_done}")
        elif r.status == "missing":
            pending.append(f"s{s} not run" + (" (GPU only)" if gpu_only else ""))
    return text + (f"; {', '.join(pending)}" if pending else "")


@dataclass(frozen=True)
class _Counts:
    params: int
    macs: int
    paper_params_m: float | None  # thop's counts / 1024^2 and / 1024^3, as the paper printed them
    paper_gflops: float | None


def _complexity(models: Sequence[str], size: int) -> dict[str, _Counts]:
    """Exact counts from the model code (deterministic; no thop, whose presence would change them)."""
    return {name: _counts(name, size) for name in models}


@functools.lru_cache(maxsize=None)
def _counts(name: str, size: int) -> _Counts:
    import torch

    from .complexity import count_macs, count_params, thop_counts
    from .models import create_model

    # Exact counts on the meta device: the same numbers (shapes only), without computing UNet's 12 G MACs.
    with torch.device("meta"):
        model = create_model(name)
        params, macs = count_params(model), count_macs(model, (size, size))
    thop_macs, thop_params = thop_counts(create_model(name), (size, size))  # thop reads values: a real pass
    return _Counts(params, macs, None if thop_params is None else thop_params / 1024**2,
                   None if thop_macs is None else thop_macs / 1024**3)


TABLE_COLUMNS = ("Model", "Params", "MACs (M)", "Params (M, paper)", "GFLOPs (paper)", "CPU ms (b1)",
                 "mIoU (%)", "DSC (%)", "Dice per image (%)", "Failures (%)", "Paper mIoU", "Paper DSC",
                 "Protocol", "Schedule", "Seeds")


def _table_cells(study: Study, table: StudyTable, row: StudyRow, records: dict, counts: _Counts,
                 latency: dict[str, float]) -> tuple[list[str], dict[str, list[float]]]:
    done = [records[row.model, s] for s in table.seeds if records[row.model, s].done]
    values = {k: [_per_seed(r, study.failure_dice)[k] for r in done] for k in METRIC_KEYS}
    paper = PUBLISHED[table.published][row.published] if table.published and row.published else None
    ms = latency.get(row.model)
    label = row.label + (" (published figures only: GPU only, not trained)" if row.gpu_only and not done else "")
    paper_counts = ["—" if v is None else f"{v:.3f}" for v in (counts.paper_params_m, counts.paper_gflops)]
    cells = [label, f"{counts.params:,}", f"{counts.macs / 1e6:,.1f}", *paper_counts,
             "—" if ms is None else f"{ms:.1f}",
             *(_mean_std(values[k]) for k in METRIC_KEYS),
             "—" if paper is None else f"{paper[2]:.2f}", "—" if paper is None else f"{paper[3]:.2f}",
             study.protocol, study.schedule, _seeds_cell(table, records, row.model, row.gpu_only)]
    return cells, values


def _paired(study: Study, table: StudyTable, records: dict) -> list[dict[str, Any]]:
    """Each row's model against the reference on the seeds both have finished, seed-averaged per image."""
    out = []
    for row in table.rows:
        if row.model == study.reference:
            continue
        seeds = [s for s in table.seeds if records[row.model, s].done and
                 (study.reference, s) in records and records[study.reference, s].done]
        entry = {"table": table.key, "model": row.model, "label": row.label, "reference": study.reference,
                 "seeds": seeds}
        if seeds:
            ids, mine = seed_averaged_dice([records[row.model, s] for s in seeds])
            _, ref = seed_averaged_dice([records[study.reference, s] for s in seeds])
            b = study.bootstrap
            mean, lo, hi = paired_bootstrap(100 * (mine - ref), b["resamples"], b["seed"], b["level"])
            entry.update(n_images=len(ids), diff=mean, lo=lo, hi=hi, verdict=verdict(lo, hi, study.reference))
        out.append(entry)
    return out


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _paired_lines(study: Study, paired: list[dict[str, Any]]) -> list[str]:
    level = round(100 * study.bootstrap["level"])
    rows = []
    for p in paired:
        seeds = f"{len(p['seeds'])} ({', '.join(map(str, p['seeds']))})" if p["seeds"] else "0"
        if "diff" in p:
            rows.append([p["label"], seeds, str(p["n_images"]), f"{p['diff']:+.2f}",
                         f"[{p['lo']:+.2f}, {p['hi']:+.2f}]", p["verdict"]])
        else:
            rows.append([p["label"], seeds, "—", "—", "—", f"not available (no finished seed shared with "
                                                           f"{study.reference})"])
    return _md_table(("Model", "Seeds", "Images", f"Δ Dice per image vs {study.reference} (points)",
                      f"{level} % CI", "Verdict"), rows)


def _common_header(study: Study) -> list[str]:
    r = study.recipe
    fit, select = PROTOCOLS[study.protocol]
    b = study.bootstrap
    return [
        f"Data: `{study.data}` ({study.split}); protocol {study.protocol} (fit on {'+'.join(fit)}, checkpoint "
        f"chosen on {select}, test read once). Schedule: {r['epochs']} epochs, AdamW lr {r.get('lr', 1e-3):g}, "
        f"weight decay {r.get('weight_decay', 1e-2):g}, cosine T_max {r['t_max']} to {r.get('eta_min', 1e-5):g} "
        f"(the rate is at its minimum at the last epoch), batch {r.get('batch_size', 8)}, BCE + Dice.",
        "Metrics: mean ± sample std over the finished seeds (the Seeds column says how many of the table's). "
        "mIoU and DSC: one confusion matrix pooled over all test pixels (the paper's); Dice per image: the mean "
        f"over test images; Failures: images with Dice < {study.failure_dice:g}.",
        f"Params and MACs: exact counts at {study.latency['size']}x{study.latency['size']} (PyTorch's FLOP "
        "counter); paper: the paper's convention, thop's module-hook counts divided by 1024² and 1024³ "
        "(it misses functional operators; `scsonet complexity`). CPU ms: median batch-1 latency from "
        "`latency.json`.",
        f"Δ: per-image Dice of the model minus {study.reference}'s, each averaged over the seeds both have, "
        f"mean over the test images; CI: percentile bootstrap over images ({b['resamples']:,} resamples, "
        f"seed {b['seed']}). Verdict: better / worse when the CI excludes 0, else no detectable difference.",
    ]


def _cost_lines(study: Study, records: dict) -> list[str]:
    """The short schedule against the 300-epoch reference run of the same model, seed and recipe."""
    c = study.cost
    if c is None:
        return []
    config = _read_config(c.config)
    check_recipe(study, config, c.model, c.seed, c.config, ignore=("epochs",))
    log = _read_log(c.log)
    if not log:
        raise ScsonetError(f"{c.log}: no training log")
    try:
        val = [(int(r["epoch"]), float(r["select_dsc"])) for r in log]
    except (KeyError, ValueError) as err:
        raise ScsonetError(f"{c.log}: not a training log ({type(err).__name__}: {err})") from None
    try:
        card = json.loads(c.card.read_text())
        report = next(iter(card["_metrics"].values()))
    except (OSError, ValueError, KeyError, StopIteration) as err:
        raise ScsonetError(f"{c.card}: not a model card with a test report ({type(err).__name__})") from None
    epochs = study.recipe["epochs"]
    short = [v for v in val if v[0] <= epochs]
    best_short, best_long = max(short, key=lambda v: (v[1], -v[0])), max(val, key=lambda v: (v[1], -v[0]))
    rows = [[f"300-epoch run, first {epochs} epochs", f"{100 * best_short[1]:.2f} (epoch {best_short[0]})",
             "—", "—", "—"],
            [f"300-epoch run, all {len(val)} epochs", f"{100 * best_long[1]:.2f} (epoch {best_long[0]})",
             f"{100 * report['pooled']['miou']:.2f}", f"{100 * report['pooled']['dsc']:.2f}",
             f"{100 * report['per_image']['dice_mean']:.2f}"]]
    mine = records.get((c.model, c.seed))
    if mine is not None and mine.done:
        study_log = _read_log(mine.run_dir / LOG)
        best = max(((int(r["epoch"]), float(r["select_dsc"])) for r in study_log), key=lambda v: (v[1], -v[0]))
        rows.insert(0, [f"this study, {epochs} epochs", f"{100 * best[1]:.2f} (epoch {best[0]})",
                        f"{100 * mine.report['pooled']['miou']:.2f}", f"{100 * mine.report['pooled']['dsc']:.2f}",
                        f"{100 * float(mine.dice.mean()):.2f}"])
    else:
        rows.insert(0, [f"this study, {epochs} epochs", "— (not finished)", "—", "—", "—"])
    gain = 100 * (best_long[1] - best_short[1])
    return [f"## What the {epochs}-epoch schedule costs", "",
            f"{c.model}, seed {c.seed}, the same recipe at {len(val)} epochs (`{c.log}`; its test figures from "
            f"`{c.card}`). Within one run, selecting on val over {len(val)} epochs instead of the first {epochs} "
            f"gains {gain:+.2f} DSC points on val. The 300-epoch run was trained on another device, so its first "
            f"{epochs} epochs are not bit-identical to this study's run.", "",
            *_md_table((f"{c.model}, seed {c.seed}", "best val DSC (%)", "test mIoU (%)", "test DSC (%)",
                        "test Dice per image (%)"), rows), ""]


def _cpu_hours(records: dict) -> float:
    return sum(r.seconds for r in records.values()) / 3600


def build_outputs(study: Study, records: dict[tuple[str, int], Record], latency: dict[str, Any],
                  link_prefix: str = "") -> dict[str, str]:
    """Every text output, keyed by file name: a pure function of the records, code and latency."""
    ms = {name: float(v) for name, v in (latency.get("ms") or {}).items()}
    counts = _complexity(study.models(), int(study.latency["size"]))
    outputs, sections, all_paired = {}, [], []
    for table in study.tables:
        cells, csv_rows = [], []
        for row in table.rows:
            line, values = _table_cells(study, table, row, records, counts[row.model], ms)
            cells.append(line)
            c = counts[row.model]
            csv_rows.append([row.model, row.label, c.params, c.macs, _number(c.paper_params_m, 4),
                             _number(c.paper_gflops, 4), "" if ms.get(row.model) is None else f"{ms[row.model]:.3f}"]
                            + [cell for k in METRIC_KEYS for cell in _csv_stats(values[k])]
                            + ["" if cell == "—" else cell for cell in line[10:12]] + [study.protocol, study.schedule,
                               " ".join(str(s) for s in table.seeds if records[row.model, s].done),
                               len(table.seeds)])
        paired = _paired(study, table, records)
        all_paired += paired
        lines = [f"## {table.title}", ""]
        if table.note:
            lines += [table.note, ""]
        lines += _md_table(TABLE_COLUMNS, cells) + [""]
        if table.published:
            lines += [f"Paper mIoU / DSC: the paper's printed figures ({table.published}; its protocol selected "
                      f"the checkpoint on test, 300 epochs, its own code).", ""]
        lines += _paired_lines(study, paired) + [""]
        section = "\n".join(lines)
        sections.append(section)
        outputs[f"{table.key}.md"] = f"# {study.name}: {table.title}\n\n" + "\n".join(_common_header(study)) + \
            "\n\n" + section
        outputs[f"{table.key}.csv"] = _csv_text(
            ("model", "label", "params", "macs", "paper_params_m", "paper_gflops", "cpu_ms_b1",
             *(f"{k}_{s}" for k in ("miou", "dsc", "dice_per_image", "failure_rate") for s in ("mean", "std", "n")),
             "paper_miou", "paper_dsc", "protocol", "schedule", "seeds_done", "seeds_planned"), csv_rows)
    outputs["paired.csv"] = _csv_text(
        ("table", "model", "reference", "seeds", "n_images", "diff_dice_points", "ci_lo", "ci_hi", "verdict"),
        [[p["table"], p["model"], p["reference"], " ".join(map(str, p["seeds"])), p.get("n_images", ""),
          *(f"{p[k]:.4f}" if k in p else "" for k in ("diff", "lo", "hi")), p.get("verdict", "")]
         for p in all_paired])
    cost = _cost_lines(study, records)
    if cost:
        outputs["cost.md"] = "\n".join(cost)
    done = sum(r.done for r in records.values())
    lat = latency.get("settings") or {}
    machine = latency.get("machine") or {}
    summary = [
        *_common_header(study), "",
        f"Runs finished: {done} of {len(records)}; training time in the records: {_cpu_hours(records):.1f} "
        f"hours of wall clock" + (f" (CPU latency measured on {machine.get('processor') or machine.get('machine')}, "
                                  f"{lat.get('threads')} threads, load average {machine.get('loadavg')})"
                                  if machine else "") + ".", "",
        *sections, *cost,
        f"![DSC against MACs]({link_prefix}dsc_vs_macs.png)", "",
    ]
    if (study.out / "qualitative.png").is_file():  # drawn only where checkpoints and data were present
        summary += [f"Test images where {study.reference} (seed-averaged Dice) does best, typically and worst; "
                    f"each model's outline (red) beside the ground truth (green):", "",
                    f"![Qualitative results]({link_prefix}qualitative.png)", ""]
    outputs["summary.md"] = "\n".join(summary)
    return outputs


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _csv_stats(values: Sequence[float]) -> list[str]:
    if not values:
        return ["", "", "0"]
    std = f"{statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return [f"{statistics.fmean(values):.4f}", std, str(len(values))]


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def figure_rows(study: Study, records: dict) -> list[TableRow]:
    """Table 1's rows for ``plot_dsc_vs_macs``: ours where finished, the paper's printed points beside."""
    table = study.tables[0]
    counts = _complexity([r.model for r in table.rows], int(study.latency["size"]))
    rows = []
    for row in table.rows:
        c = counts[row.model]
        done = [records[row.model, s] for s in table.seeds if records[row.model, s].done]
        if done:
            ours = TableRow(row.model, "ours", None, None, c.params, c.macs, [r.seed for r in done])
            ours.metrics["DSC (%)"] = [_per_seed(r, study.failure_dice)["dsc"] for r in done]
            rows.append(ours)
        if table.published and row.published:
            params_m, gflops, miou, dsc = PUBLISHED[table.published][row.published]
            rows.append(TableRow(row.model, f"published {table.published}", params_m, gflops, c.params, c.macs,
                                 metrics={"mIoU (%)": [miou], "DSC (%)": [dsc]}))
    return rows


# -- latency -----------------------------------------------------------------------------------


def measure_latency(models: Sequence[str], size: int = 256, batch: int = 1, threads: int = 2, warmup: int = 3,
                    repeats: int = 20) -> dict[str, Any]:
    """Median wall-clock ms per forward pass of each model (eval, inference mode), timed round-robin.

    Round-robin: a burst of other work on the machine slows every model alike, not one of them.
    """
    import torch

    from .models import create_model

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        nets = {name: create_model(name).eval() for name in models}
        x = torch.randn(batch, 3, size, size)
        times: dict[str, list[float]] = {name: [] for name in nets}
        with torch.inference_mode():
            for net in nets.values():
                for _ in range(warmup):
                    net(x)
            for _ in range(repeats):
                for name, net in nets.items():
                    start = time.perf_counter()
                    net(x)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {
        "settings": {"size": size, "batch": batch, "threads": threads, "warmup": warmup, "repeats": repeats,
                     "statistic": "median", "backend": f"torch {torch.__version__} eager, inference_mode"},
        "machine": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "loadavg": [round(v, 2) for v in os.getloadavg()]},
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "ms": {name: round(1000 * statistics.median(t), 3) for name, t in times.items()},
        "min_ms": {name: round(1000 * min(t), 3) for name, t in times.items()},
    }


def read_latency(study: Study) -> dict[str, Any]:
    path = study.out / LATENCY_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ScsonetError(f"{path}: unreadable latency record ({err})") from None


# -- qualitative figure --------------------------------------------------------------------------


def pick_images(ids: Sequence[str], dice: np.ndarray, per_kind: int) -> list[tuple[str, str]]:
    """(kind, id): the best, the median and the worst images by Dice; ties broken by id."""
    order = sorted(range(len(ids)), key=lambda i: (-dice[i], ids[i]))
    mid = len(order) // 2 - per_kind // 2
    picks = [("easy", i) for i in order[:per_kind]] + [("typical", i) for i in order[mid:mid + per_kind]] \
        + [("hard", i) for i in order[len(order) - per_kind:]]
    return [(kind, ids[i]) for kind, i in picks]


def plot_qualitative(study: Study, records: dict, path: Path) -> Path | None:
    """Figures 7-8 of the paper: chosen test images, ground truth and each Table-1 model's outline.

    Uses each model's weights (``best.pt`` or the record's ``weights.safetensors``) for the first seed
    of Table 1 and the prepared test split; returns None (and leaves a committed figure alone) when
    the reference's records, the weights or the data are missing.
    """
    import torch

    from .benchmark import _matplotlib
    from .data import PreparedData
    from .evaluation import predict_probs
    from .models import load_model

    table = study.tables[0]
    seed = table.seeds[0]
    ref_done = [records[study.reference, s] for s in table.seeds if records[study.reference, s].done]
    weights = {row.model: found for row in table.rows
               if records[row.model, seed].done and (found := find_run_weights(study.run_dir(row.model, seed)))}
    models = [row for row in table.rows if row.model in weights]
    if not ref_done or not models or not (study.data / "manifest.json").is_file():
        return None
    ids, dice = seed_averaged_dice(ref_done)
    picks = pick_images(ids, dice, int(study.qualitative["per_kind"]))
    test = PreparedData(study.data, verify=False).load("test")
    index = {image_id: i for i, image_id in enumerate(test.ids)}
    take = [index[image_id] for _, image_id in picks]
    images, masks = test.images[take], test.masks[take]
    preds = {}
    for row in models:
        loaded = load_model(weights[row.model])
        with torch.inference_mode():
            preds[row.model] = (predict_probs(loaded.model, loaded.preset(images)) >= 0.5).numpy()[:, 0]
    Figure, FigureCanvasAgg = _matplotlib()
    cols = 1 + len(models)
    fig = Figure(figsize=(1.9 * cols, 1.9 * len(picks)), dpi=110)
    FigureCanvasAgg(fig)
    for r, (kind, image_id) in enumerate(picks):
        rgb = images[r].permute(1, 2, 0).numpy()
        gt = masks[r, 0].numpy()
        for c in range(cols):
            ax = fig.add_subplot(len(picks), cols, r * cols + c + 1)
            ax.imshow(rgb)
            ax.contour(gt, levels=[0.5], colors=["lime"], linewidths=1.2)
            if c:
                name = models[c - 1].model
                if preds[name][r].any():
                    ax.contour(preds[name][r], levels=[0.5], colors=["red"], linewidths=1.0)
                d = 2 * (preds[name][r] & (gt > 0)).sum() / max(preds[name][r].sum() + (gt > 0).sum(), 1)
                ax.set_title(f"{models[c - 1].label}: {100 * d:.0f}", fontsize=7)
            else:
                ax.set_title(f"{kind}: {image_id}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"green: ground truth, red: prediction (seed {seed}); title: Dice (%)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path


# -- the command -------------------------------------------------------------------------------


@dataclass
class StudyResult:
    outputs: dict[str, Path]
    trained: list[tuple[str, int]]
    records: dict[tuple[str, int], Record]


def rebuild(study: Study, records: dict | None = None, link_prefix: str = "") -> dict[str, str]:
    """The text outputs from the committed records and latency.json, written nowhere."""
    return build_outputs(study, read_records(study) if records is None else records, read_latency(study),
                         link_prefix)


def _trained_at(run_dir: Path) -> str | None:
    """The commit of the code that ran a record's last training segment, as its segments.jsonl says."""
    commit = ((read_segments(run_dir) or [{}])[-1]).get("git_commit")
    return commit if isinstance(commit, str) else None


def _keep_selected_weights(run_dir: Path, log: Callable[[str], None]) -> None:
    """Give a finished run's record its selected weights, where its ``best.pt`` is here and they are not."""
    if (run_dir / "best.pt").is_file() and not (run_dir / RECORD_WEIGHTS).is_file():
        log(f"{run_dir.name}: keeping its selected weights in the record ({RECORD_WEIGHTS})")
        keep_record_weights(run_dir, _trained_at(run_dir))


def run_study(study: Study, *, train: bool = True, only: Sequence[str] = (), max_runs: int | None = None,
              latency: bool | None = None, qualitative: bool | None = None,
              log: Callable[[str], None] = print) -> StudyResult:
    """Train the study's missing runs (resuming), then write every output from the records.

    Args:
        study: the parsed spec.
        train: train what is missing (False: rebuild the outputs from the committed records only).
        only: train only these models (their tables are still rebuilt whole).
        max_runs: stop after training this many runs (None: all).
        latency: measure CPU latency into ``latency.json`` (None: when training).
        qualitative: (re)make ``qualitative.png`` (None: when training; needs checkpoints and data).
        log: where progress lines go.
    """
    import torch

    if unknown := [m for m in only if m not in study.models()]:
        raise ScsonetError(f"--only {unknown[0]}: not a model of {study.path} ({', '.join(study.models())})")
    if max_runs is not None and max_runs < 0:
        raise ScsonetError(f"--max-runs {max_runs}: expected 0 or more")
    records = read_records(study)  # refuses a mismatched record before any training
    trained = []
    if train:
        gpu = torch.cuda.is_available() and study.execution.get("device", "auto") != "cpu"
        jobs = [job for job in study.jobs(gpu) if not only or job[0] in only]
        todo = [job for job in jobs if not records[job].done]
        if max_runs is not None:
            todo = todo[:max_runs]
        for i, (model, seed) in enumerate(todo, 1):
            cfg = study.train_config(model, seed)
            prefix = f"[{i}/{len(todo)}] {cfg.run_name}: "
            ensure_run(cfg, lambda line, prefix=prefix: log(prefix + line))
            _keep_selected_weights(study.run_dir(model, seed), log)  # at once: a later run may be cut short
            trained.append((model, seed))
        records = read_records(study)
    for (model, seed), record in records.items():  # also in a rebuild, for runs trained by older code
        if record.done:
            _keep_selected_weights(study.run_dir(model, seed), log)
    study.out.mkdir(parents=True, exist_ok=True)
    if latency if latency is not None else train:
        s = study.latency
        log(f"measuring CPU latency of {len(study.models())} models ({s['threads']} threads, batch {s['batch']})")
        measured = measure_latency(study.models(), int(s["size"]), int(s["batch"]), int(s["threads"]),
                                   int(s["warmup"]), int(s["repeats"]))
        load = (measured.get("machine") or {}).get("loadavg") or [0.0]
        if load[0] > (os.cpu_count() or 1):
            log(f"warning: load average {load[0]} on {os.cpu_count()} CPUs: the latency figures are inflated; "
                f"measure again on a quiet machine (--no-train --latency)")
        write_json_atomic(study.out / LATENCY_FILE, measured)
    written = {}
    if qualitative if qualitative is not None else train:  # first: the summary links it when present
        if (path := plot_qualitative(study, records, study.out / "qualitative.png")) is not None:
            written["qualitative.png"] = path
        else:
            log("qualitative.png left as it is: needs the data and the Table 1 checkpoints")
    for name, text in rebuild(study, records).items():
        write_text_atomic(study.out / name, text)
        written[name] = study.out / name
    fig_rows = figure_rows(study, records)
    if fig_rows:
        written["dsc_vs_macs.png"] = plot_dsc_vs_macs(
            fig_rows, study.out / "dsc_vs_macs.png",
            title=f"{study.name}, {study.protocol} protocol, {study.schedule}")
    log(f"wrote {', '.join(str(p) for p in written.values())}")
    return StudyResult(written, trained, records)
