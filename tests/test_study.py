"""The study of record (scsonet.study): spec checks, tables from records, exact rebuilds, paired tests."""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

import scsonet.study as study_mod
from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.study import load_study, paired_bootstrap, read_records, rebuild, run_study, verdict
from scsonet.train import TrainConfig
from test_train import prepared  # noqa: F401  (a prepared synthetic 32x32 dataset, reused)

N_IMAGES = 40
RECIPE = {"protocol": "honest", "epochs": 50, "lr": 0.001, "t_max": 50, "eta_min": 1.0e-05}


def _spec(tmp_path, **changes):
    spec = {
        "name": "toy study", "data": str(tmp_path / "no-data"), "split": "toy", "runs": str(tmp_path / "runs"),
        "out": str(tmp_path / "out"), "recipe": dict(RECIPE), "execution": {"progress": False},
        "bootstrap": {"resamples": 2000, "seed": 0}, "latency": {"size": 64, "repeats": 2, "warmup": 1},
        "tables": [
            {"key": "table1", "title": "Table 1", "seeds": [1, 2], "published": "isic2017",
             "rows": ["scsonet", "egeunet", {"model": "malunet", "label": "MALUNet"},
                      {"model": "unet", "gpu_only": True}]},
            {"key": "table3", "title": "Table 3", "seeds": [1], "rows": ["scf_scconv", "scsonet"]},
        ],
        "cost": {"model": "scsonet", "seed": 1, "epochs": 300, "log": str(tmp_path / "v1" / "log.csv"),
                 "config": str(tmp_path / "v1" / "config.yaml"), "card": str(tmp_path / "v1" / "card.json")},
    }
    spec.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _config(model, seed, **changes):
    cfg = dataclasses.replace(TrainConfig(), **RECIPE, model=model, seed=seed)
    return {**dataclasses.asdict(cfg), **changes}


def _log(path, epochs, dsc=0.8):
    rows = ["epoch,lr,loss,select_split,select_dsc,select_miou,best_dsc,seconds"]
    rows += [f"{e},0.001,0.5,val,{dsc + e / 10000:.6f},0.7,{dsc:.6f},30.0" for e in range(1, epochs + 1)]
    path.write_text("\n".join(rows) + "\n")


def write_run(runs, model, seed, dice=None, done=True, **config_changes):
    """A fake run record: config.yaml, log.csv and, if ``done``, test/report.json and per_image.csv."""
    run = runs / f"{model}-honest-s{seed}"
    (run / "test").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config(model, seed, **config_changes), sort_keys=False))
    _log(run / "log.csv", 50 if done else 7)
    if not done:
        return run
    dice = np.asarray(dice, dtype=float)
    rows = ["id,dice,iou,hd95,tp,fp,fn,tn"] + [f"img{i:03d},{d:.6f},{d / (2 - d):.6f},3.0,1,1,1,1"
                                               for i, d in enumerate(dice)]
    (run / "test" / "per_image.csv").write_text("\n".join(rows) + "\n")
    report = {"split": "test", "n_images": len(dice), "pooled": {"miou": float(dice.mean()) - 0.1,
                                                                 "dsc": float(dice.mean())},
              "per_image": {"dice_mean": float(dice.mean())}}
    (run / "test" / "report.json").write_text(json.dumps(report))
    return run


def _write_cost(tmp_path):
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "config.yaml").write_text(yaml.safe_dump(_config("scsonet", 1, epochs=300)))
    lines = ["epoch,lr,loss,select_split,select_dsc,select_miou,best_dsc,seconds"]
    lines += [f"{e},0.001,0.5,val,{0.85 if e <= 50 else 0.9 if e == 120 else 0.86},0.7,0.9,2.0"
              for e in range(1, 301)]
    (v1 / "log.csv").write_text("\n".join(lines) + "\n")
    (v1 / "card.json").write_text(json.dumps({"_metrics": {"ISIC2017-test": {
        "pooled": {"miou": 0.8, "dsc": 0.89}, "per_image": {"dice_mean": 0.88}}}}))


