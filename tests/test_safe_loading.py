"""Model files from strangers: a pickle payload runs nothing, and every broken or out-of-range value
in a checkpoint, safetensors file, model card or ONNX model is one error line, exit status 2."""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

import scsonet.onnx_runtime as onnx_runtime
from _synthdata import folder_dataset
from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.models import create_model, load_model
from scsonet.models._loading import read_checkpoint
from scsonet.onnx_runtime import OrtSegmenter
from scsonet.train import TrainConfig

SIZE = 16
PREPROCESSING = {"resize_size": [SIZE, SIZE], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}


class Payload:
    """Unpickled, it creates ``marker``: what a hostile checkpoint would do, harmlessly."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"scsonet {command}: error: ") and "\n" not in err, captured.err
    assert "Traceback" not in captured.err
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A prepared 16x16 dataset, a sample image, a good checkpoint and a hostile one."""
    from scsonet.data import prepare_dataset

    root = tmp_path_factory.mktemp("safe")
    prepare_dataset("folder", folder_dataset(root / "raw", n=10), root / "data", size=SIZE, workers=1, progress=False)
    image = root / "lesion.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(image)
    torch.manual_seed(0)
    good = {"model": create_model("scsonet").state_dict(), "model_name": "scsonet", "model_args": {},
            "preprocessing": PREPROCESSING, "epoch": 0, "best_val_dsc": 0.5}
    torch.save(good, root / "good.pt")
    marker = root / "PAYLOAD_RAN"
    torch.save({**good, "model_args": {"x": Payload(marker)}}, root / "evil.pt")
    # The payload is live: the unsafe loader runs it (so its absence below means something).
    torch.load(root / "evil.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    return {"root": root, "data": root / "data", "image": image, "good": root / "good.pt",
            "evil": root / "evil.pt", "marker": marker, "state": good}


def _resume_dir(files, tmp_path, last_pt) -> pathlib.Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(data=str(files["data"]), epochs=1, out_dir=str(tmp_path), device="cpu", progress=False,
                      tensorboard=False)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.__dict__))
    shutil.copy(last_pt, run / "last.pt")
    return run


# command, argv builder (checkpoint, out) -> argv
COMMANDS = {
    "evaluate": lambda f, ckpt, out: ["evaluate", "--weights", str(ckpt), "--data", str(f["data"]),
                                      "--device", "cpu", "--no-hd95", "--out", str(out)],
    "predict": lambda f, ckpt, out: ["predict", str(f["image"]), "--weights", str(ckpt), "--device", "cpu",
                                     "--out", str(out), "--quiet"],
    "export": lambda f, ckpt, out: ["export", "--weights", str(ckpt), "--out", str(out), "--no-check"],
    "weights": lambda f, ckpt, out: ["weights", "pack", "--checkpoint", str(ckpt), "--data", str(f["data"]),
                                     "--out", str(out.with_suffix(".safetensors"))],
}


@pytest.mark.parametrize("command", [*COMMANDS, "train"])
def test_pickle_payload_is_refused_by_every_command(files, tmp_path, capsys, command):
    if command == "train":
        run = _resume_dir(files, tmp_path, files["evil"])
        before = sorted(p.name for p in run.iterdir())
        argv = ["train", "--resume", str(run)]
    else:
        out = tmp_path / "out"
        argv = COMMANDS[command](files, files["evil"], out)
    assert main(argv) == 2
    err = one_error_line(capsys, command)
    name = "last.pt" if command == "train" else "evil.pt"
    assert f"{name}: refusing to load: not a plain scsonet checkpoint (it asks to run code: GLOBAL " in err
    assert not files["marker"].exists()
    if command == "train":
        assert sorted(p.name for p in run.iterdir()) == before  # no log, no checkpoint, config untouched
    else:
        assert [p.name for p in tmp_path.iterdir()] == []  # nothing written, not even a folder


def test_good_checkpoint_passes_the_same_commands(files, tmp_path, capsys):
    """The refusal above is about the payload: the same commands accept a plain checkpoint
    (export too, in tests/test_export.py)."""
    for command in ("evaluate", "predict"):
        out = tmp_path / command / "out"
        assert main(COMMANDS[command](files, files["good"], out)) == 0, capsys.readouterr().err
        assert out.exists()


