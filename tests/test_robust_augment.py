"""RobustAugment (scsonet.data.robust_augment), its config keys and its wiring into TrainLoader."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from scsonet.data import PaperAugment, RobustAugment, SplitArrays, TrainLoader
from scsonet.data import robust_augment as ra
from scsonet.data.loader import _generator
from scsonet.data.robust_augment import BASE_TRANSFORMS, LATER_TRANSFORMS, TRANSFORMS, check_robust_config, jpeg_like
from scsonet.errors import ScsonetError

ALL_ON = {name: 1.0 for name in TRANSFORMS}
BASE_ON = {name: 1.0 for name in BASE_TRANSFORMS}  # what "all on" meant before LATER_TRANSFORMS


def _batch(b: int = 4, h: int = 48, w: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Skin-like images with a dark elliptic lesion of random size and place, and its mask."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    c = torch.rand(b, 4, generator=g)
    cy, cx = (0.3 + 0.4 * c[:, 0]) * h, (0.3 + 0.4 * c[:, 1]) * w
    ry, rx = (0.1 + 0.3 * c[:, 2]) * h, (0.1 + 0.3 * c[:, 3]) * w
    inside = ((ys - cy.view(-1, 1, 1)) / ry.view(-1, 1, 1)) ** 2 + ((xs - cx.view(-1, 1, 1)) / rx.view(-1, 1, 1)) ** 2 < 1
    masks = inside[:, None].float()
    skin = torch.tensor([215.0, 170.0, 150.0]).view(1, 3, 1, 1)
    images = skin * (1 - 0.6 * masks) + 10 * torch.rand(b, 3, h, w, generator=g)
    return images.clamp(0, 255), masks


def _run(probs, images, masks, seed=0, paper=None):
    g = torch.Generator().manual_seed(seed)
    out = RobustAugment(probs, paper)(images, masks, g)
    return out, g


@pytest.mark.parametrize("name", TRANSFORMS + ("all",))
def test_each_transform_keeps_shapes_range_and_binary_masks(name):
    images, masks = _batch(h=48, w=40)  # not square, not a multiple of 16
    probs = ALL_ON if name == "all" else {name: 1.0}
    (x, y), _ = _run(probs, images, masks, paper=PaperAugment())
    assert x.shape == images.shape and y.shape == masks.shape
    assert x.dtype == y.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 255
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(x, images)  # it did something
    assert torch.equal(images, _batch(h=48, w=40)[0])  # and left its inputs alone


def test_probability_zero_is_identity():
    images, masks = _batch()
    for probs in ({}, {name: 0.0 for name in TRANSFORMS}):
        (x, y), _ = _run(probs, images, masks)
        assert torch.equal(x, images) and torch.equal(y, masks)


def test_draws_are_fixed_whatever_fires_and_reproducible():
    images, masks = _batch()
    states = []
    # configs without the later transforms draw as they did before those existed; with any of
    # them, one more block whatever fires
    for later, configs in ((False, ({}, BASE_ON, {"zoom_out": 1.0, "jpeg": 0.3})),
                           (True, (ALL_ON, {"ink": 0.5}, {"hard_seam": 1.0, "blur": 0.2}))):
        for probs in configs:
            for paper in (None, PaperAugment()):
                _, g = _run(probs, images, masks, seed=3, paper=paper)
                states.append(((later, paper is None), g.get_state()))
    for key in {k for k, _ in states}:
        same = [s for k, s in states if k == key]
        assert len(same) == 3 and all(torch.equal(same[0], s) for s in same[1:])
    assert not torch.equal(states[0][1], states[6][1])
    (x1, y1), _ = _run(ALL_ON, images, masks, seed=5, paper=PaperAugment())
    (x2, y2), _ = _run(ALL_ON, images, masks, seed=5, paper=PaperAugment())
    (x3, _), _ = _run(ALL_ON, images, masks, seed=6, paper=PaperAugment())
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)


# The probabilities of configs/ablation/robust_all.yaml, the ablation whose runs must stay comparable.
ROBUST_ALL = {"zoom_out": 0.25, "zoom_in": 0.4, "translate": 0.1, "skin_canvas": 0.5, "texture_canvas": 0.5,
              "fingers": 0.15, "ruler": 0.08, "frame": 0.15, "color": 0.5, "illumination": 0.3, "blur": 0.15,
              "noise": 0.2, "jpeg": 0.3}
# SHA-256 of the augmented batches as the implementation of commit f064e8f made them (before its
# speed-ups), on this platform with 2 threads (the training's; the antialiased resize of zoom_out and
# blur rounds differently with 1): (probs, paper, batch, height, width, batches) -> digests. Two CPUs
# that both report AVX512 round some kernels differently, so each case holds f064e8f's digest on
# each machine it was recorded on (the second, an AMD EPYC, recorded by running f064e8f there).
# Squares of 256 are the training's size; odd sizes take the kernels' tails and JPEG's padding.
_RECORDED_PLATFORM = ("2.13.0", "AVX512")
_RECORDED = {
    "all_on_256": ((BASE_ON, True, 4, 256, 256, 1),
        {"3ed10032b1dc27581df9be20194cce6cc7b50efa0bf0043118fca6d07a2c8438",
         "10c3c75bbdd2de09e8ad83cbb5fa9ccaf04a25a36033b3c1fcc0ae710c746fc7"}),
    "robust_all_256": ((ROBUST_ALL, True, 8, 256, 256, 3),
        {"67d59671cff80617ca7be1d4c664beee49418b5e29be95726c210a66d6db27f1",
         "f3ef65c858f766c44e3e7484895e5c6d1220c73bb89fd171b1826504efc3fc67"}),
    "all_on_64x80": ((BASE_ON, True, 5, 64, 80, 2),
        {"358fa34792e301ab3c43be740d166f1b7039d3b653f72572aded53b829a5894f",
         "c0121df89dc60e71ae5d0d9ab90247d5de3cea09e1fbfc7b332140e4480d2ac4"}),
    "all_on_odd_no_paper": ((BASE_ON, False, 3, 40, 56, 2),
        {"5b4531c45a529173ed7b57e1523338ce612784b2d0c58b937787493ebee71888",
         "7eb6ae2c4cbaac9b6e59eec870115af0132db9d85656dcd9cbf57cee8fb7453e"}),
    "robust_all_64": ((ROBUST_ALL, True, 8, 64, 64, 8),
        {"7399d306a6f0d96c0ff8c859fa0cb6dbd8eb9ac74c275256ec04aea9776cff36",
         "4f9db8a75472495136a4d425a6a275d40f370146f8152483e00b3ae17df45ef1"}),
}


def _digest(batches) -> str:
    digest = hashlib.sha256()
    for x, y in batches:
        digest.update(x.contiguous().numpy().tobytes())
        digest.update(y.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _recorded_batches(probs, paper, b, h, w, batches):
    """``batches`` successive batches of one stream, as TrainLoader draws them."""
    augment, g = RobustAugment(probs, PaperAugment() if paper else None), torch.Generator().manual_seed(11)
    for k in range(batches):
        images, masks = _batch(b, h, w, seed=k)
        yield augment(images, masks, g)


@pytest.mark.skipif((torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability()) != _RECORDED_PLATFORM,
                    reason=f"digests recorded with torch {_RECORDED_PLATFORM[0]} on {_RECORDED_PLATFORM[1]}")
@pytest.mark.parametrize("case", sorted(_RECORDED))
def test_batches_are_bit_identical_to_the_recorded_ones(case):
    args, expected = _RECORDED[case]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _digest(_recorded_batches(*args)) in expected
    finally:
        torch.set_num_threads(threads)


def test_zoom_out_shrinks_the_lesion_by_the_square_of_the_scale():
    b, h, w = 16, 64, 64
    images, _ = _batch(b, h, w, seed=1)
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    # a disc clear of the border, so that the feathered seam never reaches it
    masks = (torch.hypot(ys - h / 2, xs - w / 2) < 0.35 * h).float().expand(b, 1, h, w)
    # Without the paper's transforms, the call's first draws are the block of uniform draws.
    draws = torch.rand(b, ra._NUM_DRAWS, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (_, y), _ = _run({"zoom_out": 1.0}, images, masks, seed=2)
    geo = draws[:, ra._OFFSETS["geometry"]]
    share = torch.exp(math.log(0.3) + (math.log(0.9) - math.log(0.3)) * geo[:, 0])
    aspect = torch.exp(math.log(0.8) + (math.log(1.25) - math.log(0.8)) * geo[:, 1]).sqrt()
    expected = (share / aspect).clamp(max=0.95) * (share * aspect).clamp(max=0.95)
    ratio = y.sum((1, 2, 3)) / masks.sum((1, 2, 3))
    torch.testing.assert_close(ratio, expected.float(), atol=0.04, rtol=0.1)
    assert expected.min() < 0.2 and expected.max() > 0.4  # a broad range of scales was drawn


def test_zoom_in_enlarges_and_translate_keeps_the_size():
    images, masks = _batch(16, 64, 64, seed=1)
    (_, y_in), _ = _run({"zoom_in": 1.0}, images, masks, seed=2)
    (_, y_tr), _ = _run({"translate": 1.0}, images, masks, seed=2)
    before, enlarged, shifted = masks.sum((1, 2, 3)), y_in.sum((1, 2, 3)), y_tr.sum((1, 2, 3))
    # Enlarged by 1/0.9^2..1/0.5^2, less what the window cuts off: more lesion on average.
    assert enlarged.mean() > 1.3 * before.mean()
    assert (shifted <= before).all() and shifted.mean() > 0.6 * before.mean()


def test_skin_canvas_comes_from_another_photos_lesion_free_window():
    h = w = 96
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(3, h, w)
    # Sample 0: all lesion. Sample 1: its left half a blue lesion, its right half skin with a
    # vertical gradient: the only clean window, so sample 0's canvas must be that skin.
    photo0 = torch.full((3, h, w), 128.0)
    photo1 = torch.stack([60 + 1.5 * ys[0], 40 + 1.0 * ys[0], 30 + 0.2 * ys[0]])
    mask1 = torch.zeros(1, h, w)
    photo1[:, :, : w // 2] = torch.tensor([0.0, 0.0, 255.0]).view(3, 1, 1)
    mask1[:, :, : w // 2] = 1
    images, masks = torch.stack([photo0, photo1]), torch.stack([torch.ones(1, h, w), mask1])
    (x, y), _ = _run({"zoom_out": 1.0, "skin_canvas": 1.0}, images, masks, seed=0)
    # canvas: background in the mask, more than 12 px (half the widest seam) from the photo
    near_photo = F.max_pool2d(y[:1], 25, 1, 12)[0, 0] > 0
    canvas = (y[0, 0] == 0) & ~near_photo
    assert canvas.sum() > 500
    pixels = x[0][:, canvas]
    assert (pixels[2] < pixels[0]).all()  # none of the blue lesion
    assert pixels[0].std() > 10  # the gradient of the donor's skin, not a flat colour


def test_no_clean_donor_falls_back_to_a_flat_canvas():
    images, masks = _batch(2, 64, 64)
    masks = torch.ones_like(masks)  # no lesion-free skin anywhere in the batch
    (x, y), _ = _run({"zoom_out": 1.0, "skin_canvas": 1.0}, images, masks, seed=0)
    for k in range(2):
        far = (y[k, 0] == 0) & ~(F.max_pool2d(y[k:k + 1], 25, 1, 12)[0, 0] > 0)
        if far.sum() > 50:
            assert x[k][:, far].std(1).max() < 1e-3


def test_ink_tints_the_skin_and_keeps_the_mask():
    images, masks = _batch(32, 64, 64, seed=4)
    (x, y), _ = _run({"ink": 1.0}, images, masks, seed=1)
    assert torch.equal(y, masks)  # a dye: the lesion under it is still lesion
    ratio = x / images
    assert (ratio <= 1.0 + 1e-5).all()  # ink only absorbs
    inked = ratio.amin(1) < 0.85
    assert inked.flatten(1).any(1).all()  # every sample got its mark
    assert inked.float().mean() < 0.2  # marks, not a wash over the frame
    # marker inks absorb more red than blue: violet to blue, never brown like a lesion
    r, b = ratio[:, 0][inked], ratio[:, 2][inked]
    assert (r < b).float().mean() > 0.7


def test_ink_ring_circles_the_lesion():
    b, h, w = 64, 96, 96
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    masks = (torch.hypot(ys - 40, xs - 56) < 10).float().expand(b, 1, h, w)
    images = torch.full((b, 3, h, w), 200.0) * (1 - 0.5 * masks)
    (x, _), _ = _run({"ink": 1.0}, images, masks, seed=2)
    inked = (x / images).amin(1) < 0.85
    dist = torch.hypot(ys - 40, xs - 56)
    rings = 0
    for k in range(b):
        d = dist[inked[k]]
        # a ring: every inked pixel at about the same distance from the lesion's centre, beyond it
        if d.numel() > 60 and d.std() < 2.5:
            rings += 1
            assert 12 < d.mean() < 0.6 * h + 3
    assert rings > b // 8


def test_hard_seam_pastes_the_photo_with_a_step():
    b, h, w = 16, 128, 128  # seams are up to an eighth of the photo's side: a few pixels here
    images, masks = torch.full((b, 3, h, w), 200.0), torch.zeros(b, 1, h, w)

    def widest_ramp(probs):
        (x, _), _ = _run(probs, images, masks, seed=3)
        # pixels between the canvas and the photo's own value: the seam's ramp
        ramp = ((x[:, 0] - 200).abs() > 2) & ((x[:, 0] - x[:, 0, :1, :1]).abs() > 2)
        return ramp.flatten(1).sum(1).float()

    soft = widest_ramp({"zoom_out": 1.0})
    hard = widest_ramp({"zoom_out": 1.0, "hard_seam": 1.0})
    assert soft.mean() > 3 * hard.mean()
    assert hard.max() <= 4 * 0.95 * h  # at most a one-pixel ring around the photo (sides <= 0.95 h)


def test_frame_darkens_the_outside_and_drops_the_mask_there():
    images, masks = torch.full((8, 3, 64, 128), 200.0), torch.ones(8, 1, 64, 128)
    (x, y), _ = _run({"frame": 1.0}, images, masks)
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:  # the corners of a wide frame lie well outside
        assert (x[:, :, i, j] <= 25).all() and (y[:, 0, i, j] == 0).all()
    assert (x[:, :, 32, 64] > 199).all() and (y[:, 0, 32, 64] == 1).all()
    # the mask ends where the image is half-way dark: at (200 + dark) / 2, dark in 0..22
    assert (x[:, 0][y[:, 0] == 0] <= 111.01).all() and (x[:, 0][y[:, 0] == 1] >= 99.99).all()


@pytest.mark.parametrize("name", ["fingers", "ruler"])
def test_occluders_are_background(name):
    images, masks = torch.full((8, 3, 64, 64), 128.0), torch.ones(8, 1, 64, 64)
    (x, y), _ = _run({name: 1.0}, images, masks)
    changed = (x - images).abs().amax(1) > 40  # the occluder's own pixels, not its faint shadow
    assert changed.any()
    assert (y[:, 0][changed] == 0).float().mean() > 0.9
    assert (y[:, 0][~changed] == 1).float().mean() > 0.95


def test_jpeg_like_is_close_to_a_real_jpeg():
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 255, size=(64, 64), mode="bicubic", align_corners=False)
    image = (smooth + 2 * torch.randn(1, 3, 64, 64, generator=g)).clamp(0, 255).round()
    for quality in (30, 80):
        buf = io.BytesIO()
        Image.fromarray(image[0].permute(1, 2, 0).numpy().astype(np.uint8)).save(buf, format="JPEG", quality=quality)
        real = torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1)[None].float()
        ours = jpeg_like(image, torch.tensor([float(quality)]))
        assert (ours - real).abs().mean() < 0.35 * (real - image).abs().mean()  # a tenth of it at q 30


def test_check_robust_config():
    assert check_robust_config({"zoom_out": 1, "jpeg": 0.25}) == {"zoom_out": 1.0, "jpeg": 0.25}
    assert check_robust_config({}) == {}
    for probs, message in (({"zoomout": 0.3}, r"config robust_augment\.zoomout=0\.3: unknown transform; choose from zoom_out"),
                           ({"blur": 1.5}, r"config robust_augment\.blur=1\.5: expected a probability in 0\.\.1"),
                           ({"blur": -0.1}, r"robust_augment\.blur=-0\.1: expected a probability"),
                           ({"blur": "often"}, r"robust_augment\.blur='often': expected a probability"),
                           ({"blur": True}, r"robust_augment\.blur=True: expected a probability"),
                           ([0.3], r"config robust_augment=\[0\.3\]: expected a mapping")):
        with pytest.raises(ScsonetError, match=message):
            check_robust_config(probs)
    with pytest.raises(ScsonetError, match="robust_augment"):
        RobustAugment({"nope": 0.1})


def test_load_config_checks_the_new_keys(tmp_path):
    from scsonet.train import load_config

    cfg = load_config("configs/isic2017_scsonet_robust.yaml")
    assert set(BASE_TRANSFORMS) <= set(cfg.robust_augment) <= set(TRANSFORMS) and cfg.init_from == ""
    paper = load_config("configs/isic2017_scsonet.yaml")
    assert paper.robust_augment == {} and paper.init_from == ""
    with pytest.raises(ScsonetError, match=r"config robust_augment\.zoomout=0\.3: unknown transform"):
        load_config(None, ["robust_augment={zoomout: 0.3}"])
    with pytest.raises(ScsonetError, match=r"config robust_augment\.jpeg=2: expected a probability"):
        load_config(None, ["robust_augment={jpeg: 2}"])
    with pytest.raises(ScsonetError, match=r"config robust_augment=0\.5: expected dict"):
        load_config(None, ["robust_augment=0.5"])
    with pytest.raises(ScsonetError, match=r"config init_from='nowhere\.pt': no such file, and not a pretrained name"):
        load_config(None, ["init_from=nowhere.pt"])
    assert load_config(None, ["init_from=scsonet-isic2017"]).init_from == "scsonet-isic2017"
    for path in ("configs/ablation/robust_all.yaml", "configs/ablation/robust_no_scale.yaml",
                 "configs/ablation/robust_no_surroundings.yaml", "configs/ablation/robust_no_photometric.yaml",
                 "configs/ablation/robust_paper_only.yaml"):
        assert load_config(path).init_from == "scsonet-isic2017"


def _arrays(n=10, h=32, w=32):
    images, masks = _batch(n, h, w, seed=4)
    return SplitArrays(images.round().to(torch.uint8), masks.to(torch.uint8), [f"id{i}" for i in range(n)])


def _loader(arrays, **kwargs):
    return TrainLoader(arrays, 4, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), augment=True, shuffle=True, seed=7,
                       device="cpu", **kwargs)


def test_loader_without_robust_augment_gives_the_papers_batches():
    arrays = _arrays()
    plain, empty = _loader(arrays), _loader(arrays, robust_augment={})
    assert isinstance(plain.augment, PaperAugment) and isinstance(empty.augment, PaperAugment)
    for loader in (plain, empty):
        loader.set_epoch(2)
    g = _generator(7, 2, 0, 1)  # what TrainLoader seeds its augmentation with
    expected = []
    for idx in plain.indices().split(4):
        x, y = PaperAugment()(arrays.images[idx].float(), arrays.masks[idx].float(), g)
        expected.append((plain.preset.normalize(x), y))
    for batches in (list(plain), list(empty)):
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(batches, expected))
    robust = _loader(arrays, robust_augment={"zoom_out": 1.0})
    robust.set_epoch(2)
    assert isinstance(robust.augment, RobustAugment) and isinstance(robust.augment.paper, PaperAugment)
    first = next(iter(robust))
    assert first[0].shape == expected[0][0].shape and not torch.equal(first[0], expected[0][0])
    assert torch.equal(first[0], next(iter(robust))[0])  # a resumed epoch sees the same batches


def test_check_run_config_reads_missing_new_keys_as_their_defaults(tmp_path):
    from scsonet.benchmark import check_run_config
    from scsonet.train import TrainConfig

    stored = dataclasses.asdict(TrainConfig())
    del stored["robust_augment"], stored["init_from"]  # a run saved before these keys existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(stored))
    check_run_config(tmp_path, TrainConfig())
    with pytest.raises(ScsonetError, match="robust_augment"):
        check_run_config(tmp_path, TrainConfig(robust_augment={"blur": 0.5}))
    with pytest.raises(ScsonetError, match="init_from"):
        check_run_config(tmp_path, TrainConfig(init_from="scsonet-isic2017"))


def test_init_from_loads_the_weights_and_checks_them(tmp_path):
    from scsonet.models import create_model
    from scsonet.train import TrainConfig, _init_weights

    torch.manual_seed(0)
    source = create_model("scsonet")
    mean, std = [0.6, 0.5, 0.4], [0.2, 0.2, 0.2]
    ckpt = {"model": source.state_dict(), "model_name": "scsonet", "model_args": {},
            "preprocessing": {"resize_size": [32, 32], "mean": mean, "std": std}}
    torch.save(ckpt, tmp_path / "best.pt")
    target = create_model("scsonet")
    cfg = TrainConfig(init_from=str(tmp_path / "best.pt"))
    _init_weights(target, cfg, mean, std)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(ScsonetError, match=r"init_from=.*trained with mean \[0\.6, 0\.5, 0\.4\]"):
        _init_weights(target, cfg, [0.7, 0.5, 0.4], std)
    with pytest.raises(ScsonetError, match=r"init_from=.*a 'scsonet', the config trains a 'unet'"):
        _init_weights(create_model("unet"), dataclasses.replace(cfg, model="unet"), mean, std)
    with pytest.raises(ScsonetError, match="nowhere.pt"):
        _init_weights(target, dataclasses.replace(cfg, init_from=str(tmp_path / "nowhere.pt")), mean, std)