@pytest.fixture
def toy(tmp_path):
    """A spec with scsonet done on seeds 1 and 2, egeunet clearly better, malunet equal, seed 2 missing for
    malunet, scf_scconv still training, unet never run (GPU only)."""
    rng = np.random.default_rng(0)
    base = {s: np.clip(rng.uniform(0.3, 0.95, N_IMAGES), 0, 1) for s in (1, 2)}
    runs = tmp_path / "runs"
    for s in (1, 2):
        write_run(runs, "scsonet", s, base[s])
        write_run(runs, "egeunet", s, np.minimum(base[s] + 0.04, 1.0))
    write_run(runs, "malunet", 1, base[1])
    write_run(runs, "scf_scconv", 1, done=False)
    _write_cost(tmp_path)
    return load_study(_spec(tmp_path))


def test_repo_spec_fills_table1_seed_by_seed_and_reuses_shared_runs():
    study = load_study("configs/study/isic2017.yaml")
    assert study.protocol == "honest" and study.recipe["epochs"] == 50 and study.recipe["t_max"] == 50
    light = ["scsonet", "malunet", "egeunet", "unext_s"]
    jobs = study.jobs(gpu=False)
    assert jobs[:12] == [(m, s) for s in (42, 43, 44) for m in light]
    assert len(jobs) == len(set(jobs)) == 12 + 6 + 4  # Table 2's base and SCSONet, Table 3's SCSONet: reused
    assert ("unet", 42) not in jobs and ("unet", 42) in study.jobs(gpu=True)
    assert study.run_dir("egeunet", 43).as_posix() == "docs/study/runs/egeunet-honest-s43"
    cfg = study.train_config("malunet", 43)
    assert (cfg.model, cfg.seed, cfg.epochs, cfg.lr, cfg.eta_min, cfg.progress) == ("malunet", 43, 50, 1e-3, 1e-5, False)


@pytest.mark.parametrize("change, message", [
    ({"tables": [{"key": "t", "seeds": [1], "rows": ["no_such_model"]}]}, "unknown model"),
    ({"tables": [{"key": "t", "seeds": [], "rows": ["scsonet"]}]}, "seeds"),
    ({"tables": [{"key": "t", "seeds": [1], "rows": ["scsonet", "scsonet"]}]}, "twice"),
    ({"tables": [{"key": "t", "seeds": [1], "published": "isic2099", "rows": ["scsonet"]}]}, "isic2099"),
    ({"recipe": {**RECIPE, "lr": "fast"}}, "lr"),
    ({"recipe": {**RECIPE, "seed": 3}}, "seed"),
    ({"colour": "blue"}, "unknown key 'colour'"),
])
def test_spec_errors_name_the_problem(tmp_path, change, message):
    with pytest.raises(ScsonetError, match=message):
        load_study(_spec(tmp_path, **change))


def test_tables_from_records(toy):
    records = read_records(toy)
    assert records["scsonet", 2].done and records["scf_scconv", 1].status == "partial"
    assert records["unet", 1].status == "missing"
    out = rebuild(toy)
    with open(toy.runs / "scsonet-honest-s1" / "test" / "per_image.csv") as f:
        d1 = [float(r["dice"]) for r in csv.DictReader(f)]
    with open(toy.runs / "scsonet-honest-s2" / "test" / "per_image.csv") as f:
        d2 = [float(r["dice"]) for r in csv.DictReader(f)]
    rows = {r["model"]: r for r in csv.DictReader(out["table1.csv"].splitlines())}
    means = [100 * np.mean(d1), 100 * np.mean(d2)]
    assert float(rows["scsonet"]["dice_per_image_mean"]) == pytest.approx(np.mean(means), abs=1e-4)
    assert float(rows["scsonet"]["dice_per_image_std"]) == pytest.approx(np.std(means, ddof=1), abs=1e-4)
    fails = [100 * np.mean(np.array(d) < 0.5) for d in (d1, d2)]
    assert min(fails) > 0
    assert float(rows["scsonet"]["failure_rate_mean"]) == pytest.approx(np.mean(fails), abs=1e-4)
    assert rows["scsonet"]["seeds_done"] == "1 2" and rows["malunet"]["seeds_done"] == "1"
    assert rows["scsonet"]["paper_dsc"] == "88.97" and int(rows["unet"]["macs"]) > 10**8  # at the spec's 64x64
    assert rows["scsonet"]["paper_dsc"] == "88.97" and rows["unet"]["paper_miou"] == "76.98"
    if importlib.util.find_spec("thop"):  # the paper's convention: thop's counts / 1024^2
        assert float(rows["egeunet"]["paper_params_m"]) < int(rows["egeunet"]["params"]) / 1024**2
    md = out["table1.md"]
    # missing seeds are said, never silently averaged over
    assert "| 1/2 (1); s2 not run |" in md
    assert "| unet (published figures only: GPU only, not trained) |" in md
    assert "s1 not run (GPU only)" in md and "honest | 50 ep, cosine T 50" in md
    assert "0/1; s1 at epoch 7" in out["table3.md"]


