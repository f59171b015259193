"""Two-pass prediction and the reliability score in `scsonet predict`, `segment_image()` and the
ONNX export: result fields, settings, the overlay's REVIEW banner, the embedded reliability model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import scsonet.cli.predict as cli_predict
from _synthdata import random_scsonet_checkpoint
from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.export import export_onnx, model_metadata
from scsonet.inference import JOURNAL_NAME, RESULT_FIELDS, Segmentation, predict_files, segment, segment_image
from scsonet.models import load_model
from scsonet.onnx_runtime import OrtSegmenter, read_metadata, reliability_from_metadata
from scsonet.postprocess import REVIEW_COLOR
from scsonet.reliability import ReliabilityModel, default_model_path

# Reviews large lesions only: reliability = sigmoid(5 - 50 * lesion_share), review below 0.5, so a
# lesion over 10 % of the image is reviewed and a small one is not.
BIG_IS_SUSPECT = ReliabilityModel(["lesion_share"], [0.0], [1.0], [-50.0], 5.0, 0.5,
                                  {"weights": "test", "split": "val", "two_pass": True})


class DarkSegmenter:
    """A stand-in backend that sees the image: lesion probability 0.95 on dark pixels, 0.05 elsewhere."""

    input_size = (64, 64)

    def __init__(self, reliability=None):
        self.reliability, self.seen = reliability, 0

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        self.seen += len(images)
        return np.where(images.mean(axis=-1) < 100, 0.95, 0.05).astype(np.float32)


def photo(height: int = 480, width: int = 640, radius: float = 24, centre=(120, 470)) -> np.ndarray:
    """Grey skin (no amber anywhere) with one dark disk: a small lesion far from the centre."""
    yy, xx = np.mgrid[:height, :width]
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    return np.where(disk[..., None], 40, 170).astype(np.uint8).repeat(3, axis=-1)


def save(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def amber_pixels(path: Path) -> int:
    return int((np.asarray(Image.open(path).convert("RGB")) == REVIEW_COLOR).all(axis=-1).sum())


def test_two_pass_runs_for_a_small_lesion_in_a_big_frame(tmp_path):
    small = save(tmp_path / "small.png", photo())
    filled = save(tmp_path / "filled.png", photo(radius=400, centre=(240, 320)))  # dark everywhere
    seg = DarkSegmenter()
    rows = predict_files([small, filled], seg, tmp_path / "on", progress=False, two_pass=True)
    assert [r["two_pass"] for r in rows] == [True, False]
    assert seg.seen >= 3, "pass 2 ran on a crop of the small lesion only"
    off = predict_files([small], DarkSegmenter(), tmp_path / "off", progress=False)
    assert off[0]["two_pass"] is False
    # the crop's pass 2 sees the disk at 4x the resolution of pass 1: a closer outline
    truth = photo()[..., 0] < 100
    wrong = {out: int(((np.asarray(Image.open(tmp_path / out / "small_mask.png")) > 0) != truth).sum())
             for out in ("on", "off")}
    assert wrong["on"] < wrong["off"], wrong


def test_reliability_and_review_fields_typed_in_rows_json_and_csv(tmp_path):
    small = save(tmp_path / "small.png", photo())
    big = save(tmp_path / "big.png", photo(radius=150, centre=(240, 320)))
    out = tmp_path / "out"
    rows = predict_files([small, big], DarkSegmenter(), out, progress=False, two_pass=True,
                         reliability=BIG_IS_SUSPECT)
    assert [r["review"] for r in rows] == [False, True]
    for row in rows:
        assert isinstance(row["reliability"], float) and 0.0 <= row["reliability"] <= 1.0
        assert row["reliability"] == round(row["reliability"], 3) and isinstance(row["two_pass"], bool)
    saved = json.loads((out / "results.json").read_text())
    assert saved["images"] == rows and set(RESULT_FIELDS) <= set(rows[0])
    assert saved["settings"]["reliability"] == "fitted for test on val, two-pass"
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["two_pass"], r["review"]) for r in table] == [("True", "False"), ("False", "True")]
    assert float(table[1]["reliability"]) == rows[1]["reliability"]
    # without a reliability model the fields are there, empty
    bare = predict_files([small], DarkSegmenter(), tmp_path / "bare", progress=False)
    assert bare[0]["reliability"] is None and bare[0]["review"] is None


def test_overlay_has_the_amber_banner_only_when_review(tmp_path):
    paths = [save(tmp_path / "small.png", photo()), save(tmp_path / "big.png", photo(radius=150, centre=(240, 320))),
             save(tmp_path / "none.png", np.full((200, 300, 3), 170, np.uint8))]
    out = tmp_path / "out"
    rows = predict_files(paths, DarkSegmenter(), out, progress=False, reliability=BIG_IS_SUSPECT)
    assert [r["review"] for r in rows] == [False, True, False]
    assert amber_pixels(out / "small_overlay.png") == 0 and amber_pixels(out / "none_overlay.png") == 0
    big = np.asarray(Image.open(out / "big_overlay.png").convert("RGB"))
    banner = (big == REVIEW_COLOR).all(axis=-1)
    assert banner[-1].mean() > 0.5, "a banner along the bottom edge"
    assert not banner[: big.shape[0] // 2].any()


def test_cli_two_pass_is_a_setting_that_continue_tells_apart(tmp_path, monkeypatch, capsys):
    image = save(tmp_path / "in" / "small.png", photo())
    seg = DarkSegmenter(BIG_IS_SUSPECT)
    monkeypatch.setattr(cli_predict, "_torch_segmenter", lambda args: (seg, "stub"))
    out = tmp_path / "out"
    assert main(["predict", str(image), "--out", str(out), "--quiet"]) == 0
    on = json.loads((out / "results.json").read_text())
    assert on["settings"]["two_pass"] is True and on["images"][0]["two_pass"] is True
    assert "0 to review" in capsys.readouterr().out
    assert main(["predict", str(image), "--out", str(out), "--quiet", "--continue", "--no-two-pass"]) == 0
    off = json.loads((out / "results.json").read_text())
    assert "two_pass" not in off["settings"] and off["images"][0]["two_pass"] is False
    assert "not calibrated" in off["settings"]["reliability"]
    assert "with other settings" in capsys.readouterr().out
    seen = seg.seen
    assert main(["predict", str(image), "--out", str(out), "--quiet", "--continue", "--no-two-pass"]) == 0
    assert seg.seen == seen, "the same settings: nothing redone"


def test_journal_rows_from_before_two_pass_stay_valid(tmp_path):
    image = save(tmp_path / "small.png", photo())
    out = tmp_path / "out"
    out.mkdir()
    old = {"file": str(tmp_path / "old.png"), "status": "ok", "error": "", "width": 4, "height": 4,
           "lesion_found": False, "lesion_area_px": 0, "lesion_fraction": 0.0, "bbox": None,
           "mean_confidence": None, "settings": {"backend": "stub", "threshold": 0.5}}
    (out / JOURNAL_NAME).write_text(json.dumps(old) + "\n")
    predict_files([image], DarkSegmenter(), out, progress=False, settings={"backend": "stub"})
    images = json.loads((out / "results.json").read_text())["images"]
    assert [Path(r["file"]).name for r in images] == ["small.png", "old.png"]
    assert images[1]["reliability"] is None and images[1]["two_pass"] is None


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init SCSONet checkpoint with a reliability model beside it (``X.reliability.json``)."""
    path = random_scsonet_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")
    BIG_IS_SUSPECT.save(default_model_path(path))
    return path


