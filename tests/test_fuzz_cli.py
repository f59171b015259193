"""Fuzz-style: every command fed broken files, paths and values ends in one error line, exit 2,
no traceback and no output left behind (issue 12)."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

from _synthdata import folder_dataset
from scsonet.cli.main import main
from scsonet.models import create_model

SIZE = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A prepared tiny dataset, a real checkpoint, a good image and a zoo of broken files."""
    from scsonet.data import prepare_dataset

    root = tmp_path_factory.mktemp("fuzz")
    data = root / "data"
    prepare_dataset("folder", folder_dataset(root / "raw", n=10), data, size=SIZE, workers=1, progress=False)
    torch.manual_seed(0)
    good = root / "good.pt"
    torch.save({"model": create_model("scsonet").state_dict(), "model_name": "scsonet", "model_args": {},
                "preprocessing": {"resize_size": [SIZE, SIZE], "mean": [0.5] * 3, "std": [0.2] * 3},
                "epoch": 0, "best_val_dsc": 0.5}, good)
    broken = {
        "missing": root / "no_such_file.pt",
        "folder": root / "a_folder.pt",
        "empty": root / "empty.pt",
        "text": root / "text.pt",
        "random": root / "random.pt",
        "truncated": root / "truncated.pt",
    }
    broken["folder"].mkdir()
    broken["empty"].write_bytes(b"")
    broken["text"].write_text("not a checkpoint\n")
    broken["random"].write_bytes(os.urandom(4096))
    broken["truncated"].write_bytes(good.read_bytes()[:3000])
    image = next((root / "raw").rglob("*.png"))
    return {"root": root, "data": data, "good": good, "image": image, "broken": broken}


def _outputs(out: pathlib.Path) -> list[pathlib.Path]:
    return sorted(out.rglob("*")) if out.exists() else []


def _assert_one_error(capsys, command: str, argv: list[str], out: pathlib.Path) -> str:
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"scsonet {command}: error: "), (argv, captured.err)
    assert "\n" not in err and "Traceback" not in captured.err, (argv, captured.err)
    assert _outputs(out) == [], (argv, _outputs(out))  # nothing half-written
    return err


# command, argv(weights file, out path) for every command that reads a model file
WEIGHTS_COMMANDS = {
    "predict": lambda w, out, world: ["predict", str(world["image"]), "--weights", str(w), "--out", str(out)],
    "evaluate": lambda w, out, world: ["evaluate", "--weights", str(w), "--data", str(world["data"]),
                                       "--out", str(out)],
    "export": lambda w, out, world: ["export", "--weights", str(w), "--out", str(out / "m.onnx")],
    "weights": lambda w, out, world: ["weights", "pack", "--checkpoint", str(w), "--data", str(world["data"]),
                                      "--out", str(out / "w.safetensors")],
}


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "text", "random", "truncated"])
@pytest.mark.parametrize("command", sorted(WEIGHTS_COMMANDS))
def test_broken_model_files(world, tmp_path, capsys, command, kind):
    out = tmp_path / "out"
    argv = WEIGHTS_COMMANDS[command](world["broken"][kind], out, world)
    err = _assert_one_error(capsys, command, argv, out)
    assert world["broken"][kind].name in err  # the message names the file


@pytest.mark.parametrize("kind", ["empty", "text", "random", "truncated"])
def test_resume_from_broken_last_pt(world, tmp_path, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(world["broken"][kind].read_bytes())
    before = sorted(p.name for p in run.iterdir())
    assert main(["train", "--resume", str(run), "--set", f"data={world['data']}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("scsonet train: error: ") and captured.err.count("\n") == 1, captured.err
    assert sorted(p.name for p in run.iterdir()) == before  # the run directory is untouched


@pytest.mark.parametrize("argv_tail", [
    ["--threshold", "2"], ["--threshold", "nan"], ["--batch-size", "0"], ["--weights", "no-such-weights-name"],
])
def test_predict_bad_values(world, tmp_path, capsys, argv_tail):
    out = tmp_path / "out"
    _assert_one_error(capsys, "predict", ["predict", str(world["image"]), "--out", str(out), *argv_tail], out)


@pytest.mark.parametrize("data_kind", ["missing", "folder", "text"])
def test_evaluate_and_train_on_broken_datasets(world, tmp_path, capsys, data_kind):
    bad = world["broken"][data_kind]
    out = tmp_path / "out"
    _assert_one_error(capsys, "evaluate", ["evaluate", "--weights", str(world["good"]), "--data", str(bad),
                                           "--out", str(out)], out)
    _assert_one_error(capsys, "train", ["train", "--set", f"data={bad}", "--set", f"out_dir={out}",
                                        "--set", "progress=false", "--set", "tensorboard=false"], out)


@pytest.mark.parametrize("size, src", [("abc", None), ("0", None), ("1000000", None), ("64", "no/such/folder")])
def test_data_prepare_bad_values(world, tmp_path, capsys, size, src):
    out = tmp_path / "prepared"
    argv = ["data", "prepare", "--dataset", "folder", "--src", src or str(world["root"] / "raw"), "--out", str(out),
            "--size", size, "--no-progress"]
    _assert_one_error(capsys, "data", argv, out)


def test_complexity_bad_values(capsys, tmp_path):
    for argv in (["complexity", "--model", "no_such_model"], ["complexity", "--size", "-5"]):
        _assert_one_error(capsys, "complexity", argv, tmp_path / "none")