def test_paired_verdicts(toy):
    paired = {(r["table"], r["model"]): r for r in csv.DictReader(rebuild(toy)["paired.csv"].splitlines())}
    better, same = paired["table1", "egeunet"], paired["table1", "malunet"]
    assert better["verdict"] == "better than scsonet" and float(better["ci_lo"]) > 0
    assert better["seeds"] == "1 2" and better["n_images"] == str(N_IMAGES)
    assert same["verdict"] == "no detectable difference from scsonet" and same["seeds"] == "1"
    assert float(same["diff_dice_points"]) == 0 and float(same["ci_lo"]) == 0 == float(same["ci_hi"])
    assert paired["table1", "unet"]["verdict"] == "" and paired["table3", "scf_scconv"]["seeds"] == ""


def test_bootstrap_ci_and_verdict():
    rng = np.random.default_rng(1)
    diff = rng.normal(1.0, 2.0, 650)
    mean, lo, hi = paired_bootstrap(diff, 4000, seed=3)
    assert lo < mean < hi and lo > 0 and mean == pytest.approx(diff.mean())
    assert paired_bootstrap(diff, 4000, seed=3) == (mean, lo, hi)  # fixed seed: the same interval
    assert verdict(lo, hi, "scsonet") == "better than scsonet"
    _, lo, hi = paired_bootstrap(-diff, 4000)
    assert verdict(lo, hi, "scsonet") == "worse than scsonet"
    _, lo, hi = paired_bootstrap(rng.normal(0.0, 2.0, 650), 4000)
    assert verdict(lo, hi, "x") == "no detectable difference from x"


def test_cost_section_prices_the_short_schedule(toy):
    cost = rebuild(toy)["cost.md"]
    assert "gains +5.00 DSC points on val" in cost
    assert "| 300-epoch run, first 50 epochs | 85.00 (epoch 1) |" in cost
    assert "| 300-epoch run, all 300 epochs | 90.00 (epoch 120) | 80.00 | 89.00 | 88.00 |" in cost


def test_tables_only_rebuild_is_byte_identical_and_needs_no_data(toy, capsys):
    args = ["benchmark", "--study", str(toy.path), "--no-train"]
    assert main(args) == 0
    names = sorted(p.name for p in toy.out.iterdir())
    assert {"table1.md", "table1.csv", "table3.md", "paired.csv", "cost.md", "summary.md", "dsc_vs_macs.png"} <= set(names)
    assert "qualitative.png" not in names and "latency.json" not in names  # nothing measured, no checkpoints
    first = {n: (toy.out / n).read_bytes() for n in names}
    (toy.out / "table1.md").unlink()
    assert main(["benchmark", "--study", str(toy.path), "--tables-only"]) == 0
    assert {n: (toy.out / n).read_bytes() for n in names} == first
    assert "Runs finished: 5 of 9" in capsys.readouterr().out


def test_latency_record_is_read_back_not_remeasured(toy, monkeypatch):
    toy.out.mkdir()
    (toy.out / "latency.json").write_text(json.dumps({"ms": {"scsonet": 12.345, "egeunet": 8.0}}))
    monkeypatch.setattr(study_mod, "measure_latency", lambda *a, **k: pytest.fail("measured in a rebuild"))
    run_study(toy, train=False, log=lambda line: None)
    row = next(line for line in (toy.out / "table1.md").read_text().splitlines() if line.startswith("| scsonet "))
    assert "| 12.3 |" in row
    assert json.loads((toy.out / "latency.json").read_text())["ms"]["scsonet"] == 12.345


