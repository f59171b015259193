"""The probabilities of a big photo kept at the model's size (``ProbabilityMap``), and the PNG writer."""
import io

import numpy as np
import pytest
from PIL import Image

from scsonet.imageio import encode_mask_png, encode_png
from scsonet.postprocess import ProbabilityMap, resize_probabilities, summarize, threshold_resized


def smooth_map(seed: int = 0, size: int = 64) -> np.ndarray:
    noise = np.random.default_rng(seed).random((8, 8)).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(noise).resize((size, size), Image.BICUBIC)), 0, 1)


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.73, 1.0])
@pytest.mark.parametrize("shape", [(600, 800), (40, 50), (64, 64)])  # enlarged, shrunk, kept
def test_mask_is_exactly_the_dense_map_thresholded(shape, threshold):
    probs = ProbabilityMap(shape, smooth_map())
    mask = probs.mask(threshold)
    assert mask.shape == shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, probs.dense() >= threshold)


def test_an_enlarged_map_is_within_8_bit_rounding_of_the_float_resize():
    small = smooth_map(1)
    dense = ProbabilityMap((700, 500), small).dense()
    assert dense.dtype == np.float32
    # rounded to 1/255 before and after the resize (half a step each), plus Pillow's fixed-point
    # arithmetic: at most 1.41 steps here
    np.testing.assert_allclose(dense, resize_probabilities(small, (700, 500)), atol=1.5 / 255)
    shrunk = ProbabilityMap((30, 20), small).dense()  # shrinking stays exact, in float
    np.testing.assert_array_equal(shrunk, resize_probabilities(small, (30, 20)))


def test_a_patch_replaces_the_base_in_its_window_and_zero_elsewhere_without_base():
    base, patch, window = smooth_map(2), smooth_map(3), (100, 50, 300, 250)
    both = ProbabilityMap((400, 500), base, window, patch).dense()
    alone = ProbabilityMap((400, 500), None, window, patch).dense()
    np.testing.assert_array_equal(both[50:250, 100:300], alone[50:250, 100:300])
    assert not alone[:50].any() and not alone[:, 300:].any()
    np.testing.assert_array_equal(both[:50], ProbabilityMap((400, 500), base).dense()[:50])
    assert ProbabilityMap((400, 500), None, window, patch).max() == pytest.approx(float(patch.max()))


def test_summary_without_the_dense_map_matches_the_full_size_figures():
    probs = ProbabilityMap((3000, 2000), smooth_map(4))
    summary = probs.summary(0.5)
    assert probs._dense is None, "a big photo's summary must not build its float map"
    full = summarize(probs.dense(), probs.mask(0.5))
    assert (summary.lesion_area_px, summary.bbox) == (full.lesion_area_px, full.bbox)
    assert summary.mean_confidence == pytest.approx(full.mean_confidence, abs=1e-3)


def test_threshold_resized_needs_no_float_map_and_rejects_nothing_it_should_keep():
    small = np.zeros((8, 8), np.float32)
    small[2:6, 2:6] = 1.0
    mask = threshold_resized(small, (80, 80), 0.5)
    assert mask[40, 40] and not mask[2, 2] and 0.2 < mask.mean() < 0.35


def test_a_map_needs_a_base_or_a_patch_with_its_window():
    with pytest.raises(ValueError, match="base map, a patch"):
        ProbabilityMap((10, 10), None)
    with pytest.raises(ValueError, match="window"):
        ProbabilityMap((10, 10), smooth_map(), patch=smooth_map())


@pytest.mark.parametrize("pixels", [
    np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8),
    np.random.default_rng(1).integers(0, 256, (20, 9), dtype=np.uint8),
    np.full((1, 1, 3), 7, np.uint8)], ids=["rgb", "grey", "one-pixel"])
def test_png_writer_round_trips_through_pillow(pixels):
    read = Image.open(io.BytesIO(encode_png(pixels)))
    assert read.mode == ("RGB" if pixels.ndim == 3 else "L")
    np.testing.assert_array_equal(np.asarray(read), pixels)


def test_mask_png_is_0_and_255_for_any_memory_layout():
    mask = np.asfortranarray(np.random.default_rng(2).random((30, 40)) < 0.5)[:, ::2]
    read = np.asarray(Image.open(io.BytesIO(encode_mask_png(mask))))
    np.testing.assert_array_equal(read, mask * 255)
