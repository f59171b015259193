"""The comparison table of the paper (Table 1), regenerated: train and test every model and seed.

    scsonet benchmark --data data/isic2017 --models scsonet,egeunet,malunet,unext_s,unet \\
        --seeds 42,43,44 --out bench/isic2017

Each (model, seed) trains in its own run directory ``OUT/runs/<model>-<protocol>-s<seed>`` with
``scsonet.train``. Running the same command again resumes: a run with a test report is kept, a run
with ``last.pt`` but no report continues from its last epoch, and a run trained with different
settings is an error (results of two recipes are never averaged together). Then
``OUT/table.md``, ``OUT/table.csv`` and ``OUT/dsc_vs_macs.png`` are written from the reports.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from ._io import atomic_path, write_text_atomic
from .complexity import measure
from .errors import ScsonetError
from .models import create_model
from .train import PROTOCOLS, TrainConfig, load_config, read_segments, train

__all__ = ["BenchmarkResult", "TableRow", "PUBLISHED", "PAPER_COLUMNS", "run_benchmark", "ensure_run",
           "check_run_config", "format_markdown", "format_csv", "plot_dsc_vs_macs"]

# Params (M), GFLOPs, mIoU (%), DSC (%) as the paper printed them: thop counts divided by 1024^2 and
# 1024^3, pooled pixel metrics, paper protocol (fit on train+val, checkpoint chosen on test).
# ISIC2017 and ISIC2018 from Table 1; the ablation rows from Table 2 (ISIC2018).
PUBLISHED: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "isic2017": {
        "unet": (7.77, 13.76, 76.98, 86.99),
        "unext_s": (0.32, 0.10, 78.26, 87.80),
        "malunet": (0.175, 0.083, 78.78, 88.13),
        "egeunet": (0.053, 0.072, 79.81, 88.77),
        "scsonet": (0.149, 0.056, 80.14, 88.97),
    },
    "isic2018": {
        "unet": (7.77, 13.76, 78.13, 86.99),
        "unext_s": (0.32, 0.10, 79.09, 88.33),
        "malunet": (0.175, 0.083, 80.25, 89.04),
        "egeunet": (0.053, 0.072, 80.94, 89.46),
        "scsonet": (0.149, 0.056, 80.99, 89.50),
        "ablation_base": (0.175, 0.083, 79.01, 88.27),
        "ablation_convstem": (0.164, 0.057, 80.02, 89.01),
        "ablation_scf": (0.150, 0.078, 80.48, 89.19),
    },
}

PAPER_COLUMNS = ("Model", "Params (M)", "GFLOPs", "mIoU (%)", "DSC (%)")
# (report section, key, column): the paper's two metrics first, then the other pooled ones and per-image Dice.
METRICS = (
    ("pooled", "miou", "mIoU (%)"),
    ("pooled", "dsc", "DSC (%)"),
    ("pooled", "accuracy", "Acc (%)"),
    ("pooled", "sensitivity", "Sen (%)"),
    ("pooled", "specificity", "Spe (%)"),
    ("per_image", "dice_mean", "Dice per image (%)"),
)
EXTRA_METRIC_COLUMNS = tuple(column for _, _, column in METRICS[2:])
MARKDOWN_COLUMNS = PAPER_COLUMNS + ("Params", "MACs (M)") + EXTRA_METRIC_COLUMNS + ("Seeds",)
CSV_COLUMNS = (PAPER_COLUMNS + ("Source", "Seeds", "Params", "MACs") + EXTRA_METRIC_COLUMNS
               + tuple(f"{column.split(' (')[0]} std" for _, _, column in METRICS))

# Settings that change how a run executes, not what it computes: they may differ on a rerun.
RUNTIME_KEYS = frozenset({"out_dir", "run_name", "device", "threads", "progress", "tensorboard",
                          "eval_batch_size", "cuda_graph", "max_minutes"})
# Set by the benchmark for each run; a --set of these would be silently replaced, so it is refused.
BENCHMARK_KEYS = ("data", "model", "seed", "out_dir", "run_name")
REPORT = Path("test") / "report.json"


@dataclass
class TableRow:
    """One line of the table: a model's complexity and its test metrics (in %) over seeds."""

    model: str
    source: str  # "ours", or "published <dataset>"
    paper_params_m: float | None  # the paper's convention (thop / 1024^2)
    paper_gflops: float | None  # the paper's convention (thop / 1024^3)
    params: int | None = None  # exact
    macs: int | None = None  # exact, at the table's input size
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # column -> one value per seed

    @property
    def published(self) -> bool:
        return self.source != "ours"

    @property
    def label(self) -> str:
        return f"{self.model} ({self.source})" if self.published else self.model

    def mean(self, column: str) -> float | None:
        values = self.metrics.get(column)
        return statistics.fmean(values) if values else None

    def std(self, column: str) -> float | None:
        """Sample standard deviation over seeds; None with fewer than two."""
        values = self.metrics.get(column) or []
        return statistics.stdev(values) if len(values) > 1 else None


