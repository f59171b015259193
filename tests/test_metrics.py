"""Metrics against scikit-learn (confusion counts, pooled and per-image scores) and a brute-force HD95."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, jaccard_score, recall_score

from scsonet.metrics import (ConfusionStats, MetricAccumulator, get_stats, hd95, per_image_metrics,
                             per_image_scores, pooled_metrics, summarize_hd95)


def random_masks(seed: int, n: int = 6, shape: tuple[int, int] = (24, 30)) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and {0, 1} masks (N, 1, H, W) of varied lesion density, one image empty in both."""
    rng = np.random.default_rng(seed)
    density = rng.uniform(0.05, 0.7, size=(n, 1, 1, 1))
    masks = (rng.random((n, 1, *shape)) < density).astype(np.uint8)
    probs = np.clip(masks * 0.6 + rng.random(masks.shape) * 0.6 - 0.1, 0.0, 1.0).astype(np.float32)
    masks[0] = 0
    probs[0] = 0.1
    return probs, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_metrics_match_sklearn(seed):
    probs, masks = random_masks(seed)
    stats = get_stats(torch.from_numpy(probs), torch.from_numpy(masks))
    y_true, y_pred = masks.ravel(), (probs >= 0.5).ravel().astype(np.uint8)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    assert [int(c.sum()) for c in stats] == [tp, fp, fn, tn]
    got = pooled_metrics(stats)
    assert got["miou"] == pytest.approx(jaccard_score(y_true, y_pred), abs=1e-12)
    assert got["dsc"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert got["sensitivity"] == pytest.approx(recall_score(y_true, y_pred), abs=1e-12)
    assert got["specificity"] == pytest.approx(recall_score(y_true, y_pred, pos_label=0), abs=1e-12)


def test_per_image_metrics_match_sklearn_with_empty_as_one():
    probs, masks = random_masks(3)
    stats = get_stats(probs, masks)
    assert all(c.dtype == torch.int64 and c.shape == (len(masks),) for c in stats)
    preds = (probs >= 0.5).astype(np.uint8)
    # zero_division=1: the empty image predicted empty is a perfect score
    dice_ref = [f1_score(m.ravel(), p.ravel(), zero_division=1.0) for m, p in zip(masks, preds)]
    iou_ref = [jaccard_score(m.ravel(), p.ravel(), zero_division=1.0) for m, p in zip(masks, preds)]
    dice, iou = per_image_scores(stats)
    np.testing.assert_allclose(dice.numpy(), dice_ref, atol=1e-12)
    np.testing.assert_allclose(iou.numpy(), iou_ref, atol=1e-12)
    assert dice[0] == 1.0 and iou[0] == 1.0
    summary = per_image_metrics(stats)
    assert summary["dice_mean"] == pytest.approx(np.mean(dice_ref))
    assert summary["dice_std"] == pytest.approx(np.std(dice_ref))
    assert summary["iou_mean"] == pytest.approx(np.mean(iou_ref))
    assert summary["iou_std"] == pytest.approx(np.std(iou_ref))


def test_pooled_differs_from_per_image_mean():
    # a tiny lesion missed entirely and a large one found: pooled DSC stays high, the per-image mean halves
    masks = np.zeros((2, 1, 20, 20), np.uint8)
    masks[0, 0, :2, :2] = 1
    masks[1, 0, 5:15, 5:15] = 1
    preds = masks.copy()
    preds[0] = 0
    stats = get_stats(preds, masks)
    assert pooled_metrics(stats)["dsc"] == pytest.approx(200 / 204)
    assert per_image_metrics(stats)["dice_mean"] == pytest.approx(0.5)


def test_threshold_is_inclusive_and_binary_predictions_pass_through():
    masks = torch.tensor([[1, 1, 0, 0]], dtype=torch.uint8)
    probs = torch.tensor([[0.5, 0.49, 0.5, 0.2]])
    assert tuple(int(c) for c in get_stats(probs, masks)) == (1, 1, 1, 1)
    assert tuple(int(c) for c in get_stats(probs, masks, threshold=0.4)) == (2, 1, 0, 1)
    preds = torch.tensor([[True, False, False, True]])
    assert tuple(int(c) for c in get_stats(preds, masks.bool())) == (1, 1, 1, 1)


@pytest.mark.parametrize("masks, preds, match", [
    (np.full((1, 4), 1.0, np.float32), np.ones((1, 4), np.float32), "bool or integer"),
    (np.full((1, 4), 255, np.uint8), np.ones((1, 4), np.float32), "only 0 and 1"),
    (np.ones((1, 4), np.uint8), np.full((1, 4), 2, np.int64), "only 0 and 1"),
    (np.ones((1, 4), np.uint8), np.ones((1, 5), np.float32), "shape"),
])
def test_get_stats_rejects_bad_input(masks, preds, match):
    with pytest.raises(ValueError, match=match):
        get_stats(preds, masks)


def brute_boundary(mask: np.ndarray) -> np.ndarray:
    """Coordinates of mask pixels with a 4-neighbour outside the mask or the image."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.argwhere(mask & ~inner)


def brute_hd95(pred: np.ndarray, target: np.ndarray) -> float:
    d = cdist(brute_boundary(pred), brute_boundary(target))
    return float(max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))


def blob(rng: np.random.Generator, shape=(40, 48)) -> np.ndarray:
    """A filled ellipse plus speckle: boundaries with corners, holes and isolated pixels."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    cy, cx = rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5)
    ry, rx = rng.uniform(3, 15, size=2)
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask ^ (rng.random(shape) < 0.02)


@pytest.mark.parametrize("seed", range(5))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred, target = blob(rng), blob(rng)
    assert hd95(pred, target) == pytest.approx(brute_hd95(pred, target), abs=1e-9)
    assert hd95(pred, target) == pytest.approx(hd95(target, pred), abs=1e-12)


def test_hd95_known_values_and_empty_masks():
    a, b = np.zeros((1, 10, 10), np.uint8), np.zeros((1, 10, 10), np.uint8)
    assert hd95(a, b) == 0.0  # both empty: nothing to disagree about
    a[0, 1, 1] = 1
    assert math.isnan(hd95(a, b)) and math.isnan(hd95(b, a))  # one empty: undefined
    b[0, 4, 5] = 1
    assert hd95(a, b) == pytest.approx(5.0)  # (3, 4) apart
    assert hd95(a, a) == 0.0


def test_summarize_hd95_leaves_out_and_counts_undefined():
    assert summarize_hd95([1.0, math.nan, 3.0, 8.0]) == {"mean": 4.0, "median": 3.0, "n": 3, "undefined": 1}
    assert summarize_hd95([math.nan]) == {"mean": None, "median": None, "n": 0, "undefined": 1}


def test_accumulator_over_batches_equals_one_pass():
    probs, masks = random_masks(4, n=7)
    acc = MetricAccumulator(hd95=True)
    for start in range(0, 7, 3):
        acc.update(torch.from_numpy(probs[start:start + 3]), torch.from_numpy(masks[start:start + 3]))
    whole = get_stats(probs, masks)
    assert all(torch.equal(a, b) for a, b in zip(acc.stats, whole))
    result = acc.compute()
    assert result["n_images"] == 7
    assert result["dsc"] == pytest.approx(pooled_metrics(whole)["dsc"])
    assert result["iou_mean"] == pytest.approx(per_image_metrics(whole)["iou_mean"])
    expected_hd = [hd95(p >= 0.5, m) for p, m in zip(probs, masks)]
    np.testing.assert_allclose(acc.hd95_values, expected_hd)
    assert result["hd95_n"] + result["hd95_undefined"] == 7
    acc.reset()
    assert acc.compute()["n_images"] == 0 and "hd95_mean" in acc.compute()
    assert "hd95_mean" not in MetricAccumulator().compute()


def test_confusion_stats_cat_of_nothing_is_empty():
    assert all(c.numel() == 0 for c in ConfusionStats.cat([]))
