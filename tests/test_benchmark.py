"""scsonet benchmark: table and figure in the paper's columns, resuming, refusing mixed settings."""
from __future__ import annotations

import csv
import shutil
import sys

import pytest

import scsonet.benchmark as benchmark
from scsonet.benchmark import PAPER_COLUMNS, TableRow, format_csv, format_markdown, run_benchmark
from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.models import list_models
from test_train import prepared  # noqa: F401  (a prepared synthetic 32x32 dataset, reused)

SETTINGS = ["batch_size=4", "progress=false", "tensorboard=false", "device=cpu", "eval_batch_size=8"]
# Two models if a small peer is registered, else one model over two seeds.
MODELS, SEEDS = (["scsonet", "egeunet"], [42]) if "egeunet" in list_models() else (["scsonet"], [42, 43])


@pytest.fixture(scope="module")
def finished(prepared, tmp_path_factory):
    """A benchmark of two models (or one model, two seeds), one epoch each, already run."""
    out = tmp_path_factory.mktemp("bench")
    result = run_benchmark(prepared, MODELS, SEEDS, out, overrides=SETTINGS, epochs=1, published="isic2017",
                           log=lambda line: None)
    return out, result


def _no_training(*args, **kwargs):
    raise AssertionError("train() called for a finished run")