@dataclass
class BenchmarkResult:
    rows: list[TableRow]
    table_md: Path
    table_csv: Path
    figure: Path | None
    run_dirs: list[Path]


def run_benchmark(
        data: str | Path,
        models: Sequence[str],
        seeds: Sequence[int],
        out: str | Path,
        *,
        config: str | Path | None = None,
        overrides: Sequence[str] = (),
        protocol: str | None = None,
        epochs: int | None = None,
        published: str | None = None,
        figure: bool = True,
        log: Callable[[str], None] = print,
) -> BenchmarkResult:
    """Train and test every model with every seed (resuming), then write the table and figure.

    Args:
        data: prepared dataset folder (``scsonet data prepare``).
        models: registered model names, in table order.
        seeds: training seeds; the table gives mean ± std over them.
        out: benchmark folder: ``runs/``, ``table.md``, ``table.csv``, ``dsc_vs_macs.png``.
        config: training config (YAML) applied to every run (None = the paper's recipe).
        overrides: ``key=value`` settings on top of ``config``, as ``scsonet train --set``.
        protocol: ``honest`` or ``paper`` (None = the config's, honest by default).
        epochs: epochs per run (None = the config's).
        published: also show the paper's figures for this dataset (``isic2017``, ``isic2018``).
        figure: write ``dsc_vs_macs.png`` (needs matplotlib).
        log: where progress lines go (print).
    """
    out = Path(out).resolve()
    models, seeds = list(dict.fromkeys(models)), list(dict.fromkeys(seeds))
    if not models or not seeds:
        raise ScsonetError("benchmark needs at least one model and one seed")
    if published is not None and published not in PUBLISHED:
        raise ScsonetError(f"published figures {published!r}: choose from {', '.join(PUBLISHED)}")
    if owned := [o for o in overrides if o.partition("=")[0].strip() in BENCHMARK_KEYS]:
        raise ScsonetError(f"--set {owned[0]}: the benchmark sets {', '.join(BENCHMARK_KEYS)} itself")
    if figure:
        _matplotlib()  # fail before hours of training, not after
    extra = [f"protocol={protocol}"] if protocol else []
    extra += [f"epochs={epochs}"] if epochs is not None else []
    base = load_config(config, [*overrides, *extra])

    from .data import PreparedData

    dataset = PreparedData(data, verify=False)  # train() verifies the checksums
    size = dataset.size
    complexity = {}
    for name in models:  # builds every model up front: a bad name or argument fails before training
        model = create_model(name, **base.model_args)
        complexity[name] = measure(name, model, size)

    run_dirs, reports = [], {}
    jobs = [(name, seed) for name in models for seed in seeds]
    for i, (name, seed) in enumerate(jobs, 1):
        cfg = dataclasses.replace(base, data=str(dataset.root.resolve()), model=name, seed=seed,
                                  out_dir=str(out / "runs"), run_name=f"{name}-{base.protocol}-s{seed}")
        run_dirs.append(Path(cfg.out_dir) / cfg.run_name)
        prefix = f"[{i}/{len(jobs)}] {cfg.run_name}: "
        reports[name, seed] = ensure_run(cfg, lambda line, prefix=prefix: log(prefix + line))

    rows = []
    for name in models:
        c = complexity[name]
        row = TableRow(name, "ours", c.paper_params_m, c.paper_gflops, c.params, c.macs, seeds)
        for section, key, column in METRICS:
            row.metrics[column] = [100 * reports[name, s][section][key] for s in seeds]
        rows.append(row)
        if published and name in PUBLISHED[published]:
            params_m, gflops, miou, dsc = PUBLISHED[published][name]
            rows.append(TableRow(name, f"published {published}", params_m, gflops, c.params, c.macs,
                                 metrics={"mIoU (%)": [miou], "DSC (%)": [dsc]}))

    n_test = next(iter(reports.values())).get("n_images")
    header = _header(base, dataset.root, seeds, size, n_test, published)
    write_text_atomic(out / "table.md", format_markdown(rows, header))
    write_text_atomic(out / "table.csv", format_csv(rows))
    figure_path = None
    if figure:
        figure_path = plot_dsc_vs_macs(rows, out / "dsc_vs_macs.png",
                                       title=f"{Path(data).name}, {base.protocol} protocol")
    log(f"wrote {out / 'table.md'}, {out / 'table.csv'}" + (f", {figure_path}" if figure_path else ""))
    return BenchmarkResult(rows, out / "table.md", out / "table.csv", figure_path, run_dirs)