def _truncated(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def test_truncated_checkpoint_and_resume_from_it(files, tmp_path, capsys):
    bad = _truncated(files["good"], tmp_path / "half.pt")
    with pytest.raises(ScsonetError, match=r"half.pt: not a readable PyTorch checkpoint, truncated or corrupt"):
        load_model(bad)
    run = _resume_dir(files, tmp_path, bad)
    assert main(["train", "--resume", str(run)]) == 2
    assert "last.pt: not a readable PyTorch checkpoint, truncated or corrupt" in one_error_line(capsys, "train")


def test_resume_from_a_checkpoint_without_optimizer_state(files, tmp_path, capsys):
    run = _resume_dir(files, tmp_path, files["good"])  # a weights-only checkpoint is not a run's last.pt
    assert main(["train", "--resume", str(run)]) == 2
    assert "last.pt: not a scsonet checkpoint (it lacks optimizer, history)" in one_error_line(capsys, "train")


def test_resume_from_another_models_last_pt(files, tmp_path, capsys):
    torch.manual_seed(0)
    other = {**files["state"], "model": create_model("egeunet").state_dict(), "optimizer": {"state": {}, "param_groups": []},
             "history": []}
    torch.save(other, tmp_path / "other.pt")
    run = _resume_dir(files, tmp_path, tmp_path / "other.pt")
    assert main(["train", "--resume", str(run)]) == 2
    assert "last.pt: the weights do not fit scsonet" in one_error_line(capsys, "train")


def _checkpoint_with(files, tmp_path, **changes) -> pathlib.Path:
    ckpt = {**files["state"], **changes}
    path = tmp_path / "changed.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"preprocessing": {"resize_size": [16, 16], "std": [0.2] * 3}}, "preprocessing lacks mean"),
    ({"preprocessing": {**PREPROCESSING, "std": [0, 0, 0]}}, r"preprocessing std=\[0, 0, 0\]: expected 3 finite"),
    ({"preprocessing": {**PREPROCESSING, "mean": [0.5, float("nan"), 0.5]}}, "preprocessing mean=.*nan"),
    ({"preprocessing": {**PREPROCESSING, "resize_size": [60000, 60000]}}, r"resize_size=\[60000, 60000\]: expected two"),
    ({"preprocessing": {**PREPROCESSING, "resize_size": "big"}}, "resize_size='big'"),
    ({"preprocessing": {**PREPROCESSING, "threshold": 1.5}}, "threshold=1.5: expected a number strictly between"),
    ({"preprocessing": [1, 2, 3]}, "preprocessing=.*expected a mapping"),
    ({"model_name": "resnet50"}, "model_name='resnet50': expected a registered model"),
    ({"model_args": {"foo": 1}}, r"model_args=\{'foo': 1\}: scsonet does not take argument 'foo'"),
    ({"model_args": {"embed_dims": 5}}, "model_args=.*scsonet cannot be built with them"),
    ({"model": {"encoder.0.block.weight": torch.zeros(1)}}, "the weights do not fit scsonet"),
    ({"model": [1, 2]}, "the weights are not a mapping"),
    ({"epoch": "seven"}, "epoch='seven': expected an integer"),
])
def test_bad_values_in_a_checkpoint(files, tmp_path, capsys, changes, message):
    path = _checkpoint_with(files, tmp_path, **changes)
    with pytest.raises(ScsonetError, match=message):
        load_model(path)
    assert main(COMMANDS["predict"](files, path, tmp_path / "out")) == 2
    one_error_line(capsys, "predict")
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_refused(files, tmp_path):
    state = dict(files["state"]["model"])
    state["segmentation_head.weight"] = torch.full_like(state["segmentation_head.weight"], float("nan"))
    with pytest.raises(ScsonetError, match="NaN or infinite values .segmentation_head.weight"):
        load_model(_checkpoint_with(files, tmp_path, model=state))


@pytest.mark.parametrize("content, message", [
    (b"hello, I am a text file\n", "not a readable PyTorch checkpoint"),
    (b"", "not a readable PyTorch checkpoint"),
])
def test_foreign_files_named_pt(tmp_path, content, message):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ScsonetError, match=message):
        read_checkpoint(tmp_path / "x.pt")


def test_non_dict_checkpoint(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ScsonetError, match="list.pt: not a scsonet checkpoint .it holds a list"):
        read_checkpoint(tmp_path / "list.pt")


# -- safetensors with its card


