"""evaluate(): preprocessing from the weights, flip TTA, report and per-image CSV; the CLI end to end."""
from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from scsonet.errors import ScsonetError
from scsonet.evaluation import evaluate, format_report, predict_probs, write_report
from scsonet.models import LoadedModel
from scsonet.transforms import SegmentationPreset

PRESET = SegmentationPreset.from_stats((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32)


class RedIsLesion(nn.Module):
    """Logit +20 where the normalised red channel is positive: a perfect, flip-equivariant segmenter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * 20


class LeftIsLesion(nn.Module):
    """Logits that depend on the column only: flipping the input does not flip its output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = torch.linspace(-3, 3, x.shape[-1])
        return cols.expand(x.shape[0], 1, *x.shape[-2:]).clone()


def lesion_split(n: int = 5, size: int = 32, seed: int = 0) -> SimpleNamespace:
    """Images whose red channel is 255 exactly on the lesion; image 0 has no lesion."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 1, size, size), np.uint8)
    for i in range(1, n):
        y, x = rng.integers(2, size - 12, size=2)
        masks[i, 0, y:y + rng.integers(4, 10), x:x + rng.integers(4, 10)] = 1
    images = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
    images[:, 0] = masks[:, 0] * 255
    return SimpleNamespace(images=images, masks=masks, ids=[f"img{i}" for i in range(n)])


@pytest.mark.parametrize("tta", [False, True])
def test_perfect_model_scores_one(tta):
    split = lesion_split()
    report, rows = evaluate(RedIsLesion(), split, PRESET, batch_size=2, tta=tta, split="val")
    assert report["n_images"] == 5 and report["split"] == "val" and report["tta"] is tta
    assert all(v == pytest.approx(1.0) for v in report["pooled"].values())
    assert report["per_image"] == {"dice_mean": 1.0, "dice_std": 0.0, "iou_mean": 1.0, "iou_std": 0.0}
    assert report["hd95_pixels"] == {"mean": 0.0, "median": 0.0, "n": 5, "undefined": 0}
    assert [r["id"] for r in rows] == split.ids
    assert sum(r["tp"] for r in rows) == int(split.masks.sum())


def test_predict_probs_tta_flips_back_each_view():
    x = torch.randn(2, 3, 8, 12)
    plain = torch.sigmoid(LeftIsLesion()(x))
    # the flipped-back horizontal views mirror the column ramp; vertical flips change nothing
    expected = (2 * plain + 2 * plain.flip(-1)) / 4
    torch.testing.assert_close(predict_probs(LeftIsLesion(), x, tta=True), expected)
    torch.testing.assert_close(predict_probs(LeftIsLesion(), x), plain)


def test_model_input_uses_the_weights_preset_not_the_data():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x[:, :1]

    split = lesion_split(n=2)
    preset = SegmentationPreset.from_stats((0.2, 0.4, 0.6), (0.1, 0.2, 0.3), 32)
    evaluate(Spy(), split, preset, hd95=False)
    mean = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (torch.from_numpy(split.images).float() / 255 - mean) / std)


def test_preset_resize_scores_at_mask_resolution():
    split = lesion_split(n=3, size=40)
    report, _ = evaluate(RedIsLesion(), split, SegmentationPreset.from_stats(PRESET.mean, PRESET.std, 64))
    assert report["resolution"] == [40, 40]
    assert report["pooled"]["dsc"] > 0.9


def test_loaded_model_fills_source_and_protocol_and_warns_on_paper_test():
    loaded = LoadedModel(RedIsLesion(), PRESET, "red", "runs/x/best.pt", {"epoch": 7, "config": {"protocol": "paper"}})
    report, _ = evaluate(loaded, lesion_split(n=2), split="test", hd95=False)
    assert (report["weights"], report["model"], report["protocol"], report["checkpoint_epoch"]) == ("runs/x/best.pt", "red", "paper", 7)
    assert "selected on this split" in report["note"]
    report, _ = evaluate(loaded, lesion_split(n=2), split="val", hd95=False)
    assert "trained on this split" in report["note"]
    assert report["hd95_pixels"] is None
    assert "note:" in format_report(report)


def test_write_report_is_strict_json_and_csv_with_empty_undefined_hd95(tmp_path):
    split = lesion_split(n=3)
    split.masks[1] = 0  # lesion predicted where none is: HD95 undefined for image 1
    report, rows = evaluate(RedIsLesion(), split, PRESET)
    assert report["hd95_pixels"]["undefined"] == 1 and math.isnan(rows[1]["hd95"])
    report_path, rows_path = write_report(report, rows, tmp_path / "out")
    parsed = json.loads(report_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert parsed["pooled"] == report["pooled"]
    with rows_path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == split.ids
    assert table[1]["hd95"] == "" and float(table[0]["hd95"]) == 0.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["per_image.csv", "report.json"]
    text = format_report(report)
    assert "HD95" in text and "1 undefined" in text and "100.00 %" in text


def test_empty_split_is_a_user_error():
    empty = SimpleNamespace(images=np.zeros((0, 3, 8, 8), np.uint8), masks=np.zeros((0, 1, 8, 8), np.uint8), ids=[])
    with pytest.raises(ScsonetError, match="no images"):
        evaluate(RedIsLesion(), empty, PRESET, split="test")


@pytest.fixture(scope="module")
def prepared_and_checkpoint(tmp_path_factory):
    """A prepared 'folder' dataset of 10 synthetic 32x32 pairs and a random-init SCSONet checkpoint."""
    from PIL import Image

    from scsonet.data import prepare_dataset
    from scsonet.models import create_model

    root = tmp_path_factory.mktemp("eval_cli")
    split = lesion_split(n=10, size=32, seed=1)
    for name, arrays in (("images", split.images.transpose(0, 2, 3, 1)), ("masks", split.masks[:, 0] * 255)):
        (root / "raw" / name).mkdir(parents=True)
        for image_id, array in zip(split.ids, arrays):
            Image.fromarray(array).save(root / "raw" / name / f"{image_id}.png")
    prepare_dataset("folder", root / "raw", root / "prepared", size=32, workers=1, progress=False)
    torch.manual_seed(0)
    model = create_model("scsonet")
    checkpoint = {"model": model.state_dict(), "model_name": "scsonet", "model_args": {}, "epoch": 3,
                  "preprocessing": {"resize_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
                  "config": {"protocol": "honest"}}
    (root / "run").mkdir()
    torch.save(checkpoint, root / "run" / "best.pt")
    return root / "prepared", root / "run" / "best.pt"


def test_cli_evaluates_a_checkpoint_end_to_end(prepared_and_checkpoint, capsys):
    from scsonet.cli.main import main

    data, weights = prepared_and_checkpoint
    n_test = json.loads((data / "manifest.json").read_text())["splits"]["test"]["count"]
    assert main(["evaluate", "--weights", str(weights), "--data", str(data), "--device", "cpu", "--tta"]) == 0
    printed = capsys.readouterr().out
    assert "IoU of the lesion, pooled" in printed and "specificity, pooled" in printed and "HD95" in printed
    out_dir = weights.parent / "eval-best-test-tta"  # the documented default: beside the weights
    report = json.loads((out_dir / "report.json").read_text())
    assert (report["split"], report["n_images"], report["tta"], report["protocol"], report["checkpoint_epoch"]) == \
        ("test", n_test, True, "honest", 3)
    assert report["weights"] == str(weights) and report["data"] == str(data) and "note" not in report
    assert set(report["pooled"]) == {"miou", "dsc", "accuracy", "sensitivity", "specificity"}
    assert all(0.0 <= v <= 1.0 for v in report["pooled"].values())
    assert len((out_dir / "per_image.csv").read_text().splitlines()) == n_test + 1


def test_cli_json_output_and_errors(prepared_and_checkpoint, tmp_path, capsys):
    from scsonet.cli.main import main

    data, weights = prepared_and_checkpoint
    args = ["evaluate", "--weights", str(weights), "--data", str(data), "--device", "cpu"]
    assert main([*args, "--split", "val", "--no-hd95", "--json", "--out", str(tmp_path / "o")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "o" / "report.json").read_text())
    assert printed["split"] == "val" and printed["hd95_pixels"] is None
    for bad, needle in (([*args, "--split", "nope"], "nope"), ([*args, "--threshold", "1.5"], "--threshold"),
                        (["evaluate", "--weights", str(tmp_path / "x.pt"), "--data", str(data)], "x.pt")):
        assert main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err


def test_resolve_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    from scsonet import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_device, "_mps_available", lambda: False)
    assert _device.resolve_device("auto") == torch.device("cpu")
    for name, needle in (("cuda", "CUDA is not available"), ("mps", "MPS"), ("gpu7", "not a device name"),
                         ("meta", "not supported")):
        with pytest.raises(ScsonetError, match=needle):
            _device.resolve_device(name)
    monkeypatch.setattr(_device, "_mps_available", lambda: True)
    assert _device.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device.resolve_device("auto") == torch.device("cuda")
