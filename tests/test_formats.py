"""Every format Pillow reads segments, in a folder and by name; a folder's other files are each
named in a line; the first frame of an animation is the one segmented."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

from scsonet import imageio
from scsonet.imageio import IMAGE_SUFFIXES, expand_inputs, read_image
from scsonet.inference import predict_files

HAVE_HEIF = importlib.util.find_spec("pillow_heif") is not None
FIRST, SECOND = (200, 40, 40), (20, 20, 220)  # an animation's two frames


class MeanSegmenter:
    """A numpy stand-in model: lesion everywhere; records each image's mean colour it was given."""

    input_size = (16, 16)

    def __init__(self):
        self.means: list[tuple[int, ...]] = []

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        self.means += [tuple(int(round(c)) for c in img.reshape(-1, 3).mean(0)) for img in images]
        return np.full((len(images), *self.input_size), 0.9, np.float32)


def _frame(colour, size=(20, 14)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _write_images(folder) -> dict[str, tuple[int, int, int]]:
    """One file per format -> the colour its (first) frame has."""
    folder.mkdir(exist_ok=True)
    colours = {}
    for name, kwargs in (("a.png", {}), ("b.jpg", {"quality": 100}), ("c.bmp", {}), ("d.tiff", {}),
                         ("e.webp", {"lossless": True})):
        _frame(FIRST).save(folder / name, **kwargs)
        colours[name] = FIRST
    # Animated GIF and WebP: the first frame is segmented, not the second.
    for name, kwargs in (("f.gif", {}), ("g.webp", {"lossless": True})):
        _frame(FIRST).save(folder / name, save_all=True, append_images=[_frame(SECOND)], duration=100, loop=0,
                           **kwargs)
        colours[name] = FIRST
    if HAVE_HEIF:
        import pillow_heif

        pillow_heif.register_heif_opener()
        _frame(FIRST).save(folder / "h.heic", quality=100)
        colours["h.heic"] = FIRST
    return colours


def test_suffixes_cover_the_common_formats_and_only_decodable_ones():
    for suffix in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"):
        assert suffix in IMAGE_SUFFIXES
    # Stubs and MPEG are identified by Pillow but never decoded: not offered as images.
    for suffix in (".wmf", ".emf", ".mpg", ".h5", ".grib", ".txt", ".pdf"):
        assert suffix not in IMAGE_SUFFIXES
    assert (".heic" in IMAGE_SUFFIXES) == HAVE_HEIF


def test_first_frame_of_an_animation(tmp_path):
    colours = _write_images(tmp_path)
    for name in ("f.gif", "g.webp"):
        assert Image.open(tmp_path / name).n_frames == 2
        rgb = read_image(tmp_path / name)
        assert rgb.shape == (14, 20, 3)
        np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), colours[name], atol=3)


def test_folder_of_every_format_segments_and_other_files_are_each_named(tmp_path, capsys):
    colours = _write_images(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "README").write_text("no suffix")
    (tmp_path / "in" / "sub").mkdir()  # folders are not searched, and not reported
    seg = MeanSegmenter()
    rows = predict_files([tmp_path / "in"], seg, tmp_path / "out", progress=False)

    by_name = {r["file"].rsplit("/", 1)[-1]: r for r in rows}
    assert sorted(by_name) == sorted(colours)  # the two strays are skipped: no rows, no failures
    # Every image segmented: a mask at each file's own size, the first frame's colour seen.
    ok = {name for name, r in by_name.items() if r["status"] == "ok"}
    assert ok == set(colours)
    for name in ok:
        assert (by_name[name]["width"], by_name[name]["height"]) == (20, 14)
        stem = name.rsplit(".", 1)[0]
        assert Image.open(tmp_path / "out" / f"{stem}_mask.png").size == (20, 14)
    assert len(seg.means) == len(colours)
    for mean in seg.means:
        np.testing.assert_allclose(mean, FIRST, atol=6)  # lossy JPEG/HEIC; never SECOND
    # Each stray file named in one line of its own, saying why.
    err_lines = capsys.readouterr().err.splitlines()
    for stray, why in (("notes.txt", "'.txt' files are not images"), ("README", "files without a suffix")):
        lines = [ln for ln in err_lines if stray in ln]
        assert len(lines) == 1 and lines[0].startswith("note: ") and why in lines[0] and "skipped in folder" in lines[0]
    results = json.loads((tmp_path / "out" / "results.json").read_text())["images"]
    assert len(results) == len(rows)


def test_cli_skips_a_stray_file_in_a_folder_and_refuses_one_named_directly(tmp_path, capsys, monkeypatch):
    from scsonet.cli import predict as cli_predict
    from scsonet.cli.main import main

    _write_images(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    monkeypatch.setattr(cli_predict, "_torch_segmenter", lambda args: (MeanSegmenter(), "stub"))
    argv = ["--out", str(tmp_path / "out"), "--quiet", "--backend", "torch"]
    assert main(["predict", str(tmp_path / "in"), *argv]) == 0
    captured = capsys.readouterr()
    assert [ln for ln in captured.err.splitlines() if "notes.txt" in ln] == [captured.err.strip()]
    assert "0 failed" in captured.out
    # Named directly, it is a mistake in the command: one error line, exit 2, nothing written.
    assert main(["predict", str(tmp_path / "in" / "a.png"), str(tmp_path / "in" / "notes.txt"),
                 "--out", str(tmp_path / "other"), "--quiet", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scsonet predict: error: ") and "notes.txt: unsupported file type '.txt'" in err
    assert err.count("\n") == 1 and not (tmp_path / "other").exists()


def test_each_format_by_name_and_by_pattern(tmp_path):
    colours = _write_images(tmp_path)
    (tmp_path / "x.txt").write_text("")
    paths, errors = expand_inputs([*(tmp_path / n for n in colours), str(tmp_path / "*")])
    assert sorted(p.name for p in paths) == sorted(colours)  # each once, though named twice
    assert [(e.source, e.skipped) for e in errors] == [(str(tmp_path / "x.txt"), True)]
    assert "matched by" in errors[0].message


def test_a_stray_file_named_twice_is_reported_once(tmp_path):
    (tmp_path / "x.txt").write_text("")
    _frame(FIRST).save(tmp_path / "a.png")
    _, errors = expand_inputs([tmp_path, tmp_path])
    assert [e.source for e in errors] == [str(tmp_path / "x.txt")]


def test_a_file_with_an_image_suffix_that_is_not_one_is_one_error(tmp_path):
    (tmp_path / "fake.webp").write_bytes(b"not a webp at all")
    with pytest.raises(imageio.ScsonetError, match=r"fake\.webp: not an image Pillow reads"):
        read_image(tmp_path / "fake.webp")


@pytest.mark.skipif(HAVE_HEIF, reason="pillow-heif is installed: HEIC is read, see the folder test")
def test_heic_without_the_plugin_is_named_as_not_an_image(tmp_path):
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    paths, errors = expand_inputs([tmp_path, tmp_path / "photo.heic"])
    assert paths == [] and "'.heic' files are not images" in errors[0].message
    assert all("pip install 'scsonet[heic]'" in e.message for e in errors if e.source.endswith(".heic"))


@pytest.mark.skipif(not HAVE_HEIF, reason="pillow-heif is not installed (pip install scsonet[heic])")
def test_heic_with_the_plugin(tmp_path):
    colours = _write_images(tmp_path)
    assert "h.heic" in colours
    np.testing.assert_allclose(read_image(tmp_path / "h.heic").reshape(-1, 3).mean(0), FIRST, atol=6)