@pytest.mark.slow
def test_writes_table_in_the_papers_columns_and_figure(finished):
    out, result = finished
    assert result.table_md == out / "table.md" and result.figure == out / "dsc_vs_macs.png"
    assert (out / "dsc_vs_macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "table.md").read_text()
    assert "Protocol: honest" in md
    header = next(line for line in md.splitlines() if line.startswith("| Model"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert tuple(columns[:5]) == PAPER_COLUMNS
    assert {"Params", "MACs (M)", "Acc (%)", "Sen (%)", "Spe (%)", "Dice per image (%)"} <= set(columns)
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(list(rows[0])[:5]) == PAPER_COLUMNS
    ours = [r for r in rows if r["Source"] == "ours"]
    assert [r["Model"] for r in ours] == MODELS
    for row in ours:
        assert 0 <= float(row["DSC (%)"]) <= 100 and int(row["Params"]) > 0 and int(row["MACs"]) > 0
        assert row["Seeds"] == " ".join(map(str, SEEDS))
    # the paper's published row for SCSONet, as printed, marked as such
    assert "| scsonet (published isic2017) | 0.149 | 0.056 | 80.14 | 88.97 |" in md
    assert [r["DSC (%)"] for r in rows if r["Model"] == "scsonet" and r["Source"] != "ours"] == ["88.9700"]


@pytest.mark.slow
def test_table_values_come_from_the_run_reports(finished):
    import json

    out, result = finished
    row = result.rows[0]
    dsc = [100 * json.loads((out / "runs" / f"scsonet-honest-s{s}" / "test" / "report.json").read_text())
           ["pooled"]["dsc"] for s in SEEDS]
    assert row.model == "scsonet" and row.metrics["DSC (%)"] == pytest.approx(dsc)
    assert row.params == 159_439


@pytest.mark.slow
def test_rerun_keeps_finished_runs_and_rewrites_the_table(prepared, finished, monkeypatch):
    out, _ = finished
    before = (out / "table.md").read_text()
    (out / "table.md").unlink()
    monkeypatch.setattr(benchmark, "train", _no_training)
    lines = []
    # runtime-only settings (threads, device, progress...) may differ on a rerun
    run_benchmark(prepared, MODELS, SEEDS, out, overrides=["batch_size=4", "threads=1", "progress=true"],
                  epochs=1, published="isic2017", log=lines.append)
    assert (out / "table.md").read_text() == before
    assert sum("done, kept" in line for line in lines) == len(MODELS) * len(SEEDS)


@pytest.mark.slow
def test_run_without_report_resumes_from_last_checkpoint(prepared, finished, tmp_path, monkeypatch):
    out, _ = finished
    run = "scsonet-honest-s42"
    shutil.copytree(out / "runs" / run, tmp_path / "runs" / run)
    shutil.rmtree(tmp_path / "runs" / run / "test")  # killed after its last epoch, before the test
    calls = []
    real_train = benchmark.train
    monkeypatch.setattr(benchmark, "train", lambda cfg, resume=None: calls.append(resume) or real_train(cfg, resume))
    result = run_benchmark(prepared, ["scsonet"], [42], tmp_path, overrides=SETTINGS, epochs=1, figure=False,
                           log=lambda line: None)
    assert calls == [tmp_path / "runs" / run]
    assert (tmp_path / "runs" / run / "test" / "report.json").is_file() and result.figure is None
    assert (tmp_path / "table.csv").is_file() and not (tmp_path / "dsc_vs_macs.png").exists()


@pytest.mark.slow
def test_run_trained_with_other_settings_is_an_error_naming_it(prepared, finished, monkeypatch, capsys):
    out, _ = finished
    monkeypatch.setattr(benchmark, "train", _no_training)
    with pytest.raises(ScsonetError, match=r"scsonet-honest-s42: trained with other settings \(epochs=1 there, 2 asked"):
        run_benchmark(prepared, ["scsonet"], [42], out, overrides=SETTINGS, epochs=2, figure=False)
    with pytest.raises(ScsonetError, match="lr=0.001 there, 0.002 asked"):
        run_benchmark(prepared, ["scsonet"], [42], out, overrides=[*SETTINGS, "lr=0.002"], epochs=1, figure=False)
    # the command line: exit status 2 and one line naming the run
    rc = main(["benchmark", "--data", str(prepared), "--models", "scsonet", "--seeds", "42", "--epochs", "3",
               "--out", str(out), "--no-figure", *[a for s in SETTINGS for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2 and "scsonet-honest-s42" in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_keeps_finished_runs_and_prints_the_table(prepared, finished, tmp_path, monkeypatch, capsys):
    out, _ = finished
    shutil.copytree(out / "runs", tmp_path / "runs")
    monkeypatch.setattr(benchmark, "train", _no_training)
    rc = main(["benchmark", "--data", str(prepared), "--models", ",".join(MODELS), "--seeds",
               ",".join(map(str, SEEDS)), "--epochs", "1", "--protocol", "honest", "--out", str(tmp_path),
               *[a for s in SETTINGS for a in ("--set", s)]])
    assert rc == 0
    assert "| Model | Params (M) | GFLOPs | mIoU (%) | DSC (%) |" in capsys.readouterr().out
    assert (tmp_path / "table.md").is_file() and (tmp_path / "dsc_vs_macs.png").is_file()


@pytest.mark.slow
def test_bad_requests_fail_before_any_training(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "train", _no_training)
    with pytest.raises(ScsonetError, match="unknown model 'nope'"):
        run_benchmark(prepared, ["scsonet", "nope"], [42], tmp_path, overrides=SETTINGS, figure=False)
    with pytest.raises(ScsonetError, match="sets data, model"):
        run_benchmark(prepared, ["scsonet"], [42], tmp_path, overrides=["model=unet"], figure=False)
    with pytest.raises(ScsonetError, match="isic2019"):
        run_benchmark(prepared, ["scsonet"], [42], tmp_path, published="isic2019", figure=False)
    with pytest.raises(ScsonetError, match="not found"):
        run_benchmark(tmp_path / "missing", ["scsonet"], [42], tmp_path, figure=False)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if matplotlib were not installed
    with pytest.raises(ScsonetError, match=r"pip install 'scsonet\[plot\]'"):
        run_benchmark(prepared, ["scsonet"], [42], tmp_path, overrides=SETTINGS)
    assert not (tmp_path / "runs").exists()


def test_mean_and_sample_std_over_seeds():
    row = TableRow("scsonet", "ours", 0.149, 0.056, 159_439, 82_764_960, [1, 2],
                   {"mIoU (%)": [70.0, 80.0], "DSC (%)": [80.0, 90.0]})
    assert row.mean("DSC (%)") == 85.0 and row.std("DSC (%)") == pytest.approx(7.0711, abs=1e-4)
    assert "| scsonet | 0.149 | 0.056 | 75.00 ± 7.07 | 85.00 ± 7.07 | 159,439 | 82.8 |" in format_markdown([row])
    line = dict(zip(*csv.reader(format_csv([row]).splitlines())))
    assert line["DSC (%)"] == "85.0000" and line["DSC std"] == "7.0711" and line["Seeds"] == "1 2"
    single = TableRow("scsonet", "ours", 0.149, 0.056, 1, 1, [1], {"DSC (%)": [80.0]})
    assert single.std("DSC (%)") is None and "| 80.00 |" in format_markdown([single])
