"""scsonet.shifts: deterministic, well-formed shifts; zoom-out areas; skin canvases from other images."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from scsonet import shifts
from scsonet.shifts import (STANDARD_SHIFTS, cleanest_quarter, dermoscope_frame, donor_pool, get_shifts, image_rng,
                            lesion_fraction, shifted_pairs, size_band, zoom_in, zoom_out)

SIDE = 64


def disc(side: int = SIDE, cy: float = 32, cx: float = 32, r: float = 12) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def split(n: int = 5, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Textured images with a dark disc lesion off the top-left; the top-left quarter is lesion-free."""
    rng = np.random.default_rng(seed)
    masks = [disc(cy=rng.uniform(36, 44), cx=rng.uniform(36, 44), r=rng.uniform(4, 14)) for _ in range(n)]
    images = [rng.integers(120, 220, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]
    for image, mask in zip(images, masks):
        image[mask > 0] //= 3
    return images, masks, [f"im{i}" for i in range(n)]


@pytest.mark.parametrize("shift", STANDARD_SHIFTS, ids=lambda s: s.name)
def test_every_shift_is_deterministic_and_well_formed(shift):
    images, masks, ids = split()
    first = list(shifted_pairs(shift, images, masks, ids, seed=3))
    again = list(shifted_pairs(shift, images[::-1], masks[::-1], ids[::-1], seed=3))[::-1]  # order plays no part
    assert [i for i, *_ in first] == [len(ids) - 1 - i for i, *_ in again]
    for (i, image, mask), (_, image2, mask2) in zip(first, again):
        np.testing.assert_array_equal(image, image2)
        np.testing.assert_array_equal(mask, mask2)
        assert image.dtype == np.uint8 and image.shape == (SIDE, SIDE, 3)
        assert mask.dtype == np.uint8 and mask.shape == (SIDE, SIDE) and set(np.unique(mask)) <= {0, 1}
    if shift.transform is not None and shift.name != "rot90":  # rot90 draws from 3 choices: may repeat
        other = list(shifted_pairs(shift, images, masks, ids, seed=4))
        changed = [not np.array_equal(a[1], b[1]) for a, b in zip(first, other)]
        draws = shift.name.startswith(("zoom", "frame"))
        assert any(changed) == draws  # seeded draws change with the seed; fixed transforms do not


def test_shift_names_are_unique_and_described():
    names = [s.name for s in STANDARD_SHIFTS]
    assert len(set(names)) == len(names) == 17
    assert all(s.description for s in STANDARD_SHIFTS if s.transform is not None)
    assert [s.name for s in get_shifts(["blur", "none"])] == ["blur", "none"]
    with pytest.raises(KeyError, match="nope"):
        get_shifts(["nope"])


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3])
def test_zoom_out_scales_the_lesion_area_and_places_it_off_centre(scale):
    image = np.full((SIDE, SIDE, 3), 200, np.uint8)
    image[:3] = 10  # the border's mean colour is darker than the inside
    mask = disc(r=20)
    for k in range(8):
        out, out_mask = zoom_out(image, mask, image_rng(0, "z", str(k)), scale)
        assert out_mask.sum() / mask.sum() == pytest.approx(scale ** 2, rel=0.1)
        ys, xs = np.nonzero(out_mask)
        small = round(SIDE * scale)
        free = SIDE - small
        # the shrunk image's centre lies at least a quarter of the free range off the canvas centre
        assert abs(ys.mean() - SIDE / 2) >= free / 4 - 1 and abs(xs.mean() - SIDE / 2) >= free / 4 - 1
        flat = np.rint(shifts.border_colour(image)).astype(np.uint8)
        assert np.all(out == flat, axis=-1).mean() == pytest.approx(1 - scale ** 2, abs=0.02)


