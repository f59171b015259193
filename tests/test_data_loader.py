"""PreparedData (verification, loading), PaperAugment and TrainLoader (order, sharding, epochs)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _synthdata import OUT, check_pairs, folder_dataset
from scsonet.data import PaperAugment, PreparedData, TrainLoader
from scsonet.data.augment import _linear_grid
from scsonet.data.prepare import prepare_dataset
from scsonet.errors import ScsonetError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare_dataset("folder", folder_dataset(root / "src", n=20), root / "out", size=OUT, test_ratio=0.25,
                    val_ratio=0.2, workers=1, progress=False)
    return root / "out"


# -- PreparedData --------------------------------------------------------------------------------


def test_load_gives_channels_first_uint8_pairs(prepared):
    data = PreparedData(prepared)
    assert data.splits == ["train", "val", "test"] and data.size == (OUT, OUT)
    assert len(data.mean) == len(data.std) == 3
    for split in data.splits:
        arrays = data.load(split)
        assert arrays.images.shape == (len(arrays), 3, OUT, OUT) and arrays.images.dtype == torch.uint8
        assert arrays.masks.shape == (len(arrays), 1, OUT, OUT) and arrays.masks.dtype == torch.uint8
        check_pairs(arrays.images.permute(0, 2, 3, 1).numpy(), arrays.masks[:, 0].numpy(), arrays.ids)
    both = data.load("train+val")
    assert both.ids == data.load("train").ids + data.load("val").ids and len(both.images) == len(both)


def test_tampered_file_fails_verification(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    masks = np.load(copy / "val" / "masks.npy")
    masks[0, 0, 0] ^= 1
    np.save(copy / "val" / "masks.npy", masks)
    with pytest.raises(ScsonetError, match=r"val/masks\.npy: checksum differs"):
        PreparedData(copy)
    PreparedData(copy, verify=False)  # opting out still loads
    (copy / "test" / "ids.txt").unlink()
    with pytest.raises(ScsonetError, match=r"test/ids\.txt: listed in manifest\.json but missing"):
        PreparedData(copy, verify=False)


def test_missing_folder_split_and_foreign_manifest(prepared, tmp_path):
    with pytest.raises(ScsonetError, match="prepared dataset folder not found"):
        PreparedData(tmp_path / "nowhere")
    with pytest.raises(ScsonetError, match="manifest.json: missing"):
        PreparedData(tmp_path)
    with pytest.raises(ScsonetError, match="no split 'holdout' \\(has train, val, test\\)"):
        PreparedData(prepared).load("holdout")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ScsonetError, match="format 'other'"):
        PreparedData(tmp_path)


# -- PaperAugment --------------------------------------------------------------------------------


def _batch(b: int = 6, h: int = 12, w: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (b, 3, h, w), generator=g).float()
    masks = (torch.rand(b, 1, h, w, generator=g) > 0.5).float()
    return images, masks


def test_flips_land_on_pixel_centres_and_probability_zero_is_identity():
    images, masks = _batch()
    g = torch.Generator().manual_seed(0)
    x, y = PaperAugment(p_hflip=0.0, p_vflip=0.0, p_rotate=0.0)(images, masks, g)
    assert torch.equal(x, images) and torch.equal(y, masks)
    x, y = PaperAugment(p_hflip=1.0, p_vflip=0.0, p_rotate=0.0)(images, masks, g)
    torch.testing.assert_close(x, images.flip(-1), atol=1e-3, rtol=0)  # sampled exactly at pixel centres
    assert torch.equal(y, masks.flip(-1))
    x, y = PaperAugment(p_hflip=1.0, p_vflip=1.0, p_rotate=0.0)(images, masks, g)
    torch.testing.assert_close(x, images.flip(-1, -2), atol=1e-3, rtol=0)
    assert torch.equal(y, masks.flip(-1, -2))


@pytest.mark.parametrize("h, w", [(12, 12), (8, 14)])
def test_rotation_matches_exact_rotations(h, w):
    images, masks = _batch(h=h, w=w)
    g = torch.Generator().manual_seed(0)
    x, y = PaperAugment(p_hflip=0.0, p_vflip=0.0, p_rotate=1.0, degrees=(180.0, 180.0))(images, masks, g)
    torch.testing.assert_close(x, images.flip(-1, -2), atol=1e-3, rtol=0)
    assert torch.equal(y, masks.flip(-1, -2))
    if h == w:  # a quarter turn either way maps the square grid onto itself
        x, y = PaperAugment(p_hflip=0.0, p_vflip=0.0, p_rotate=1.0, degrees=(90.0, 90.0))(images, masks, g)
        quarter = [torch.rot90(images, k, (-2, -1)) for k in (1, -1)]
        assert any(torch.allclose(x, q, atol=1e-3) for q in quarter)


def test_draws_are_per_sample_reproducible_and_keep_masks_binary():
    images, masks = _batch(b=1, h=32, w=32)
    images, masks = images.repeat(64, 1, 1, 1), masks.repeat(64, 1, 1, 1)
    x1, y1 = PaperAugment()(images, masks, torch.Generator().manual_seed(5))
    x2, y2 = PaperAugment()(images, masks, torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert set(y1.unique().tolist()) <= {0.0, 1.0}
    distinct = {tuple(x.flatten()[:64].round().tolist()) for x in x1}
    assert len(distinct) > 20  # identical inputs, independent draws: many different outputs
    unchanged = sum(torch.allclose(x, images[0], atol=1e-3) for x in x1)
    assert 2 <= unchanged <= 20  # (1/2)^3 of 64 = 8 samples left as they were, on average


def test_rotation_keeps_mask_with_image():
    """A bright square and its mask rotate together: after any angle they still coincide."""
    images = torch.zeros(16, 3, 32, 32)
    masks = torch.zeros(16, 1, 32, 32)
    images[:, :, 4:12, 6:14] = 255.0
    masks[:, :, 4:12, 6:14] = 1.0
    x, y = PaperAugment(p_rotate=1.0)(images, masks, torch.Generator().manual_seed(1))
    bright = x[:, 0] > 200
    inside = (bright & y[:, 0].bool()).sum() / bright.sum().clamp(min=1)
    assert inside > 0.95


# -- TrainLoader ---------------------------------------------------------------------------------


def _loader(arrays, **kwargs):
    kwargs = {"batch_size": 4, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2), "augment": False,
              "shuffle": False, "seed": 0, "device": "cpu", **kwargs}
    return TrainLoader(arrays, **kwargs)


def test_batches_are_normalised_in_order(prepared):
    arrays = PreparedData(prepared).load("train")
    loader = _loader(arrays)
    batches = list(loader)
    assert len(batches) == len(loader) == math.ceil(len(arrays) / 4)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == y.dtype == torch.float32 and x.shape == (len(arrays), 3, OUT, OUT)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (arrays.images.float() / 255 - mean) / 0.2)
    assert torch.equal(y, arrays.masks.float())


def test_epochs_are_reproducible_and_differ(prepared):
    arrays = PreparedData(prepared).load("train")

    def epoch(loader, e):
        loader.set_epoch(e)
        return [b for batch in loader for b in batch]

    a = _loader(arrays, augment=True, shuffle=True, seed=7)
    b = _loader(arrays, augment=True, shuffle=True, seed=7)
    first = epoch(a, 3)
    assert all(torch.equal(p, q) for p, q in zip(first, epoch(b, 3)))  # a resumed run sees the same
    assert not all(torch.equal(p, q) for p, q in zip(first, epoch(a, 4)))
    assert sorted(a.indices().tolist()) == list(range(len(arrays)))


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_share_the_split(prepared, drop_last):
    arrays = PreparedData(prepared).load("train")  # 12 pairs
    n, world = len(arrays), 5
    loaders = [_loader(arrays, shuffle=True, rank=r, world_size=world, drop_last=drop_last, batch_size=2)
               for r in range(world)]
    shards = [set(ld.indices().tolist()) for ld in loaders]
    assert len({len(ld) for ld in loaders}) == 1 and len({len(ld.indices()) for ld in loaders}) == 1
    union = set().union(*shards)
    if drop_last:
        assert len(union) == (n // world) * world and sum(map(len, shards)) == len(union)
        assert all(len(ld) == (n // world) // 2 for ld in loaders)
    else:
        assert union == set(range(n))
        assert all(len(ld) == math.ceil(math.ceil(n / world) / 2) for ld in loaders)
    for ld in loaders:
        assert sum(len(x) for x, _ in ld) == len(ld.indices()) - (len(ld.indices()) % 2 if drop_last else 0)


def test_linear_grid_matches_affine_grid():
    theta = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(torch.cat([theta, torch.zeros(3, 2, 1)], 2), [3, 1, 5, 7], align_corners=False)
    torch.testing.assert_close(_linear_grid(theta, 5, 7), expected)
