"""Every training setting is checked in load_config: a bad value is one line, `config <key>=<value>: ...`,
before any data is read or any file is written."""
from __future__ import annotations

import pytest

from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.train import load_config

BAD = [
    ("batch_size=0", "config batch_size=0: expected an integer >= 1"),
    ("eval_batch_size=0", "config eval_batch_size=0: expected an integer >= 1"),
    ("eval_every=0", "config eval_every=0: expected an integer >= 1"),
    ("epochs=0", "config epochs=0: expected an integer >= 1"),
    ("t_max=0", "config t_max=0: expected an integer >= 1"),
    ("lr=-1", "config lr=-1.0: expected a finite number > 0"),
    ("lr=0", "config lr=0.0: expected a finite number > 0"),
    ("lr=.nan", "config lr=nan: expected a finite number > 0"),
    ("lr=.inf", "config lr=inf: expected a finite number > 0"),
    ("eta_min=-1e-5", "config eta_min=-1e-05: expected a finite number in 0..lr (0.001)"),
    ("eta_min=0.01", "config eta_min=0.01: expected a finite number in 0..lr (0.001)"),
    ("eta_min=.nan", "config eta_min=nan: expected a finite number in 0..lr"),
    ("weight_decay=-0.1", "config weight_decay=-0.1: expected a finite number >= 0"),
    ("weight_decay=.inf", "config weight_decay=inf: expected a finite number >= 0"),
    ("bce_weight=-1", "config bce_weight=-1.0: expected a finite number >= 0"),
    ("dice_weight=.nan", "config dice_weight=nan: expected a finite number >= 0"),
    ("seed=-5", "config seed=-5: expected an integer in 0..2**32-1"),
    ("threads=-1", "config threads=-1: expected an integer >= 0"),
    ("max_minutes=-1", "config max_minutes=-1.0: expected a finite number >= 0"),
    ("max_minutes=.nan", "config max_minutes=nan: expected a finite number >= 0"),
    ("model=resnet50", "config model='resnet50': expected a registered model (ablation_base"),
    ("model_args={foo: 1}", "config model_args={'foo': 1}: scsonet does not take argument 'foo'"),
    ("model_args={embed_dims: 3}", "config model_args={'embed_dims': 3}: scsonet cannot be built with them"),
    ("model_args=[1]", "config model_args=[1]: expected dict"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_named_error(override, message):
    with pytest.raises(ScsonetError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_both_loss_weights_zero():
    with pytest.raises(ScsonetError, match=r"config dice_weight=0.0: expected a number > 0 when bce_weight is 0"):
        load_config(None, ["bce_weight=0", "dice_weight=0"])
    assert load_config(None, ["bce_weight=0"]).dice_weight == 1.0  # one of them may be 0


def test_edges_that_are_allowed():
    assert load_config(None, ["eta_min=0"]).eta_min == 0.0
    cfg = load_config(None, ["epochs=1", "batch_size=1", "eval_every=1", "t_max=1", "lr=1e-5", "eta_min=1e-5", "weight_decay=0", "seed=0", "threads=0", "max_minutes=0",
                             "model=unext_s", "model_args={}"])
    assert (cfg.epochs, cfg.eta_min, cfg.lr, cfg.model) == (1, 1e-5, 1e-5, "unext_s")
    assert load_config(None, ["model_args={embed_dims: [8, 16, 24, 32, 48, 64]}"]).model_args["embed_dims"][0] == 8


def test_config_file_values_are_checked_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 0\n")
    with pytest.raises(ScsonetError, match="config epochs=0: expected an integer >= 1"):
        load_config(path)


@pytest.mark.parametrize("override", ["epochs=0", "model_args={foo: 1}", "lr=.nan", "seed=[", "batch_size=0"])
def test_cli_train_stops_before_writing_anything(tmp_path, capsys, monkeypatch, override):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--set", f"out_dir={tmp_path / 'runs'}", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scsonet train: error: ") and "\n" not in err
    assert "best.pt" not in err  # epochs=0 used to fail late, on a best.pt that no epoch wrote
    assert list(tmp_path.iterdir()) == []