def test_skin_canvas_comes_from_another_images_lesion_free_quarter():
    images, masks, ids = [], [], []
    for k in range(4):
        image = np.zeros((SIDE, SIDE, 3), np.uint8)
        image[..., 0] = 60 + 40 * k  # each image its own red level: the donor is identifiable
        image[: SIDE // 2, SIDE // 2:, 1] = 99  # a mark on the top-right quarter
        mask = np.zeros((SIDE, SIDE), np.uint8)
        mask[SIDE // 2:] = 1
        mask[: SIDE // 2, : SIDE // 2] = k % 2  # odd k: only the top-right quarter is lesion-free
        images.append(image), masks.append(mask), ids.append(f"s{k}")
    for k in range(4):
        left = SIDE // 2 if k % 2 else 0  # even k: both top quarters are clean, the first one wins
        assert cleanest_quarter(masks[k]) == (slice(0, SIDE // 2), slice(left, left + SIDE // 2))
    donors = set()
    for i, out, out_mask in shifted_pairs(get_shifts(["zoom_out_skin_2"])[0], images, masks, ids):
        canvas = out[(out_mask == 0) & (out[..., 0] != images[i][0, 0, 0])]
        assert len(canvas) > 0.5 * SIDE * SIDE, "the canvas must come from another image"
        donor = (int(canvas[0, 0]) - 60) // 40
        assert donor != i and (canvas[:, 0] == images[donor][0, 0, 0]).all()
        assert (canvas[:, 1] == (99 if donor % 2 else 0)).all()  # the donor's clean quarter, enlarged
        donors.add(donor)
    assert len(donors) > 1


def test_donor_pool_leaves_out_images_without_a_clean_quarter():
    images, masks, _ = split(n=4)
    masks[2] = np.ones_like(masks[2])  # lesion everywhere
    images[3][: SIDE // 2, : SIDE // 2] = 0  # its clean quarter is a black frame
    assert donor_pool(images, masks) == [0, 1]
    assert donor_pool(images[:1], masks[:1]) == [0]  # too few: all of them


def test_zoom_in_keeps_the_lesion_centre_in_the_crop_and_magnifies_it():
    mask = disc(r=5)
    image = np.repeat(mask[..., None] * 200, 3, axis=2).astype(np.uint8)
    for k in range(8):
        out, out_mask = zoom_in(image, mask, image_rng(1, "in", str(k)), crop=0.5)
        assert out_mask.sum() / mask.sum() == pytest.approx(4.0, rel=0.15)  # 2x zoom, lesion uncut
        ys, xs = np.nonzero(out_mask)
        assert 0.1 * SIDE <= ys.mean() <= 0.9 * SIDE and 0.1 * SIDE <= xs.mean() <= 0.9 * SIDE
        assert (out[..., 0][out_mask > 0] > 100).mean() > 0.9  # the mask still lies on the lesion


def test_dermoscope_frame_blackens_corners_and_removes_lesion_under_them():
    image = np.full((SIDE, SIDE, 3), 200, np.uint8)
    mask = np.ones((SIDE, SIDE), np.uint8)
    out, out_mask = dermoscope_frame(image, mask, image_rng(0, "f", "x"))
    assert out[0, 0].max() <= 15 and out[-1, -1].max() <= 15 and out[SIDE // 2, SIDE // 2].min() >= 190
    assert out_mask[0, 0] == 0 and out_mask[SIDE // 2, SIDE // 2] == 1
    assert 0.05 < 1 - out_mask.mean() < 0.4


def test_small_lesion_subset_and_size_bands():
    masks = [np.zeros((100, 100), np.uint8) for _ in range(5)]
    for m, rows in zip(masks, (4, 5, 30, 60, 100)):
        m[:rows] = 1
    assert [size_band(m) for m in masks] == ["<5 %", "5-30 %", "30-60 %", ">60 %", ">60 %"]
    assert lesion_fraction(masks[1]) == 0.05
    images = [np.zeros((100, 100, 3), np.uint8)] * 5
    kept = [i for i, *_ in shifted_pairs(get_shifts(["small_lesions"])[0], images, masks, list("abcde"))]
    assert kept == [0]


def test_module_does_not_import_torch():
    code = "import sys, scsonet.shifts; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
