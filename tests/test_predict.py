"""scsonet predict, segment() and the bundled samples: bad inputs, image modes, outputs, --continue."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

import scsonet
from _synthdata import random_scsonet_checkpoint
from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.imageio import encode_mask_png, expand_inputs, read_image, to_rgb_array
from scsonet.inference import TorchSegmenter, predict_files, sample_images
from scsonet.models import load_model
from scsonet.postprocess import erode, summarize

SHIPPED = Path(scsonet.__file__).parent / "weights" / "scsonet_isic2017_v1.safetensors"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init SCSONet saved as a training checkpoint."""
    return random_scsonet_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt")


class DiskSegmenter:
    """A stand-in backend: probability 0.9 on a centred disk, ``background`` elsewhere; counts images."""

    input_size = (64, 48)

    def __init__(self, background: float = 0.1, radius: float = 0.3):
        self.background, self.radius, self.seen = background, radius, 0

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8 and images.shape[1:] == (*self.input_size, 3)
        self.seen += len(images)
        yy, xx = np.mgrid[:64, :48]
        disk = (yy - 31.5) ** 2 / 64**2 + (xx - 23.5) ** 2 / 48**2 < self.radius**2
        probs = np.where(disk, 0.9, self.background).astype(np.float32)
        return np.repeat(probs[None], len(images), axis=0)


