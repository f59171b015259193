"""The training loop: protocols, resume, non-finite loss, config checking, distributed run (the
steps themselves: ``test_train_steps.py``)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scsonet.errors import ScsonetError
from scsonet.train import TrainConfig, get_lr, load_config, train

SIZE = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared 'folder' dataset: 20 synthetic 32x32 pairs (bright disc = lesion), random split."""
    from PIL import Image

    from scsonet.data import prepare_dataset

    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for name in ("images", "masks"):
        (root / "raw" / name).mkdir(parents=True)
    for i in range(20):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(4, 9)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)
        image = rng.integers(0, 90, (SIZE, SIZE, 3), dtype=np.uint8) + mask[..., None] * 120
        Image.fromarray(image).save(root / "raw" / "images" / f"img{i:02d}.png")
        Image.fromarray(mask * 255).save(root / "raw" / "masks" / f"img{i:02d}.png")
    prepare_dataset("folder", root / "raw", root / "prepared", size=SIZE, test_ratio=0.25, val_ratio=0.2,
                    workers=1, progress=False)
    return root / "prepared"


def _cfg(prepared, out_dir, **kw):
    base = dict(data=str(prepared), epochs=2, batch_size=4, eval_batch_size=8, out_dir=str(out_dir),
                progress=False, tensorboard=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# log.csv's losses of the first two epochs of _cfg's run, recorded before train() was cut into a
# step object and helpers (eager and split steps alike); other CPUs round a little differently
RECORDED_LOSSES = (1.625134, 1.358286)


def _weights(run_dir, name="last.pt"):
    return torch.load(Path(run_dir) / name, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_run_writes_its_directory(prepared, tmp_path):
    run_dir = train(_cfg(prepared, tmp_path))
    for name in ("config.yaml", "log.csv", "best.pt", "last.pt", "test/report.json", "test/per_image.csv"):
        assert (run_dir / name).is_file(), name
    rows = list(csv.DictReader(open(run_dir / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(r["select_split"] == "val" and float(r["select_dsc"]) >= 0 for r in rows)
    with pytest.raises(ScsonetError, match="--resume"):
        train(_cfg(prepared, tmp_path))


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(prepared, tmp_path, monkeypatch, processes):
    whole = train(_cfg(prepared, tmp_path / "whole", epochs=3, processes=processes))

    import scsonet.train as train_module

    real_evaluate = train_module.evaluate
    calls = {"n": 0}

    def evaluate_then_die(*args, **kwargs):  # killed after the 2nd epoch's checkpoint
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(prepared, tmp_path / "cut", epochs=3, processes=processes))
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    cut = Path(tmp_path / "cut" / "scsonet-honest-s42")
    assert torch.load(cut / "last.pt", weights_only=False)["epoch"] == 1
    resumed = train(load_config(cut / "config.yaml"), resume=cut)
    a, b = _weights(whole), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in csv.DictReader(open(run / "log.csv"))] for run in (whole, resumed)]
    assert len(losses[1]) == 3 and losses[0] == losses[1]
    assert [float(v) for v in losses[0][:2]] == pytest.approx(RECORDED_LOSSES, rel=1e-4)


@pytest.mark.parametrize("protocol, fitted, selected", [("honest", ["train"], "val"), ("paper", ["train", "val"], "test")])
@pytest.mark.slow
def test_protocols_read_splits_in_order(prepared, tmp_path, monkeypatch, protocol, fitted, selected):
    from scsonet.data import PreparedData

    reads = []
    real_load = PreparedData.load
    monkeypatch.setattr(PreparedData, "load", lambda self, split: reads.append(split) or real_load(self, split))
    run_dir = train(_cfg(prepared, tmp_path, protocol=protocol, epochs=1))
    # fitting splits and the selection split first; test once more at the very end
    assert reads == [*fitted, selected, "test"]
    ckpt = torch.load(run_dir / "best.pt", weights_only=False)
    assert ckpt["protocol"] == protocol and ckpt["select_split"] == selected
    report = (run_dir / "test" / "report.json").read_text()
    assert f'"protocol": "{protocol}"' in report


@pytest.mark.slow
def test_non_finite_loss_stops_cleanly_and_keeps_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    import scsonet.train as train_module

    class NanAfterFirstEpoch(train_module.BceDiceLoss):
        calls = 0

        def forward(self, logits, targets):
            NanAfterFirstEpoch.calls += 1
            loss = super().forward(logits, targets)
            return loss * float("nan") if NanAfterFirstEpoch.calls > 3 else loss  # 3 batches an epoch

    monkeypatch.setattr(train_module, "BceDiceLoss", NanAfterFirstEpoch)
    with pytest.raises(train_module.NonFiniteLoss, match="last good checkpoint"):
        train(_cfg(prepared, tmp_path, epochs=3, processes=1))  # the counting loss stays in this process
    last = torch.load(tmp_path / "scsonet-honest-s42" / "last.pt", weights_only=False)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_learning_rate_follows_torch_cosine_annealing():
    cfg = TrainConfig()
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.t_max, eta_min=cfg.eta_min)
    for epoch in range(120):
        assert opt.param_groups[0]["lr"] == pytest.approx(get_lr(epoch, cfg), rel=1e-6)
        opt.step()
        sched.step()
    assert get_lr(50, cfg) == pytest.approx(cfg.eta_min) and get_lr(100, cfg) == pytest.approx(cfg.lr)


def test_config_file_and_overrides_are_type_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 5\nlr: 0.01\n")
    cfg = load_config(path, ["batch_size=4", "protocol=paper", "weight_decay=0"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.protocol, cfg.weight_decay) == (5, 0.01, 4, "paper", 0.0)
    with pytest.raises(ScsonetError, match="unknown config key 'epoch'"):
        load_config(None, ["epoch=3"])
    with pytest.raises(ScsonetError, match="expected int"):
        load_config(None, ["epochs=three"])
    with pytest.raises(ScsonetError, match="protocol"):
        load_config(None, ["protocol=leaky"])
    with pytest.raises(ScsonetError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_of_record_is_the_paper_recipe():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "isic2017_scsonet.yaml")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.t_max, cfg.eta_min, cfg.seed) == (
        300, 8, 1e-3, 1e-2, 50, 1e-5, 42)
    assert cfg.protocol == "honest"


@pytest.mark.slow
def test_two_process_gloo_run_trains_one_epoch(prepared, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "scsonet.cli.main", "train", "--set", f"data={prepared}", "--set", "epochs=1",
           "--set", "batch_size=2", "--set", f"out_dir={tmp_path}", "--set", "progress=false",
           "--set", "tensorboard=false", "--set", "device=cpu"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "scsonet-honest-s42"
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 0
    assert (run_dir / "test" / "report.json").is_file()


@pytest.mark.slow
def test_deep_supervision_side_outputs_enter_the_loss(prepared, tmp_path, monkeypatch):
    import scsonet.train as train_module

    seen = []
    real = train_module.deep_supervision_loss
    monkeypatch.setattr(train_module, "deep_supervision_loss",
                        lambda aux, y, crit: seen.append(len(aux)) or real(aux, y, crit))
    train(_cfg(prepared, tmp_path, model="egeunet", epochs=1, processes=1))  # the spy stays in this process
    assert seen and all(n == 5 for n in seen)
    seen.clear()
    train(_cfg(prepared, tmp_path, epochs=1, processes=1))  # scsonet has no side outputs
    assert seen == []


@pytest.mark.slow
def test_bf16_run_on_the_cpu_trains_the_plain_model_under_autocast(prepared, tmp_path):
    run_dir = train(_cfg(prepared, tmp_path, epochs=1, amp="bf16"))  # fast=True: its twins are float32 kernels
    (row,) = csv.DictReader(open(run_dir / "log.csv"))
    assert float(row["loss"]) != RECORDED_LOSSES[0] and float(row["loss"]) == pytest.approx(RECORDED_LOSSES[0], rel=0.05)


def test_budget_stop_reads_no_test_and_the_resume_tests_once_keeping_the_history(prepared, tmp_path, monkeypatch,
                                                                                  capsys):
    from scsonet.data import PreparedData
    from scsonet.train import read_segments

    reads = []
    real_load = PreparedData.load
    monkeypatch.setattr(PreparedData, "load", lambda self, split: reads.append(split) or real_load(self, split))
    run_dir = train(_cfg(prepared, tmp_path, epochs=3, processes=1, max_minutes=1e-6))  # spent after epoch 1
    out = capsys.readouterr().out
    assert "test" not in reads and not (run_dir / "test").exists()
    assert "the test split was not read" in out and f"scsonet train --resume {run_dir}" in out
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 0
    config_before = (run_dir / "config.yaml").read_bytes()

    resumed = train(load_config(run_dir / "config.yaml", ["max_minutes=0"]), resume=run_dir)  # as the CLI does
    assert resumed == run_dir and reads.count("test") == 1 and (run_dir / "test" / "report.json").is_file()
    assert (run_dir / "config.yaml").read_bytes() == config_before  # the first segment's, override and all
    first, second = read_segments(run_dir)
    assert (first["first_epoch"], first["last_epoch"], first["stopped"], first["test_read"]) == (1, 1, "time budget", False)
    assert (second["first_epoch"], second["last_epoch"], second["stopped"], second["test_read"]) == (2, 3, "completed", True)
    assert (first["resumed"], second["resumed"]) == (False, True)
    assert first["config"]["max_minutes"] == 1e-6 and second["config"]["max_minutes"] == 0.0
    assert all(r["wall_seconds"] >= 0 and r["ended_at"] >= r["started_at"] and r["scsonet_version"] for r in (first, second))
    assert len(list(csv.DictReader(open(run_dir / "log.csv")))) == 3
    with pytest.raises(ScsonetError, match="already trained to epoch 3 of 3 and tested"):
        train(load_config(run_dir / "config.yaml"), resume=run_dir)  # test is never read a second time
    assert reads.count("test") == 1


def test_a_segment_left_running_is_recorded_as_killed_by_the_next(tmp_path):
    from scsonet.train import _Segment, read_segments

    cfg = TrainConfig(epochs=5)
    first = _Segment(tmp_path, cfg, done_epochs=0, resumed=False)  # then kill -9: no end is written
    assert read_segments(tmp_path)[0]["stopped"] == "running"
    _Segment(tmp_path, cfg, done_epochs=3, resumed=True)  # resumed from last.pt of epoch 3
    killed, running = read_segments(tmp_path)
    assert (killed["segment"], killed["stopped"], killed["last_epoch"], killed["ended_at"]) == (1, "killed", 3, None)
    assert (running["segment"], running["first_epoch"], running["stopped"]) == (2, 4, "running")
    assert killed["started_at"] == first.record["started_at"]
    (tmp_path / "segments.jsonl").write_text("not json\n")
    with pytest.raises(ScsonetError, match="line 1 is not a segment record"):
        read_segments(tmp_path)


@pytest.mark.slow
def test_non_finite_loss_before_any_checkpoint_names_none(prepared, tmp_path, monkeypatch):
    import scsonet.train as train_module

    class NanLoss(train_module.BceDiceLoss):
        def forward(self, logits, targets):
            return super().forward(logits, targets) * float("nan")

    monkeypatch.setattr(train_module, "BceDiceLoss", NanLoss)
    with pytest.raises(train_module.NonFiniteLoss, match="no checkpoint was written yet") as info:
        train(_cfg(prepared, tmp_path, epochs=2, processes=1))  # the loss stays in this process
    run_dir = tmp_path / "scsonet-honest-s42"
    assert "last.pt" not in str(info.value) and not (run_dir / "last.pt").exists()
    (record,) = train_module.read_segments(run_dir)
    assert (record["stopped"], record["last_epoch"], record["test_read"]) == ("non-finite loss", 0, False)


@pytest.mark.slow
def test_benchmark_resumes_a_run_that_its_time_budget_stopped(prepared, tmp_path):
    import dataclasses

    from scsonet.benchmark import ensure_run

    cfg = _cfg(prepared, tmp_path, epochs=2, processes=1, max_minutes=1e-6, run_name="budget")
    lines = []
    with pytest.raises(ScsonetError, match="time budget after epoch 1 of 2, before reading test"):
        ensure_run(cfg, log=lines.append)
    assert not (tmp_path / "budget" / "test").exists()
    report = ensure_run(dataclasses.replace(cfg, max_minutes=0.0), log=lines.append)  # max_minutes: runtime only
    assert lines[-1].startswith("resuming") and 0 <= report["pooled"]["dsc"] <= 1
