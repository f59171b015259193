"""Reliability score (scsonet.reliability): features, logistic fit, AUROC, the coefficient JSON."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import scsonet
from scsonet.errors import ScsonetError
from scsonet.reliability import (FEATURES, ReliabilityModel, auroc, choose_review_threshold, default_model_path,
                                 fit_logistic, reliability_features)
from scsonet.twopass import TwoPassInfo, two_pass_batch


def disk(size=256, cy=128, cx=128, r=40, inside=0.95, outside=0.02):
    yy, xx = np.mgrid[:size, :size]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r**2, inside, outside).astype(np.float32)


def test_features_of_a_centred_disk():
    f = reliability_features(disk(r=40))
    assert set(f) == set(FEATURES)
    assert f["border_touch"] == 0 and f["empty"] == 0
    assert f["lesion_share"] == pytest.approx(np.pi * 40**2 / 256**2, rel=0.02)
    assert f["lesion_share_sq"] == pytest.approx(f["lesion_share"] ** 2)
    assert f["log_components"] == pytest.approx(np.log(2)) and f["largest_share"] == 1.0
    assert f["margin"] > 0.9  # sure everywhere
    assert f["pass_disagreement"] == 0 and f["flip_disagreement"] == 0


def test_features_of_border_touching_split_unsure_masks():
    p = np.full((128, 128), 0.02, dtype=np.float32)
    p[:, :32] = 0.95  # a band along the left border: 1/4 of the image
    p[60:70, 100:110] = 0.6  # and a small unsure blob
    f = reliability_features(p)  # resized to 256 x 256 first
    border_px = 4 * 256 - 4
    assert f["border_touch"] == pytest.approx((2 * 64 + 254) / border_px, abs=0.01)
    assert f["log_components"] == pytest.approx(np.log(3))
    assert 0.9 < f["largest_share"] < 0.99
    assert f["margin"] < reliability_features(disk())["margin"]
    empty = reliability_features(np.zeros((50, 50), dtype=np.float32))
    assert empty["empty"] == 1 and empty["lesion_share"] == 0 and empty["largest_share"] == 0


def test_pass_and_flip_disagreement():
    info = TwoPassInfo(True, "ran", [0, 0, 10, 10], 0.1, agreement=0.8)
    assert reliability_features(disk(), info)["pass_disagreement"] == pytest.approx(0.2)
    shifted = disk(cx=148)  # the same disk 20 px off
    f = reliability_features(disk(), flip_probs=[disk(), shifted])
    overlap = (disk() >= 0.5) & (shifted >= 0.5)
    expected = (1 - 2 * overlap.sum() / (2 * (disk() >= 0.5).sum())) / 2
    assert f["flip_disagreement"] == pytest.approx(expected, abs=0.01)


class SoftSegmenter:
    """Stand-in backend: a smooth probability of darkness (so the margin depends on interpolation)."""

    input_size = (64, 64)

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp((images.mean(axis=-1) - 128.0) / 30.0))).astype(np.float32)


@pytest.mark.parametrize("outside", ["zero", "pass1"])
def test_features_from_two_pass_maps_match_the_full_size_map(outside):
    yy, xx = np.mgrid[:900, :1300]
    images = []
    for cy, cx, r in ((300, 850, 45), (450, 650, 380)):  # pass 2 runs on the first; the second fills the frame
        dark = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r**2))
        images.append(np.repeat((230 - 200 * dark).astype(np.uint8)[..., None], 3, axis=-1))
    results = two_pass_batch(images, SoftSegmenter(), outside=outside)
    assert [info.second_pass for _, info in results] == [True, False]
    for probs, info in results:
        from_full = reliability_features(probs, dataclasses.replace(info, pass1_small=None))
        from_small = reliability_features(probs, info)
        # the full-size map is enlarged in 8 bits (1/255 steps), the small maps' route is float: a
        # few pixels at the threshold flip (here 2 of the feature map's 1,020 border pixels)
        assert from_small == pytest.approx(from_full, abs=0.01)
        assert 0.05 < from_small["margin"] < 0.95 and from_small["lesion_share"] > 0


def test_logistic_fit_recovers_a_separable_toy_problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] - 2 * x[:, 1] > 0.3).astype(int)
    coef, intercept = fit_logistic(x, y, l2=1e-3)
    assert np.all(np.isfinite(coef))
    direction = coef / np.linalg.norm(coef)
    np.testing.assert_allclose(direction, np.array([1, -2]) / np.sqrt(5), atol=0.05)
    assert -intercept / np.linalg.norm(coef) == pytest.approx(0.3 / np.sqrt(5), abs=0.1)
    predicted = (x @ coef + intercept > 0).astype(int)
    assert (predicted == y).mean() > 0.98


def test_logistic_fit_matches_known_probabilities():
    # one feature, no penalty: the fit must reproduce the empirical rates at two points
    x = np.array([[0.0]] * 10 + [[1.0]] * 10)
    y = np.array([1] * 2 + [0] * 8 + [1] * 8 + [0] * 2)
    coef, intercept = fit_logistic(x, y, l2=0.0)
    assert 1 / (1 + np.exp(-intercept)) == pytest.approx(0.2, abs=1e-6)
    assert 1 / (1 + np.exp(-(coef[0] + intercept))) == pytest.approx(0.8, abs=1e-6)


def test_auroc():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # pairs (pos, neg): (0.4>0.3) (0.4<0.5) (0.6>0.3) (0.6>0.5) -> 3/4; a tie counts half
    assert auroc([0.3, 0.4, 0.5, 0.6], [0, 1, 0, 1]) == 0.75
    assert auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))


def test_review_threshold_catches_the_requested_share():
    scores = np.linspace(0, 1, 11)
    dices = np.array([0.1, 0.2, 0.9, 0.3, 0.9, 0.9, 0.4, 0.9, 0.9, 0.9, 0.9])
    t = choose_review_threshold(scores, dices, catch=0.75, bad=0.5)  # bad scores 0, .1, .3, .6
    assert 0.3 < t < 0.31
    assert ((scores < t) & (dices < 0.5)).sum() == 3
    assert choose_review_threshold(scores, np.ones(11)) == 0.5


def model_dict():
    rows = [reliability_features(disk(r=r)) for r in (10, 30, 60, 90, 120, 200)]
    model = ReliabilityModel.fit(rows, [0, 1, 1, 1, 1, 0], split="val")
    return model, rows


def test_model_round_trips_and_scores(tmp_path):
    model, rows = model_dict()
    path = tmp_path / "m.reliability.json"
    model.save(path)
    loaded = ReliabilityModel.load(path)
    np.testing.assert_allclose(loaded.score_many(rows), model.score_many(rows))
    assert loaded.meta == {"split": "val"}
    out = loaded.assess(rows[0])
    assert set(out) == {"reliability", "review"} and 0 <= out["reliability"] <= 1


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="other"), "not a reliability model"),
    (lambda d: d.update(features=d["features"][:-1]), "must be a list of"),
    (lambda d: d["features"].__setitem__(0, "colour"), "unknown features"),
    (lambda d: d["coef"].__setitem__(0, float("nan")), "finite numbers"),
    (lambda d: d["coef"].__setitem__(0, "1.0"), "finite numbers"),
    (lambda d: d["std"].__setitem__(0, 0.0), "positive"),
    (lambda d: d.update(review_threshold=1.5), "0..1"),
    (lambda d: d.pop("intercept"), "finite numbers"),
])
def test_model_json_validation(tmp_path, change, message):
    data = model_dict()[0].to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # json writes NaN as NaN, which Python reads back
    with pytest.raises(ScsonetError, match=message) as err:
        ReliabilityModel.load(path)
    assert str(path) in str(err.value)


def test_unreadable_model_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ScsonetError, match="cannot read"):
        ReliabilityModel.load(path)


def test_shipped_model_is_valid():
    weights = scsonet.__file__.replace("__init__.py", "weights/scsonet_isic2017_v1.safetensors")
    path = default_model_path(weights)
    assert path.name == "scsonet_isic2017_v1.reliability.json"
    if not path.exists():
        pytest.skip("no shipped reliability model yet")
    model = ReliabilityModel.load(path)
    assert model.meta["split"] == "val" and "command" in model.meta
