"""Two-pass prediction (scsonet.twopass) with a stand-in backend, and its connected components."""
from __future__ import annotations

import numpy as np
import pytest

from scsonet.inference import predict_probabilities
from scsonet.postprocess import erode
from scsonet.twopass import crop_window, label_components, largest_component, two_pass_batch, two_pass_probabilities


class DarkSegmenter:
    """Stand-in backend: probability 1 where the image is dark, 0 elsewhere; records batch sizes."""

    input_size = (64, 64)

    def __init__(self):
        self.batches: list[int] = []

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.shape[1:] == (*self.input_size, 3)
        self.batches.append(len(images))
        return (images.mean(axis=-1) < 128).astype(np.float32)


class BlobbySegmenter(DarkSegmenter):
    """Outlines the dark area grown by 3 px at the model's size: a whole frame seen at 64 x 64
    gets a much too large outline, a close crop a nearly right one."""

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        dark = super().predict_probs(images) > 0.5
        return np.stack([~erode(~m, 3) for m in dark]).astype(np.float32)


def photo(height: int, width: int, disks=()) -> tuple[np.ndarray, np.ndarray]:
    """Bright frame with dark disks (cy, cx, r) -> (RGB, true mask)."""
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), dtype=bool)
    for cy, cx, r in disks:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    rgb = np.where(mask[..., None], 40, 220).astype(np.uint8).repeat(3, axis=-1)
    return rgb, mask


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_small_lesion_in_big_frame_is_found_and_refined():
    rgb, truth = photo(900, 1200, [(300, 850, 45)])
    seg = BlobbySegmenter()
    probs, info = two_pass_probabilities(rgb, seg)
    assert probs.shape == truth.shape and probs.dtype == np.float32
    # the tight crop (context 1.5) shrinks pass 1's outline and lies inside the crop: kept
    assert info.second_pass and info.reason == "ran" and info.context == 1.5 and seg.batches == [1, 1]
    x0, y0, x1, y1 = info.crop
    assert x0 <= 850 - 45 and x1 >= 850 + 45 and y0 <= 300 - 45 and y1 >= 300 + 45  # crop holds the lesion
    assert info.crop_share < 0.1
    one_pass = predict_probabilities([rgb], seg)[0] >= 0.5
    assert dice(probs >= 0.5, truth) > 0.6 and dice(probs >= 0.5, truth) > dice(one_pass, truth) + 0.2
    assert 0.0 <= info.agreement < 0.8 and info.pass2_border == 0.0


def test_tight_crop_rejected_falls_back_to_the_wider_context():
    rgb, truth = photo(900, 1200, [(300, 850, 45)])
    seg = DarkSegmenter()  # the same outline at every scale: the tight crop does not shrink it
    probs, info = two_pass_probabilities(rgb, seg)
    assert info.second_pass and info.context == 3.0 and seg.batches == [1, 1, 1]
    one_pass = predict_probabilities([rgb], seg)[0] >= 0.5
    # at 64 x 64 the whole-frame pass sees the disk as ~7 px across; the 3x crop sees it as ~20
    assert dice(probs >= 0.5, truth) > 0.95 > dice(one_pass, truth) + 0.03
    single, info = two_pass_probabilities(rgb, DarkSegmenter(), context=2.0)
    assert info.context == 2.0 and 170 <= info.crop[2] - info.crop[0] <= 200  # twice the ~90 px lesion box


def test_frame_filling_lesion_is_untouched():
    rgb, _ = photo(300, 400, [(150, 200, 140)])
    seg = DarkSegmenter()
    probs, info = two_pass_probabilities(rgb, seg)
    assert not info.second_pass and info.reason == "fills frame" and seg.batches == [1]
    np.testing.assert_array_equal(probs, predict_probabilities([rgb], seg)[0])


def test_no_lesion_returns_pass_one():
    rgb, _ = photo(200, 300)
    probs, info = two_pass_probabilities(rgb, DarkSegmenter())
    assert info.reason == "no lesion" and info.crop is None and not probs.any()
    assert info.to_dict()["second_pass"] is False and "pass1_small" not in info.to_dict()