def ensure_run(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The test report of the run ``cfg`` names: kept if done, resumed if cut short, else trained."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if (run_dir / REPORT).is_file():
        check_run_config(run_dir, cfg)
        log("done, kept")
    elif (run_dir / "last.pt").is_file():
        check_run_config(run_dir, cfg)
        log(f"resuming {run_dir}")
        train(cfg, resume=run_dir)
    else:
        log(f"training {cfg.epochs} epochs, {cfg.protocol} protocol -> {run_dir}")
        train(cfg)
    last = {} if (run_dir / REPORT).is_file() else (read_segments(run_dir) or [{}])[-1]
    if last.get("stopped") == "time budget":  # untested by design: the same command again resumes it
        raise ScsonetError(f"{run_dir}: stopped on its time budget after epoch {last.get('last_epoch')} of "
                           f"{cfg.epochs}, before reading test; run the same command again to continue it")
    return _read_report(run_dir)


def check_run_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Raise unless ``run_dir`` was trained with ``cfg``'s settings (runtime-only keys aside)."""
    path = run_dir / "config.yaml"
    try:
        stored = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ScsonetError(f"{path}: cannot read the run's config ({str(err).splitlines()[0]})") from None
    if not isinstance(stored, dict):
        raise ScsonetError(f"{path}: not a config mapping")
    asked = dataclasses.asdict(cfg)
    differ = []
    for key, value in asked.items():
        if key in RUNTIME_KEYS:
            continue
        was = stored.get(key, getattr(TrainConfig(), key))
        same = Path(str(was)).resolve() == Path(value).resolve() if key == "data" else was == value
        if not same:
            differ.append(f"{key}={was!r} there, {value!r} asked")
    if differ:
        raise ScsonetError(f"{run_dir}: trained with other settings ({'; '.join(differ)}); "
                           f"use another --out or remove that run")


def _read_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / REPORT
    try:
        report = json.loads(path.read_text())
        for section, key, _ in METRICS:
            float(report[section][key])
    except FileNotFoundError:
        raise ScsonetError(f"{path}: missing after training") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ScsonetError(f"{path}: not a test report ({type(err).__name__}: {err})") from None
    return report


def _header(cfg: TrainConfig, data: Path, seeds: Sequence[int], size: tuple[int, int], n_test: int | None,
            published: str | None) -> list[str]:
    fit, select = PROTOCOLS[cfg.protocol]
    lines = [
        f"Protocol: {cfg.protocol} (fit on {'+'.join(fit)}, checkpoint chosen on {select}, scored on test"
        + (", so the scores are optimistic" if select == "test" else "") + ").",
        f"Data: {data}, {n_test if n_test is not None else '?'} test images at {size[0]}x{size[1]}; "
        f"epochs {cfg.epochs}; seeds {', '.join(map(str, seeds))}"
        + (" (mean ± sample std over seeds)." if len(seeds) > 1 else "."),
        "Params (M) and GFLOPs: the paper's convention (thop counts divided by 1024^2 and 1024^3). "
        f"Params and MACs (M): exact counts at {size[0]}x{size[1]}.",
        "mIoU (the lesion's IoU, as the paper names it), DSC, Acc, Sen, Spe: one confusion matrix pooled over "
        "all test pixels, threshold 0.5. Dice per image: the mean of the per-image Dice.",
    ]
    if published:
        lines.append(f"Rows marked 'published {published}': the paper's printed figures (paper protocol, "
                     f"300 epochs, its own split and code), for reference.")
    return lines


def _format_cell(row: TableRow, column: str) -> str:
    mean, std = row.mean(column), row.std(column)
    if mean is None:
        return ""
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _markdown_cells(row: TableRow) -> list[str]:
    if row.published:  # as printed: no exact counts, no other metrics
        return [row.label, f"{row.paper_params_m:g}", f"{row.paper_gflops:g}", _format_cell(row, "mIoU (%)"),
                _format_cell(row, "DSC (%)")] + [""] * (len(MARKDOWN_COLUMNS) - len(PAPER_COLUMNS))
    paper = ["" if v is None else f"{v:.3f}" for v in (row.paper_params_m, row.paper_gflops)]
    return ([row.label, *paper, _format_cell(row, "mIoU (%)"), _format_cell(row, "DSC (%)"),
             f"{row.params:,}", f"{row.macs / 1e6:,.1f}"]
            + [_format_cell(row, column) for column in EXTRA_METRIC_COLUMNS] + [str(len(row.seeds))])


def format_markdown(rows: Iterable[TableRow], header: Sequence[str] = ()) -> str:
    """The table as Markdown, after ``header`` lines; numbers right-aligned."""
    lines = ["# Comparison with the paper's Table 1", "", *header, ""] if header else []
    lines.append("| " + " | ".join(MARKDOWN_COLUMNS) + " |")
    lines.append("| --- |" + " ---: |" * (len(MARKDOWN_COLUMNS) - 1))
    lines += ["| " + " | ".join(_markdown_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def format_csv(rows: Iterable[TableRow]) -> str:
    """The table as CSV: means in the metric columns, sample std over seeds in the ``std`` columns."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        exact = ["", ""] if row.published else [row.params, row.macs]
        writer.writerow(
            [row.model, _number(row.paper_params_m, 4), _number(row.paper_gflops, 4),
             _number(row.mean("mIoU (%)"), 4), _number(row.mean("DSC (%)"), 4), row.source,
             " ".join(map(str, row.seeds)), *exact]
            + [_number(row.mean(column), 4) for column in EXTRA_METRIC_COLUMNS]
            + [_number(row.std(column), 4) for _, _, column in METRICS])
    return buf.getvalue()


def _matplotlib():
    """matplotlib's ``Figure`` and Agg canvas, without pyplot (no global backend state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ScsonetError("the DSC-against-MACs figure needs matplotlib: pip install 'scsonet[plot]' "
                           "(or leave the figure out with --no-figure)") from None
    return Figure, FigureCanvasAgg


def plot_dsc_vs_macs(rows: Sequence[TableRow], path: str | Path, title: str = "") -> Path:
    """DSC against exact MACs (log scale), bubble area proportional to parameters, one colour per model.

    Published figures are drawn hollow at the model's exact MACs, so that ours and the paper's
    result for one architecture sit one above the other. Models are named in the legend rather
    than beside their points: peers of similar cost (MALUNet, SCSONet) would overlap.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(9, 5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    largest = max(row.params for row in rows)
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(row.model for row in rows))}
    handles, named = [], set()
    for row in rows:
        x, y, color = row.macs, row.mean("DSC (%)"), colors[row.model]
        area = 40 + 1400 * row.params / largest
        if row.model not in named:  # one legend entry per model, whether ours or only the paper's
            named.add(row.model)
            handles.append(Line2D([], [], marker="o", linestyle="", color=color, markersize=8,
                                  label=f"{row.model}: {row.params / 1e6:.3f} M params, {row.macs / 1e6:,.1f} M MACs"))
        if row.published:
            ax.scatter([x], [y], s=area, facecolors="none", edgecolors=color, linewidths=1.5, linestyle="--")
            continue
        ax.scatter([x], [y], s=area, color=color, alpha=0.6, edgecolors="black", linewidths=0.5)
        if (std := row.std("DSC (%)")) is not None:
            ax.errorbar([x], [y], yerr=[std], color="black", capsize=3, linewidth=0.8)
    if counts := sorted({len(row.seeds) for row in rows if not row.published}):
        seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        handles.append(Line2D([], [], marker="o", linestyle="", color="grey", alpha=0.6, markersize=8,
                              label=f"ours, mean ± std over {seeds} seed(s)"))
    if published := next((row.source for row in rows if row.published), None):
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="grey",
                              markersize=8, label=f"{published}, as printed in the paper"))
    ax.set_xscale("log")
    ax.margins(x=0.3, y=0.08)
    bottom, top = ax.get_ylim()
    ax.set_ylim(max(bottom, 0.0), min(top, 100.0))
    ax.set_xlabel("multiply-accumulates per image (exact count, log scale)")
    ax.set_ylabel("DSC (%), pooled over test pixels")
    ax.set_title(f"DSC against MACs ({title});\nbubble area = parameters" if title else
                 "DSC against MACs; bubble area = parameters", fontsize=9)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