def rgb_image(height: int = 40, width: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_bad_inputs_each_give_one_line_naming_the_file_and_the_rest_are_done(tmp_path, checkpoint, capsys):
    good = save(tmp_path / "good.png", Image.fromarray(rgb_image()))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    jpeg = tmp_path / "whole.jpg"
    Image.fromarray(rgb_image(120, 160)).save(jpeg, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"

    status = main(["predict", str(text), str(good), str(truncated), str(empty), str(missing),
                   "--weights", str(checkpoint), "--device", "cpu", "--out", str(out), "--quiet"])
    assert status != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 4, errors
    for bad in (text, truncated, empty, missing):
        assert sum(str(bad) in line for line in errors) == 1, (bad, errors)
    assert (out / "good_mask.png").exists() and (out / "good_overlay.png").exists()
    rows = {Path(r["file"]).name: r for r in json.loads((out / "results.json").read_text())["images"]}
    assert rows["good.png"]["status"] == "ok"
    assert {rows[p.name]["status"] for p in (text, truncated, empty, missing)} == {"error"}


def test_samples_and_a_good_image_exit_zero(tmp_path, checkpoint, capsys):
    good = save(tmp_path / "good.bmp", Image.fromarray(rgb_image()))
    out = tmp_path / "out"
    assert main(["predict", str(good), "--samples", "--weights", str(checkpoint), "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    assert "7 image(s) segmented" in capsys.readouterr().out
    assert len(list(out.glob("*_overlay.png"))) == len(list(out.glob("*_mask.png"))) == 7


def test_output_folder_that_is_a_file_is_a_user_error(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ScsonetError, match="out"):
        predict_files([tmp_path], DiskSegmenter(), tmp_path / "out")


def exif_rotated_jpeg(path: Path) -> Path:
    """A 60 x 40 (w x h) JPEG whose EXIF says 'rotate 90 degrees': shown as 40 x 60."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return save(path, Image.fromarray(rgb_image(40, 60)), exif=exif.tobytes())


MODE_CASES = {
    "grey.png": lambda p: save(p, Image.fromarray(rgb_image()[..., 0])),
    "rgba.png": lambda p: save(p, Image.fromarray(np.dstack([rgb_image(), np.full((40, 60), 128, np.uint8)]))),
    "palette.png": lambda p: save(p, Image.fromarray(rgb_image()).convert("P")),
    "grey16.png": lambda p: save(p, Image.fromarray(np.full((40, 60), 40000, np.uint16))),
    "grey16_tiff.tif": lambda p: save(p, Image.fromarray(np.arange(2400, dtype=np.uint16).reshape(40, 60) * 27)),
    "binary.bmp": lambda p: save(p, Image.fromarray(rgb_image()[..., 0] > 128)),
    "cmyk.jpg": lambda p: save(p, Image.fromarray(rgb_image()).convert("CMYK")),
    "rotated.jpg": exif_rotated_jpeg,
}


def test_image_modes_become_rgb_uint8_at_their_displayed_size(tmp_path):
    for name, make in MODE_CASES.items():
        rgb = read_image(make(tmp_path / name))
        assert rgb.dtype == np.uint8 and rgb.shape == ((60, 40, 3) if name == "rotated.jpg" else (40, 60, 3)), name
    assert (read_image(tmp_path / "grey16.png") == round(40000 / 257)).all()  # rescaled, not clipped at 255
    assert read_image(tmp_path / "grey16_tiff.tif").max() == round(2399 * 27 / 257)


def test_predict_any_mode_gives_masks_of_the_original_size(tmp_path, checkpoint):
    paths = [make(tmp_path / name) for name, make in MODE_CASES.items()]
    paths.append(save(tmp_path / "large.jpg", Image.fromarray(rgb_image(300, 517))))
    segmenter = TorchSegmenter(load_model(checkpoint), "cpu")
    rows = predict_files(paths, segmenter, tmp_path / "out", progress=False)
    assert [r["status"] for r in rows] == ["ok"] * len(paths)
    for path, row in zip(paths, rows):
        shown = Image.open(path)
        expected = (40, 60) if path.name == "rotated.jpg" else shown.size
        for kind in ("mask", "overlay"):
            written = Image.open(tmp_path / "out" / f"{path.stem}_{kind}.png")
            assert written.size == expected, (path.name, kind)
        mask = np.asarray(Image.open(tmp_path / "out" / f"{path.stem}_mask.png"))
        assert set(np.unique(mask)) <= {0, 255}
        assert (row["width"], row["height"]) == expected


def test_outputs_and_results_match_the_probabilities(tmp_path):
    image = save(tmp_path / "lesion.jpg", Image.fromarray(rgb_image(128, 96)))
    out = tmp_path / "out"
    rows = predict_files([image], DiskSegmenter(), out, progress=False, save_probabilities="npy",
                         settings={"backend": "stub"})
    probs = np.load(out / "lesion_prob.npy")
    mask = np.asarray(Image.open(out / "lesion_mask.png")) == 255
    assert probs.shape == mask.shape == (128, 96) and probs.dtype == np.float32
    np.testing.assert_array_equal(mask, probs >= 0.5)
    expected = summarize(probs, mask).to_dict()
    row = rows[0]
    assert row["lesion_found"] and row["lesion_area_px"] == mask.sum() == expected["lesion_area_px"]
    ys, xs = np.nonzero(mask)
    assert row["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert row["mean_confidence"] == pytest.approx(probs[mask].mean(), abs=1e-6)
    assert row["lesion_fraction"] == pytest.approx(mask.mean())

    overlay = np.asarray(Image.open(out / "lesion_overlay.png"))
    green = (overlay == [0, 255, 0]).all(axis=2)
    assert green.any() and (green <= mask).all(), "the outline lies on the lesion's edge"
    assert not green[ys.min() + 10, xs.min() + 20], "the lesion's inside keeps the photo"

    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"] == {"backend": "stub", "threshold": 0.5} and saved["images"] == rows
    with open(out / "results.csv", newline="") as f:
        csv_row = next(csv.DictReader(f))
    assert int(csv_row["lesion_area_px"]) == row["lesion_area_px"] and int(csv_row["bbox_x1"]) == row["bbox"][2]
    assert not list(out.glob(".*.tmp")), "no temporary files left behind"


def test_probability_png_is_0_to_255(tmp_path):
    image = save(tmp_path / "a.png", Image.fromarray(rgb_image(64, 48)))
    predict_files([image], DiskSegmenter(), tmp_path, progress=False, save_probabilities="png")
    assert set(np.unique(np.asarray(Image.open(tmp_path / "a_prob.png")))) == {round(0.1 * 255), round(0.9 * 255)}


def test_erode_matches_pillow_min_filter():
    mask = np.random.default_rng(0).random((37, 53)) < 0.8
    for radius in (1, 3):
        pillow = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * radius + 1)))
        np.testing.assert_array_equal(erode(mask, radius), pillow > 0)


def test_no_lesion_is_reported_and_labelled_not_outlined(tmp_path, capsys):
    image = save(tmp_path / "clear.png", Image.fromarray(np.full((50, 70, 3), 200, np.uint8)))
    row = predict_files([image], DiskSegmenter(radius=0), tmp_path / "out", progress=False)[0]
    assert row["status"] == "ok" and row["lesion_found"] is False
    assert row["lesion_area_px"] == 0 and row["bbox"] is None and row["mean_confidence"] is None
    assert "no lesion found" in capsys.readouterr().out
    overlay = np.asarray(Image.open(tmp_path / "out" / "clear_overlay.png"))
    assert not (overlay == [0, 255, 0]).all(axis=2).any()
    assert (overlay != 200).any(), "the overlay carries a visible 'no lesion found' label"


def test_mask_png_reads_back_as_pillow_writes_it():
    mask = np.random.default_rng(0).random((37, 53)) < 0.3
    mask[5:30, 10:40] = True
    decoded = Image.open(io.BytesIO(encode_mask_png(mask)))
    assert decoded.mode == "L" and decoded.size == (53, 37)
    np.testing.assert_array_equal(np.asarray(decoded), mask.astype(np.uint8) * 255)


def test_notes_and_errors_are_whole_lines_and_the_bar_is_drawn_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    clear = [save(tmp_path / f"clear{i}.png", Image.fromarray(np.full((50, 70, 3), 200, np.uint8))) for i in range(3)]
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # an error among them
    inputs = [clear[0], tmp_path / "cut.png", *clear[1:]]
    predict_files(inputs, DiskSegmenter(radius=0), tmp_path / "log", progress=True, batch_size=1)
    captured = capsys.readouterr()  # not a terminal, as in a CI log
    lines = captured.out.splitlines() + captured.err.splitlines()
    assert "\r" not in captured.out + captured.err and all(ln.startswith(("note: ", "error: ")) for ln in lines), lines
    assert sum("no lesion found" in ln for ln in lines) == 3 and sum("cut.png" in ln for ln in lines) == 1

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    predict_files(inputs, DiskSegmenter(radius=0), tmp_path / "tty", progress=True, batch_size=1)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all(ln.startswith("note: ") and ln.endswith("< threshold 0.5)") for ln in out), out
    assert "4/4" in terminal.getvalue() and "error: " in terminal.getvalue()


def test_continue_skips_done_images_unless_settings_change(tmp_path):
    paths = [save(tmp_path / f"img{i}.png", Image.fromarray(rgb_image(seed=i))) for i in range(3)]
    out = tmp_path / "out"
    first = DiskSegmenter()
    predict_files(paths[:2], first, out, progress=False, batch_size=1)
    again = DiskSegmenter()
    rows = predict_files(paths, again, out, progress=False, skip_existing=True)
    assert again.seen == 1 and [Path(r["file"]).name for r in rows] == ["img0.png", "img1.png", "img2.png"]
    (out / "img0_overlay.png").unlink()
    predict_files(paths, again, out, progress=False, skip_existing=True)
    assert again.seen == 2, "an image with a missing output is done again"
    predict_files(paths, again, out, progress=False, skip_existing=True, threshold=0.3)
    assert again.seen == 5, "a new threshold redoes every image"


def test_same_stem_twice_is_an_error_not_an_overwrite(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        save(tmp_path / folder / "x.png", Image.fromarray(rgb_image()))
    rows = predict_files([tmp_path / "a", tmp_path / "b"], DiskSegmenter(), tmp_path / "out", progress=False)
    assert [r["status"] for r in rows] == ["ok", "error"] and "a/x.png" in rows[1]["error"]


def test_expand_inputs_folders_globs_and_duplicates(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.tiff", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    paths, errors = expand_inputs([tmp_path, str(tmp_path / "*.jpg"), tmp_path / "a.PNG",
                                   tmp_path / "notes.txt", str(tmp_path / "*.gif")])
    assert [p.name for p in paths] == ["a.PNG", "b.jpg", "c.tiff"]
    assert [e.source for e in errors] == [str(tmp_path / "notes.txt"), str(tmp_path / "*.gif")]


@pytest.mark.parametrize("bad, match", [(np.zeros((4, 4, 2), np.uint8), "(H, W)"),
                                        (np.full((4, 4), 2.0), "0..1"), (np.zeros((4, 4), np.int64), "dtype")])
def test_to_rgb_array_rejects_ambiguous_arrays(bad, match):
    with pytest.raises(ValueError, match=match):
        to_rgb_array(bad)


def test_segment_agrees_on_path_pil_and_numpy(tmp_path, checkpoint):
    rgb = rgb_image(90, 70)
    path = save(tmp_path / "img.png", Image.fromarray(rgb))
    by_path = scsonet.segment(path, weights=checkpoint, device="cpu")
    assert by_path.dtype == np.bool_ and by_path.shape == (90, 70)
    for image in (Image.open(path), rgb, np.dstack([rgb, np.full((90, 70), 255, np.uint8)]), rgb / 255.0):
        np.testing.assert_array_equal(scsonet.segment(image, weights=checkpoint, device="cpu"), by_path)
    assert not scsonet.segment(rgb, weights=checkpoint, device="cpu", threshold=1.0).any()
    with pytest.raises(ScsonetError, match="missing.png"):
        scsonet.segment(tmp_path / "missing.png", weights=checkpoint, device="cpu")


def test_segment_tta_averages_the_flipped_views(checkpoint):
    loaded = load_model(checkpoint)
    images = rgb_image(256, 256)[None]
    plain, tta = TorchSegmenter(loaded), TorchSegmenter(loaded, tta=True)
    views = [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    flipped = [plain.predict_probs(np.ascontiguousarray(v)) for v in views]
    expected = (flipped[0] + flipped[1][:, :, ::-1] + flipped[2][:, ::-1] + flipped[3][:, ::-1, ::-1]) / 4
    np.testing.assert_allclose(tta.predict_probs(images), expected, atol=1e-6)


def test_inference_pipeline_imports_without_torch():
    code = ("import sys, scsonet, scsonet.inference, scsonet.imageio, scsonet.postprocess; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_samples_are_shipped_and_readable():
    samples = sample_images()
    assert len(samples) == 6 and (samples[0].parent / "README.md").read_text().count("CC0") >= 1
    assert all(read_image(p).shape == (256, 256, 3) for p in samples)


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped weights not trained yet (scsonet_isic2017_v1.safetensors)")
def test_shipped_weights_find_the_sample_lesions(tmp_path):
    assert main(["predict", "--samples", "--out", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["images"]
    assert len(rows) == 6 and all(r["lesion_found"] for r in rows)
    assert all(0.01 < r["lesion_fraction"] < 0.9 for r in rows)