def test_outside_the_crop_zero_or_pass_one():
    # the lesion plus a far-away smaller dark blob: the crop covers the lesion only
    rgb, _ = photo(800, 800, [(200, 200, 40), (650, 650, 25)])
    zero, info = two_pass_probabilities(rgb, DarkSegmenter(), outside="zero")
    kept, _ = two_pass_probabilities(rgb, DarkSegmenter(), outside="pass1")
    assert info.second_pass
    assert zero[650, 650] == 0 and kept[650, 650] > 0.5
    assert zero[200, 200] == kept[200, 200] == 1
    with pytest.raises(ValueError, match="outside"):
        two_pass_probabilities(rgb, DarkSegmenter(), outside="both")


def test_batch_runs_each_pass_once():
    images = [photo(600, 600, [(100, 100, 30)])[0], photo(100, 120, [(50, 60, 45)])[0], photo(50, 50)[0]]
    seg = DarkSegmenter()
    results = two_pass_batch(images, seg)
    assert seg.batches == [3, 1, 1]  # only the first image needs pass 2 (tight crop, then the wider one)
    assert [info.reason for _, info in results] == ["ran", "fills frame", "no lesion"]
    assert [p.shape for p, _ in results] == [(600, 600), (100, 120), (50, 50)]


def test_crop_window_is_square_inside_the_image():
    assert crop_window((40, 40, 60, 50), (1000, 1000), context=2.0, min_fraction=0) == [30, 25, 70, 65]
    # near a corner: shifted inside, same side
    assert crop_window((0, 0, 20, 20), (1000, 1000), context=2.0, min_fraction=0) == [0, 0, 40, 40]
    # wider than the image is tall: clipped to the height
    x0, y0, x1, y1 = crop_window((100, 40, 300, 60), (100, 1000), context=2.0)
    assert (y0, y1) == (0, 100) and x1 - x0 == 400 and x0 == 0
    # a tiny box gets the minimum side
    x0, y0, x1, y1 = crop_window((500, 500, 501, 501), (800, 1600), context=2.0, min_fraction=0.125)
    assert x1 - x0 == y1 - y0 == 100


def test_label_components():
    mask = np.array([[1, 1, 0, 0, 1],
                     [0, 1, 0, 1, 1],
                     [1, 0, 0, 0, 0],
                     [1, 0, 1, 1, 0],
                     [1, 1, 0, 1, 0]], dtype=bool)
    labels, count = label_components(mask)
    expected = np.array([[1, 1, 0, 0, 2],
                         [0, 1, 0, 2, 2],
                         [3, 0, 0, 0, 0],  # diagonal neighbours are separate (4-connectivity)
                         [3, 0, 4, 4, 0],
                         [3, 3, 0, 4, 0]])
    assert count == 4
    np.testing.assert_array_equal(labels, expected)
    # a U shape: two arms joined only at the bottom are one component
    u = np.zeros((5, 5), dtype=bool)
    u[:, 0] = u[:, 4] = u[4] = True
    assert label_components(u)[1] == 1
    assert label_components(np.zeros((3, 4), dtype=bool))[1] == 0
    np.testing.assert_array_equal(largest_component(mask), labels == 3)


def test_label_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((rng.integers(1, 30), rng.integers(1, 30))) < rng.random()
        labels, count = label_components(mask)
        ref, ref_count = ndimage.label(mask)
        assert count == ref_count
        np.testing.assert_array_equal(labels, ref)


def test_rejected_tight_crop_whose_wide_crop_is_too_large_keeps_pass_one():
    rgb, _ = photo(400, 400, [(200, 200, 50)])
    seg = DarkSegmenter()
    probs, info = two_pass_probabilities(rgb, seg, max_crop_share=0.3)  # 1.5: share 0.14, 3.0: 0.56
    assert not info.second_pass and info.reason == "crop rejected" and seg.batches == [1, 1]
    np.testing.assert_array_equal(probs, predict_probabilities([rgb], DarkSegmenter())[0])
