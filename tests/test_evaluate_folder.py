"""evaluate_folder() and `scsonet evaluate --images --masks`: the prepared route's figures on the same
pairs, pairing and bad inputs as `data prepare --dataset folder`, masks of another size."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.evaluation import evaluate, evaluate_folder, format_report, write_report
from scsonet.inference import assess, predict_batch
from scsonet.models import LoadedModel, create_model
from scsonet.reliability import ReliabilityModel
from scsonet.transforms import SegmentationPreset

SIZE = 32
PRESET = SegmentationPreset.from_stats((0.45, 0.5, 0.55), (0.2, 0.25, 0.3), SIZE)


class SmallNet(nn.Module):
    """A fixed random conv net: imperfect, image-dependent predictions (Dice well below 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 5, padding=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 4 + x[:, :1] * 2


def loaded() -> LoadedModel:
    return LoadedModel(SmallNet().eval(), PRESET, "smallnet", "smallnet.pt", {})


def make_pairs(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images (N, H, W, 3) with brighter red on a random blob lesion; masks (N, H, W) {0, 1}."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(3, 10)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    images = rng.integers(40, 160, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    images[..., 0] = np.where(masks > 0, 220, images[..., 0])
    return images, masks, [f"case{i:02d}" for i in range(n)]


def write_folder(root: Path, images: np.ndarray, masks: np.ndarray, ids: list[str],
                 mask_suffix: str = "_mask") -> tuple[Path, Path]:
    """PNG images and 0/255 masks, as a user would hand over a labelled folder."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for image, mask, image_id in zip(images, masks, ids):
        Image.fromarray(image).save(root / "images" / f"{image_id}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"{image_id}{mask_suffix}.png")
    return root / "images", root / "masks"


class Split:
    def __init__(self, images: np.ndarray, masks: np.ndarray, ids: list[str]):
        self.images = images.transpose(0, 3, 1, 2)
        self.masks = masks[:, None]
        self.ids = ids


def test_folder_gives_the_prepared_routes_figures(tmp_path):
    images, masks, ids = make_pairs()
    prepared, prepared_rows = evaluate(loaded(), Split(images, masks, ids), batch_size=4, split="test")
    folder, rows = evaluate_folder(loaded(), *write_folder(tmp_path, images, masks, ids), batch_size=4,
                                   two_pass=False)
    assert 0.2 < prepared["pooled"]["dsc"] < 0.95  # a test that could fail: not a perfect model
    for key in ("pooled", "per_image", "hd95_pixels"):
        assert folder[key] == pytest.approx(prepared[key], abs=1e-9), key
    assert [{k: r[k] for k in prepared_rows[0]} for r in rows] == prepared_rows  # same ids, order and counts
    assert all(r["two_pass"] is False and r["reliability"] is None for r in rows)
    assert (folder["two_pass"], folder["second_passes"], folder["reliability"]) == (False, 0, None)
    assert (folder["n_images"], folder["resolution"], folder["skipped"], folder["warnings"]) == (7, [SIZE, SIZE], [], [])
    assert folder["preprocessing"] == PRESET.to_dict() and folder["weights"] == "smallnet.pt"


def test_mask_of_another_size_is_scored_at_its_own_size_with_a_note(tmp_path):
    images, masks, ids = make_pairs(n=3)
    image_dir, mask_dir = write_folder(tmp_path, images, masks, ids)
    big = np.kron(masks[1], np.ones((2, 2), np.uint8)) * 255  # the same outline at twice the side
    Image.fromarray(big).save(mask_dir / "case01_mask.png")
    report, rows = evaluate_folder(loaded(), image_dir, mask_dir, hd95=False)
    assert report["resolution"] is None  # masks differ in size
    assert len(report["notes"]) == 1 and "case01" in report["notes"][0] and "mask's size" in report["notes"][0]
    assert rows[1]["tp"] + rows[1]["fp"] + rows[1]["fn"] + rows[1]["tn"] == (2 * SIZE) ** 2
    assert rows[0]["tp"] + rows[0]["fp"] + rows[0]["fn"] + rows[0]["tn"] == SIZE ** 2
    at_image_size = evaluate(loaded(), Split(images[1:2], masks[1:2], ids[1:2]), hd95=False)[1][0]["dice"]
    assert rows[1]["dice"] == pytest.approx(at_image_size, abs=0.05)  # the stretched map still fits its mask


class RedSegmenter:
    """A backend that sees the image: lesion where red is bright (soft at the edges), as a model
    that finds small lesions; with a reliability model that reviews lesions over 10 % of the image."""

    input_size = (SIZE, SIZE)
    reliability = ReliabilityModel(["lesion_share"], [0.0], [1.0], [-50.0], 5.0, 0.5,
                                   {"weights": "red", "split": "val", "two_pass": True})

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        return np.clip((images[..., 0].astype(np.float32) - 150) / 100, 0, 1)


def test_folder_runs_scsonet_predicts_two_pass_path_by_default(tmp_path):
    images, masks, ids = make_pairs()
    image_dir, mask_dir = write_folder(tmp_path, images, masks, ids)
    report, rows = evaluate_folder(RedSegmenter(), image_dir, mask_dir, batch_size=3, hd95=False)
    expected = predict_batch(list(images), RedSegmenter(), 0.5, True)  # scsonet predict's function
    assert report["two_pass"] is True and report["second_passes"] == sum(i.second_pass for _, i in expected) > 0
    for row, mask, (probs, info) in zip(rows, masks, expected):
        pred = probs >= 0.5
        assert (row["tp"], row["fp"]) == (int((pred & (mask > 0)).sum()), int((pred & (mask == 0)).sum()))
        assert row["two_pass"] is info.second_pass
        assert (row["reliability"], row["review"]) == tuple(assess(RedSegmenter.reliability, probs, info, 0.5).values())
    assert report["reviews"] == sum(r["review"] for r in rows) > 0 and "fitted for red on val" in report["reliability"]
    assert "two-pass on" in format_report(report) and "flagged for review" in format_report(report)
    one_pass, one_rows = evaluate_folder(RedSegmenter(), image_dir, mask_dir, hd95=False, two_pass=False)
    assert one_pass["second_passes"] == 0 and "this run is one-pass" in one_pass["reliability"]
    _, rows_path = write_report(report, rows, tmp_path / "out")
    with open(rows_path) as f:
        written = list(csv.DictReader(f))
    assert list(written[0])[-3:] == ["two_pass", "reliability", "review"]
    assert [(w["two_pass"], w["review"]) for w in written] == [(str(r["two_pass"]), str(r["review"])) for r in rows]
    # reliability as predict's results.csv writes it (3 decimals), not padded to the Dice columns' 6
    assert [w["reliability"] for w in written] == [str(r["reliability"]) for r in rows]


def _bad_mask() -> np.ndarray:
    return np.tile(np.arange(SIZE, dtype=np.uint8) * 8, (SIZE, 1))  # a soft ramp, not binary


BAD = {
    # case: (change to the folder, file the error must name, pairs scored with skip_bad)
    "image without mask": (lambda i, m: Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(i / "lonely.png"),
                           "lonely.png", 5),
    "mask without image": (lambda i, m: Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(m / "orphan_mask.png"),
                           "orphan_mask.png", 5),
    "non-binary mask": (lambda i, m: Image.fromarray(_bad_mask()).save(m / "case02_mask.png"), "case02_mask.png", 4),
    "unreadable image": (lambda i, m: (i / "case03.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "case03.png", 4),
    "non-image file": (lambda i, m: (i / "notes.txt").write_text("hello"), "notes.txt", 5),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_are_named_as_data_prepare_names_them(tmp_path, case):
    change, named, left = BAD[case]
    image_dir, mask_dir = write_folder(tmp_path, *make_pairs(n=5))
    change(image_dir, mask_dir)
    with pytest.raises(ScsonetError, match=named.replace(".", r"\.")) as err:
        evaluate_folder(loaded(), image_dir, mask_dir, hd95=False)
    assert "\n" not in str(err.value) and "--skip-bad" in str(err.value)
    report, rows = evaluate_folder(loaded(), image_dir, mask_dir, hd95=False, skip_bad=True)
    assert report["n_images"] == len(rows) == left
    assert any(named in s["file"] for s in report["skipped"])


def test_empty_mask_is_a_warning_and_missing_folders_are_errors(tmp_path):
    images, masks, ids = make_pairs(n=3)
    masks[2] = 0
    image_dir, mask_dir = write_folder(tmp_path, images, masks, ids)
    report, _ = evaluate_folder(loaded(), image_dir, mask_dir, hd95=False)
    assert len(report["warnings"]) == 1 and "no foreground" in report["warnings"][0]
    with pytest.raises(ScsonetError, match="mask folder not found"):
        evaluate_folder(loaded(), image_dir, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScsonetError, match="no image files"):
        evaluate_folder(loaded(), tmp_path / "empty", mask_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("scsonet")
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": model.state_dict(), "model_name": "scsonet", "model_args": {}, "epoch": 1,
                "preprocessing": {"resize_size": [SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3},
                "config": {"protocol": "honest"}}, path)
    return path


def test_cli_folder_matches_cli_prepared_split(tmp_path, checkpoint, capsys):
    """The acceptance route in small: prepare a folder, export its test split as PNGs, score both."""
    from scsonet.data import PreparedData, prepare_dataset

    write_folder(tmp_path / "raw", *make_pairs(n=12, seed=3), mask_suffix="")
    prepare_dataset("folder", tmp_path / "raw", tmp_path / "prepared", size=SIZE, test_ratio=0.5, workers=1,
                    progress=False)
    test = PreparedData(tmp_path / "prepared").load("test")
    write_folder(tmp_path / "export", test.images.permute(0, 2, 3, 1).numpy(), test.masks[:, 0].numpy(), test.ids)
    common = ["evaluate", "--weights", str(checkpoint), "--device", "cpu", "--json"]
    assert main([*common, "--data", str(tmp_path / "prepared"), "--out", str(tmp_path / "a")]) == 0
    folder = ["--images", str(tmp_path / "export" / "images"), "--masks", str(tmp_path / "export" / "masks")]
    assert main([*common, *folder, "--out", str(tmp_path / "b"), "--no-two-pass"]) == 0
    printed = capsys.readouterr().out
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    assert b["pooled"] == pytest.approx(a["pooled"], abs=1e-4) and b["per_image"] == pytest.approx(a["per_image"], abs=1e-4)
    assert b["images"] == str(tmp_path / "export" / "images") and b["n_images"] == len(test.ids)
    with open(tmp_path / "b" / "per_image.csv") as f:
        assert [r["id"] for r in csv.DictReader(f)] == test.ids
    assert '"masks"' in printed and b["two_pass"] is False
    assert main([*common, *folder, "--out", str(tmp_path / "c")]) == 0  # the default: two-pass, as predict
    c = json.loads((tmp_path / "c" / "report.json").read_text())
    assert c["two_pass"] is True and c["n_images"] == len(test.ids)
    with open(tmp_path / "c" / "per_image.csv") as f:
        assert {"two_pass", "reliability", "review"} <= set(next(csv.DictReader(f)))


@pytest.mark.parametrize("extra, needle", [
    (["--images", "x"], "--images and --masks go together"),
    ([], "--data"),
    (["--images", "{tmp}/nope", "--masks", "{tmp}"], "nope: image folder not found"),
    (["--data", "{tmp}", "--skip-bad"], "--skip-bad goes with --images"),
    (["--data", "{tmp}", "--no-two-pass"], "--no-two-pass goes with --images"),
])
def test_cli_folder_errors_are_one_line(tmp_path, checkpoint, capsys, extra, needle):
    extra = [e.format(tmp=tmp_path) for e in extra]
    assert main(["evaluate", "--weights", str(checkpoint), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