def test_mismatched_recipe_is_refused(toy, capsys):
    write_run(toy.runs, "unet", 1, np.full(N_IMAGES, 0.9), lr=0.01)
    with pytest.raises(ScsonetError, match=r"another recipe \(lr=0.01 there, 0.001"):
        read_records(toy)
    assert main(["benchmark", "--study", str(toy.path), "--no-train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scsonet benchmark: error: ") and len(err.splitlines()) == 1
    assert not toy.out.exists()  # refused before writing anything


def test_other_test_images_are_refused(toy):
    run = write_run(toy.runs, "unet", 1, np.full(N_IMAGES - 1, 0.9))
    with pytest.raises(ScsonetError, match="other test images"):
        read_records(toy)
    assert run.is_dir()


def test_training_fills_table1_first_and_honours_only_and_max_runs(toy, monkeypatch):
    calls = []

    def fake_ensure_run(cfg, log):
        calls.append((cfg.model, cfg.seed))
        write_run(toy.runs, cfg.model, cfg.seed, np.full(N_IMAGES, 0.8)) if cfg.model != "scf_scconv" else None
        return {}

    monkeypatch.setattr(study_mod, "ensure_run", fake_ensure_run)
    monkeypatch.setattr(study_mod, "measure_latency", lambda models, *a: {"ms": {m: 1.0 for m in models}})
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    run_study(toy, only=["malunet", "scf_scconv"], max_runs=1, log=lambda line: None)
    assert calls == [("malunet", 2)]
    assert json.loads((toy.out / "latency.json").read_text())["ms"]["scsonet"] == 1.0
    calls.clear()
    monkeypatch.setattr(study_mod, "ensure_run", lambda cfg, log: calls.append((cfg.model, cfg.seed)))
    run_study(toy, latency=False, log=lambda line: None)
    assert calls == [("scf_scconv", 1)]  # unet is GPU only; everything else is done
    with pytest.raises(ScsonetError, match="--only nope"):
        run_study(toy, only=["nope"])


def test_each_run_keeps_its_weights_before_the_next_starts(toy, monkeypatch):
    """A study stopped during a run (the session ends) has already kept the weights of those before it."""
    kept, started = [], []

    def fake_ensure_run(cfg, log):
        started.append(cfg.model)
        if len(started) == 2:
            raise KeyboardInterrupt
        write_run(toy.runs, cfg.model, cfg.seed, np.full(N_IMAGES, 0.8))
        (toy.run_dir(cfg.model, cfg.seed) / "best.pt").write_bytes(b"checkpoint")

    monkeypatch.setattr(study_mod, "ensure_run", fake_ensure_run)
    monkeypatch.setattr(study_mod, "keep_record_weights", lambda run_dir, commit: kept.append(Path(run_dir).name))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(KeyboardInterrupt):
        run_study(toy, only=["malunet", "scf_scconv"], latency=False, log=lambda line: None)
    assert started == ["malunet", "scf_scconv"] and kept == [toy.run_dir("malunet", 2).name]


@pytest.fixture(scope="module")
def trained_study(prepared, tmp_path_factory):
    """A real (tiny) study: scsonet and egeunet, 1 epoch, two seeds, on 20 synthetic 32x32 images."""
    root = tmp_path_factory.mktemp("study")
    spec = {"name": "tiny", "data": str(prepared), "runs": str(root / "runs"), "out": str(root / "out"),
            "recipe": {"protocol": "honest", "epochs": 1, "t_max": 1, "batch_size": 4},
            "execution": {"device": "cpu", "processes": 1, "progress": False, "tensorboard": False,
                          "eval_batch_size": 8},
            "bootstrap": {"resamples": 200}, "latency": {"size": 32}, "qualitative": {"per_kind": 1},
            "tables": [{"key": "table1", "title": "Table 1", "seeds": [1, 2], "rows": ["scsonet", "egeunet"]}]}
    (root / "study.yaml").write_text(yaml.safe_dump(spec))
    study = load_study(root / "study.yaml")
    result = run_study(study, latency=False, log=lambda line: None)
    return study, result


@pytest.mark.slow
def test_study_trains_missing_runs_and_draws_the_qualitative_figure(trained_study):
    study, result = trained_study
    assert result.trained == [("scsonet", 1), ("egeunet", 1), ("scsonet", 2), ("egeunet", 2)]
    assert all(r.done for r in result.records.values())
    png = study.out / "qualitative.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.stat().st_mtime_ns
    again = run_study(study, train=False, log=lambda line: None)  # tables only: the figure is left alone
    assert again.trained == [] and png.stat().st_mtime_ns == before and "qualitative.png" not in again.outputs


@pytest.mark.slow
def test_pack_best_of_runs_installs_named_weights(trained_study, prepared, tmp_path, monkeypatch, capsys):
    from scsonet.evaluation import evaluate
    from scsonet.models import PRETRAINED, load_model, load_pretrained
    from scsonet.models._weights import Weights
    from scsonet.data import PreparedData

    study, _ = trained_study
    monkeypatch.setattr(Weights, "path", property(lambda self: tmp_path / self.filename))
    assert "egeunet-isic2017" not in PRETRAINED
    with pytest.raises(ScsonetError, match="'egeunet-isic2017' are not in this installation"):
        load_pretrained("egeunet-isic2017")
    runs = [str(study.run_dir("egeunet", s)) for s in (1, 2)]
    logs = {s: float(next(csv.DictReader(open(study.run_dir("egeunet", s) / "log.csv")))["select_dsc"]) for s in (1, 2)}
    best = max((1, 2), key=lambda s: (logs[s], -s))
    assert main(["weights", "pack", "--best-of", *runs, "--data", str(prepared),
                 "--out", str(tmp_path / "egeunet_isic2017_v1.safetensors")]) == 0
    capsys.readouterr()
    assert "egeunet-isic2017" in PRETRAINED and "malunet-isic2017" not in PRETRAINED
    card = PRETRAINED["egeunet-isic2017"].meta
    assert card["arch"] == "egeunet" and card["recipe"]["config"]["seed"] == best
    assert f"packed egeunet-honest-s{best}." in card["_docs"]
    loaded = load_pretrained("egeunet-isic2017")
    report, _ = evaluate(loaded, PreparedData(prepared).load("test"), split="test")
    assert report["pooled"] == pytest.approx(card["_metrics"]["ISIC2017-test"]["pooled"])
    assert load_model("egeunet-isic2017").name == "egeunet"
    assert main(["weights", "show", "malunet-isic2017"]) == 2
    assert "not installed" in capsys.readouterr().err


@pytest.mark.slow
def test_records_keep_their_weights_and_pack_without_checkpoints(trained_study, prepared, tmp_path, capsys):
    """A clean checkout has the records but no best.pt: packing from the records gives the same card."""
    import shutil

    study, _ = trained_study
    records = []
    for seed in (1, 2):
        run = study.run_dir("egeunet", seed)
        assert (run / "weights.safetensors").is_file() and (run / "weights.json").is_file()
        umask = os.umask(0o022)
        os.umask(umask)
        assert stat.S_IMODE((run / "weights.safetensors").stat().st_mode) == 0o666 & ~umask  # not 0600
        copy = tmp_path / "checkout" / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.pt"))
        records.append(str(copy))
    from_ckpt, from_record = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["weights", "pack", "--best-of", *(str(study.run_dir("egeunet", s)) for s in (1, 2)),
                 "--data", str(prepared), "--out", str(from_ckpt)]) == 0
    assert main(["weights", "pack", "--best-of", *records, "--data", str(prepared), "--out", str(from_record)]) == 0
    capsys.readouterr()
    a, b = (json.loads(p.with_suffix(".json").read_text()) for p in (from_ckpt, from_record))
    assert from_ckpt.read_bytes() == from_record.read_bytes()
    kept = json.loads((study.run_dir("egeunet", 1) / "weights.json").read_text())
    assert b["recipe"]["trained_at_commit"] == kept["recipe"]["trained_at_commit"]  # from its segments.jsonl
    a["recipe"].pop("trained_at_commit"), b["recipe"].pop("trained_at_commit")
    assert a["recipe"] == b["recipe"] and a["_docs"] == b["_docs"]
    ma, mb = a["_metrics"]["ISIC2017-test"], b["_metrics"]["ISIC2017-test"]
    assert ma["pooled"] == mb["pooled"] and ma["per_image"] == mb["per_image"]

    card_path = Path(records[0]) / "weights.json"
    card = json.loads(card_path.read_text())
    card["recipe"]["best_epoch"] = "1; rm -rf /"
    card_path.write_text(json.dumps(card))
    assert main(["weights", "pack", "--best-of", records[0], "--data", str(prepared),
                 "--out", str(tmp_path / "c.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "weights.json: recipe.best_epoch=" in err and "Traceback" not in err
    assert not (tmp_path / "c.safetensors").exists()
    (Path(records[1]) / "weights.safetensors").unlink()
    assert main(["weights", "pack", "--best-of", records[1], "--data", str(prepared),
                 "--out", str(tmp_path / "d.safetensors")]) == 2
    assert "holds neither best.pt nor weights.safetensors" in capsys.readouterr().err