@pytest.fixture()
def packed(files, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(files["state"]["model"], str(path))
    card = {"arch": "scsonet", "model_args": {}, "preprocessing": PREPROCESSING, "threshold": 0.5}
    path.with_suffix(".json").write_text(json.dumps(card))
    assert load_model(path).preset.resize_size == (SIZE, SIZE)  # the good pair loads
    return path, card


def test_truncated_safetensors(packed):
    path, _ = packed
    _truncated(path, path)
    with pytest.raises(ScsonetError, match="w.safetensors: not a readable safetensors file, truncated or corrupt"):
        load_model(path)


def test_mislabelled_safetensors(packed, files, capsys, tmp_path):
    path, _ = packed
    path.write_text("just some text, renamed\n" * 20)
    assert main(COMMANDS["evaluate"](files, path, tmp_path / "eval")) == 2
    assert "w.safetensors: not a readable safetensors file" in one_error_line(capsys, "evaluate")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("card_text, message", [
    ('{"arch": "scsonet", "preprocessing": ', "the model card is not valid JSON"),
    ('[1, 2]', "the model card is not a JSON object"),
    ('{"arch": "scsonet"}', "the model card lacks preprocessing"),
    (json.dumps({"arch": "scsonet", "preprocessing": {**PREPROCESSING, "std": [0, 0, 0]}}), r"std=\[0, 0, 0\]"),
    (json.dumps({"arch": "nonet", "preprocessing": PREPROCESSING}), "arch='nonet': expected a registered model"),
    (json.dumps({"arch": "scsonet", "preprocessing": PREPROCESSING, "threshold": 0}), "threshold=0: expected"),
])
def test_broken_model_cards(packed, card_text, message):
    path, _ = packed
    path.with_suffix(".json").write_text(card_text)
    with pytest.raises(ScsonetError, match=message):
        load_model(path)


# -- ONNX metadata


def tiny_onnx(path: pathlib.Path, **metadata) -> pathlib.Path:
    """An identity graph with scsonet's metadata keys (values as JSON text), overridable."""
    io = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", 3, "height", "width"])
          for n in ("image", "logits")]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["image"], ["logits"])], "tiny", io[:1], io[1:])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    props = {"resize_size": "[16, 16]", "mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "threshold": "0.5",
             **metadata}
    onnx.helper.set_model_props(model, props)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("metadata, message", [
    ({"resize_size": "[60000, 60000]"}, r"resize_size=\[60000, 60000\]: expected two integers in 8..4096"),
    ({"std": "[0, 0, 0]"}, r"std=\[0, 0, 0\]: expected 3 finite numbers"),
    ({"mean": "[0.5, 0.5]"}, r"mean=\[0.5, 0.5\]"),
    ({"threshold": "NaN"}, "threshold=nan"),
    ({"resize_size": "[16,"}, "malformed scsonet metadata in the ONNX model .resize_size="),
])
def test_onnx_metadata_is_checked_before_any_session_is_sized(tmp_path, monkeypatch, metadata, message):
    path = tiny_onnx(tmp_path / "m.onnx", **metadata)

    def no_session(*args, **kwargs):
        raise AssertionError("a session was sized from unchecked metadata")

    monkeypatch.setattr(onnx_runtime, "make_session", no_session)
    with pytest.raises(ScsonetError, match=message):
        OrtSegmenter(path)


def test_onnx_cli_predict_with_huge_resize(files, tmp_path, capsys):
    path = tiny_onnx(tmp_path / "huge.onnx", resize_size="[60000, 60000]")
    assert main(["predict", str(files["image"]), "--weights", str(path), "--backend", "onnxruntime",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "huge.onnx: preprocessing resize_size=[60000, 60000]" in one_error_line(capsys, "predict")
    assert not (tmp_path / "out").exists()
    good = tiny_onnx(tmp_path / "ok.onnx")  # the same graph with sane metadata runs
    assert OrtSegmenter(good).segment(files["image"]).shape == (20, 24)


# -- data prepare


def test_prepare_refuses_absurd_sizes(files, tmp_path, capsys):
    for size in ("1000000", "4x16", "0", "16x16x16"):
        out = tmp_path / "prep"
        assert main(["data", "prepare", "--dataset", "folder", "--src", str(files["root"] / "raw"),
                     "--out", str(out), "--size", size, "--no-progress", "--workers", "1"]) == 2
        assert f"size '{size}': expected N or HxW with sides in 8..2048" in one_error_line(capsys, "data")
        assert not out.exists()


@pytest.mark.parametrize("tolerance", ["nan", "-1", "0"])
def test_export_tolerance_is_checked(files, tmp_path, capsys, tolerance):
    assert main(["export", "--weights", str(files["good"]), "--out", str(tmp_path / "m.onnx"),
                 "--tolerance", tolerance]) == 2
    assert f"--tolerance {float(tolerance)}: expected a finite number > 0" in one_error_line(capsys, "export")
    assert list(tmp_path.iterdir()) == []