def test_segment_image_gives_mask_probabilities_and_reliability(checkpoint):
    rgb = photo(300, 400, radius=20, centre=(80, 300))
    result = segment_image(rgb, weights=checkpoint, device="cpu")
    assert isinstance(result, Segmentation)
    assert result.mask.dtype == bool and result.mask.shape == (300, 400)
    assert result.probabilities.dtype == np.float32 and result.probabilities.shape == (300, 400)
    np.testing.assert_array_equal(result.mask, result.probabilities >= 0.5)
    assert isinstance(result.reliability, float) and isinstance(result.review, bool)
    assert result.two_pass == result.info.second_pass
    np.testing.assert_array_equal(segment(rgb, weights=checkpoint, device="cpu"), result.mask)
    one = segment_image(rgb, weights=checkpoint, device="cpu", two_pass=False)
    assert one.info is None and one.two_pass is False and isinstance(one.reliability, float)


@pytest.mark.slow  # a subprocess or an export: seconds
def test_onnx_export_embeds_the_reliability_model_and_checks_it(checkpoint, tmp_path):
    path = tmp_path / "model.onnx"
    export_onnx(load_model(checkpoint), path, check=False)
    assert ReliabilityModel.from_dict(json.loads(read_metadata(path)["reliability"])) == BIG_IS_SUSPECT
    assert OrtSegmenter(path).reliability == BIG_IS_SUSPECT
    # predict over ONNX Runtime finds it: the rows carry the score
    out = tmp_path / "out"
    image = save(tmp_path / "in.png", photo(300, 400))
    assert main(["predict", str(image), "--backend", "onnxruntime", "--weights", str(path),
                 "--out", str(out), "--quiet"]) == 0
    row = json.loads((out / "results.json").read_text())["images"][0]
    assert isinstance(row["reliability"], float) and isinstance(row["review"], bool)
    # a damaged embedded model is a one-line error naming the file
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "reliability":
            prop.value = json.dumps({**json.loads(prop.value), "std": [0.0]})
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    with pytest.raises(ScsonetError, match=r"'std' must be positive \(.*bad.onnx: ONNX metadata"):
        OrtSegmenter(tmp_path / "bad.onnx")


def test_weights_without_a_reliability_model_export_no_key(tmp_path):
    path = random_scsonet_checkpoint(tmp_path / "plain.pt")
    assert "reliability" not in model_metadata(load_model(path))
    assert reliability_from_metadata({}, "plain.onnx") is None
    with pytest.raises(ScsonetError, match="malformed reliability model in the ONNX metadata"):
        reliability_from_metadata({"reliability": "{not json"}, "x.onnx")
