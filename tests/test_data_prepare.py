"""scsonet data prepare: layouts (folders and zips), pairing by ID, splits, bad inputs, image modes."""
from __future__ import annotations

import csv
import io
import json
import os
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _synthdata import (OUT, check_pairs, encode, folder_dataset, image_array, isic_parts, mask_array,
                        write_files, write_zip)
from scsonet._checks import MIN_STD
from scsonet.cli.main import main
from scsonet.data.dataset import PreparedData
from scsonet.data.decode import binarize_mask, read_image, read_mask
from scsonet.data.layouts import list_pairs
from scsonet.data.prepare import channel_stats, prepare_dataset
from scsonet.errors import ScsonetError

SHARED_ISIC2017 = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2017"


def prepare(src: Path, out: Path, dataset: str = "folder", **kwargs) -> dict:
    kwargs = {"size": OUT, "workers": 1, "progress": False, **kwargs}
    return prepare_dataset(dataset, src, out, **kwargs)


def load_split(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    return (np.load(out / split / "images.npy"), np.load(out / split / "masks.npy"),
            (out / split / "ids.txt").read_text().split())


def check_all_pairs(out: Path) -> None:
    for split in json.loads((out / "manifest.json").read_text())["splits"]:
        check_pairs(*load_split(out, split))


def write_split_file(path: Path, assignment: dict[str, str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "split"])
        writer.writerows(assignment.items())
    return path


# -- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("as_zip", [False, True], ids=["folders", "zips"])
def test_isic2018_official_layout(tmp_path, as_zip):
    src = tmp_path / "isic2018"
    parts = {("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"): isic_parts(0, 12),
             ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"): isic_parts(12, 4)}
    for names, contents in parts.items():
        for name, files in zip(names, contents):
            if as_zip:
                write_zip(src / f"{name}.zip", name, files)
            else:
                write_files(src / name, files)
    m = prepare(src, tmp_path / "out", "isic2018", test_ratio=0.25, val_ratio=0.25, seed=3)
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 9, "val": 3, "test": 4}
    assert sorted(i for v in m["splits"].values() for i in v["ids"]) == [f"ISIC_{k:07d}" for k in range(16)]
    assert m["skipped"] == [] and m["warnings"] == []
    check_all_pairs(tmp_path / "out")


def test_isic2017_layout_ignores_superpixels_and_unlabelled_test(tmp_path):
    src = tmp_path / "isic2017"
    images, masks = isic_parts(0, 6)
    images.update({f"ISIC_{k:07d}_superpixels.png": encode(mask_array(0)) for k in range(6)})
    write_files(src / "ISIC-2017_Training_Data", images)
    write_files(src / "ISIC-2017_Training_Part1_GroundTruth", masks)
    write_zip(src / "ISIC-2017_Test_v2_Data.zip", "ISIC-2017_Test_v2_Data", isic_parts(6, 2)[0])
    m = prepare(src, tmp_path / "out", "isic2017", test_ratio=0.0, val_ratio=0.0)
    assert m["splits"]["train"]["count"] == 6 and list(m["splits"]) == ["train"]
    assert any("ISIC-2017_Test_v2_Data" in note for note in m["notes"])
    check_all_pairs(tmp_path / "out")


@pytest.mark.parametrize("suffix", ["", "_segmentation", "_mask", "_Segmentation"])
def test_folder_layout_mask_suffixes(tmp_path, suffix):
    listing = list_pairs("folder", folder_dataset(tmp_path, n=3, mask_suffix=suffix))
    assert [p.id for p in listing.pairs] == ["img0", "img1", "img2"] and not listing.problems


def test_shuffled_listing_still_pairs_by_id(tmp_path, monkeypatch):
    """Listing order is scrambled differently for images and masks, in folders and in zips.

    The IDs alone also sort differently from their mask names ("img1" < "img10" but
    "img10_mask" < "img1_mask"), so any pairing by position would mix pairs up.
    """
    src = folder_dataset(tmp_path / "src", n=12)
    (tmp_path / "zipped").mkdir()
    for name in ("images", "masks"):
        write_zip(tmp_path / "zipped" / f"{name}.zip", name, {p.name: p.read_bytes() for p in (src / name).iterdir()})
    rng = random.Random(0)
    real_walk, real_infolist = os.walk, zipfile.ZipFile.infolist

    def shuffled_walk(*args, **kwargs):
        for folder, dirs, files in real_walk(*args, **kwargs):
            rng.shuffle(files)
            yield folder, dirs, files

    def shuffled_infolist(self):
        infos = list(real_infolist(self))
        rng.shuffle(infos)
        return infos

    monkeypatch.setattr(os, "walk", shuffled_walk)
    monkeypatch.setattr(zipfile.ZipFile, "infolist", shuffled_infolist)
    for name in ("src", "zipped"):
        prepare(tmp_path / name, tmp_path / f"out_{name}", test_ratio=0.3)
        check_all_pairs(tmp_path / f"out_{name}")


def test_process_pool_gives_the_same_arrays(tmp_path):
    src = folder_dataset(tmp_path / "src", n=16)
    prepare(src, tmp_path / "one", workers=1)
    prepare(src, tmp_path / "two", workers=2)
    for split in ("train", "val", "test"):
        for one, two in zip(load_split(tmp_path / "one", split), load_split(tmp_path / "two", split)):
            np.testing.assert_array_equal(one, two)


# -- splits and manifest -------------------------------------------------------------------------


def test_split_file_is_followed_exactly(tmp_path):
    src = folder_dataset(tmp_path / "src", n=10)
    assignment = {f"img{k}": ("train", "val", "test", "train")[k % 4] for k in range(10)}
    m = prepare(src, tmp_path / "out", split_file=write_split_file(tmp_path / "split.csv", assignment))
    for split, info in m["splits"].items():
        assert info["ids"] == sorted(i for i, s in assignment.items() if s == split)
        assert load_split(tmp_path / "out", split)[2] == info["ids"]
    assert m["split"]["method"] == "file"


def test_random_split_is_seeded(tmp_path):
    src = folder_dataset(tmp_path / "src", n=20)
    a = prepare(src, tmp_path / "a", seed=1, test_ratio=0.3, val_ratio=0.25)
    b = prepare(src, tmp_path / "b", seed=1, test_ratio=0.3, val_ratio=0.25)
    c = prepare(src, tmp_path / "c", seed=2, test_ratio=0.3, val_ratio=0.25)
    assert {s: v["count"] for s, v in a["splits"].items()} == {"train": 10, "val": 4, "test": 6}
    assert a["splits"] == b["splits"] != c["splits"]


def test_manifest_stats_checksums_and_layout(tmp_path):
    m = prepare(folder_dataset(tmp_path / "src", n=10), tmp_path / "out")
    out = tmp_path / "out"
    images, masks, ids = load_split(out, "train")
    assert images.shape == (len(ids), OUT, OUT, 3) and masks.shape == (len(ids), OUT, OUT)
    assert images.dtype == masks.dtype == np.uint8
    x = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(m["stats"]["mean"], x.mean(0), atol=1e-6)
    np.testing.assert_allclose(m["stats"]["std"], np.maximum(x.std(0), MIN_STD), atol=1e-6)  # a flat channel: MIN_STD
    assert m["format"] == "scsonet-prepared-v1" and m["size"] == [OUT, OUT]
    assert sorted(m["files"]) == sorted(f"{s}/{f}" for s in m["splits"] for f in ("images.npy", "masks.npy", "ids.txt"))
    assert json.loads((out / "manifest.json").read_text()) == m


@pytest.mark.parametrize("stats", [{"mean": [0.5] * 3, "std": [0.0] * 3}, {"mean": [0.5] * 3}, [0.5, 0.2]])
def test_manifest_with_unusable_stats_is_refused(tmp_path, stats):
    prepare(folder_dataset(tmp_path / "src", n=4), tmp_path / "out", test_ratio=0.0, val_ratio=0.0)
    manifest = tmp_path / "out" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["stats"] = stats
    manifest.write_text(json.dumps(m))
    with pytest.raises(ScsonetError, match=r"manifest.json.*(std|mean|stats)"):
        PreparedData(tmp_path / "out")


def test_channel_stats_chunking_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    mean, std = channel_stats(images, chunk=3)
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0) / 255, atol=1e-6)
    np.testing.assert_allclose(std, images.reshape(-1, 3).std(0) / 255, atol=1e-6)


def test_existing_output_needs_overwrite(tmp_path):
    src = folder_dataset(tmp_path / "src", n=4)
    prepare(src, tmp_path / "out", test_ratio=0.0, val_ratio=0.0)
    with pytest.raises(ScsonetError, match="already exists"):
        prepare(src, tmp_path / "out")
    prepare(src, tmp_path / "out", overwrite=True, test_ratio=0.5)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["test"]["count"] == 2


# -- bad inputs ----------------------------------------------------------------------------------


def _add(name: str, data: bytes):
    return lambda src: (src / name).write_bytes(data)


def _split_file(assignment_of):
    return lambda src: write_split_file(src / "split.csv", assignment_of({f"img{k}": "train" for k in range(6)}))


BAD_INPUTS = {
    # name: (change to a good 6-pair folder dataset, file the error must name, pairs left with --skip-bad)
    "image without mask": (_add("images/lonely.png", encode(image_array(1))), "lonely.png", 6),
    "mask without image": (_add("masks/orphan_mask.png", encode(mask_array(1))), "orphan_mask.png", 6),
    "duplicate id": (_add("images/img3.jpg", encode(image_array(3), "JPEG")), "img3.jpg", 5),
    "corrupt image": (_add("images/img2.png", b"\x89PNG\r\n\x1a\n garbage"), "img2.png", 5),
    "truncated image": (_add("images/img2.png", encode(image_array(2))[:60]), "img2.png", 5),
    "non-image file": (_add("images/notes.txt", b"hello"), "notes.txt", 6),
    "non-binary mask": (_add("masks/img4_mask.png", encode(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1)))),
                        "img4_mask.png", 5),
    "label-map mask": (_add("masks/img4_mask.png", encode((np.arange(32 * 32) % 3).astype(np.uint8).reshape(32, 32))),
                       "img4_mask.png", 5),
    "split file names unknown id": (_split_file(lambda a: {**a, "ghost": "test"}), "split.csv", 6),
    "split file misses ids": (_split_file(lambda a: {k: v for k, v in a.items() if k != "img5"}), "split.csv", 5),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_and_leaves_no_output(tmp_path, case):
    change, named, left = BAD_INPUTS[case]
    src = folder_dataset(tmp_path / "src", n=6)
    change(src)
    split_file = src / "split.csv" if (src / "split.csv").exists() else None
    with pytest.raises(ScsonetError, match=named.replace(".", r"\.")) as err:
        prepare(src, tmp_path / "out", split_file=split_file, test_ratio=0.0, val_ratio=0.0)
    assert "\n" not in str(err.value) and "--skip-bad" in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, no temporary leftovers

    m = prepare(src, tmp_path / "out", split_file=split_file, test_ratio=0.0, val_ratio=0.0, skip_bad=True)
    assert sum(v["count"] for v in m["splits"].values()) == left
    assert any(named in s["file"] for s in m["skipped"])
    check_all_pairs(tmp_path / "out")


@pytest.mark.parametrize("fill, warning", [(0, "no foreground"), (255, "no background")])
def test_mask_without_foreground_or_background_is_reported_not_fatal(tmp_path, fill, warning):
    src = folder_dataset(tmp_path / "src", n=4)
    (src / "masks" / "img1_mask.png").write_bytes(encode(np.full((32, 32), fill, np.uint8)))
    m = prepare(src, tmp_path / "out", test_ratio=0.0, val_ratio=0.0)
    assert m["splits"]["train"]["count"] == 4
    assert len(m["warnings"]) == 1 and warning in m["warnings"][0] and "img1_mask.png" in m["warnings"][0]


@pytest.mark.parametrize("layout, setup, message", [
    ("folder", lambda src: None, "source folder not found"),
    ("folder", lambda src: (src / "images").mkdir(parents=True), "no masks/"),
    ("folder", lambda src: [(src / d).mkdir(parents=True) for d in ("images", "masks")], "no image files"),
    ("isic2018", lambda src: src.mkdir(), "no ISIC 2018 data found"),
    ("folder", lambda src: [(src / "masks").mkdir(parents=True), (src / "images.zip").write_bytes(b"nope")],
     "not a readable zip"),
])
def test_missing_or_empty_source(tmp_path, layout, setup, message):
    src = tmp_path / "src"
    setup(src)
    with pytest.raises(ScsonetError, match=message):
        prepare(src, tmp_path / "out", dataset=layout)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ("id,which\nimg0,train\n", "needs columns image_id and split"),
    ("image_id,split\nimg0,training\n", "line 2: split 'training'"),
    ("image_id,split\nimg0,train\nimg0,test\n", "line 3: image_id 'img0' appears twice"),
])
def test_malformed_split_file(tmp_path, content, message):
    (tmp_path / "split.csv").write_text(content)
    with pytest.raises(ScsonetError, match=message):
        prepare(folder_dataset(tmp_path / "src", n=2), tmp_path / "out", split_file=tmp_path / "split.csv")


# -- image modes ---------------------------------------------------------------------------------


def test_image_modes_become_rgb():
    rgb = image_array(3, 8, 8)
    for mode in ("L", "RGBA", "P", "CMYK", "1"):
        out = read_image(_encode_mode(rgb, mode), mode)
        assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    grey16 = Image.fromarray(np.full((8, 8), 65535 // 3, np.uint16))
    buf = io.BytesIO()
    grey16.save(buf, format="PNG")
    np.testing.assert_array_equal(read_image(buf.getvalue(), "x16"), np.full((8, 8, 3), 85, np.uint8))
    np.testing.assert_array_equal(read_image(_encode_mode(rgb, "RGBA"), "x"), rgb)


def _encode_mode(rgb: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    return buf.getvalue()


def test_exif_orientation_is_applied():
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = read_image(buf.getvalue(), "rotated.jpg")
    assert out.shape == (20, 10, 3)
    assert out[:8].mean() > 200 and out[12:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("values, full_range", [((0, 1), 255), ((0, 255), 255), ((0, 65535), 65535), ((0, 38), 255)])
def test_mask_value_conventions(values, full_range):
    mask = np.array([[values[0], values[1]], [values[1], values[0]]])
    np.testing.assert_array_equal(binarize_mask(mask, full_range, "m"), [[0, 1], [1, 0]])


def test_noisy_jpeg_mask_is_thresholded_and_16bit_mask_read():
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    out = read_mask(encode(mask, "JPEG"), "m.jpg")
    assert set(np.unique(out)) == {0, 1} and abs(int(out.sum()) - 32 * 32) < 64
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint16) * 257).save(buf, format="PNG")
    np.testing.assert_array_equal(read_mask(buf.getvalue(), "m16.png", (32, 32)), mask[::2, ::2] // 255)


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_prepare_and_show(tmp_path, capsys):
    src = folder_dataset(tmp_path / "src", n=6)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--dataset", "folder", "--src", str(src), "--out", str(out),
                 "--size", "16", "--no-progress", "--workers", "1"]) == 0
    assert "train 4 / test 2 pairs at 16x16" in capsys.readouterr().out
    assert main(["data", "show", str(out), "--n", "3", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 16
    assert main(["data", "show", str(out), "--out", str(tmp_path / "grid.xyz")]) == 2
    assert "unknown picture format" in capsys.readouterr().err
    assert main(["data", "prepare", "--dataset", "folder", "--src", str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


# -- the real ISIC 2017 copy -----------------------------------------------------------------------


def _need_real_data() -> None:
    if not (SHARED_ISIC2017 / "split_7_3.csv").exists():
        pytest.skip(f"real ISIC 2017 data not found at {SHARED_ISIC2017}")


@pytest.mark.realdata
def test_real_isic2017_pairs_match_split_file():
    _need_real_data()
    listing = list_pairs("isic2017", SHARED_ISIC2017)
    assert not listing.problems and len(listing.pairs) == 2150
    with open(SHARED_ISIC2017 / "split_7_3.csv") as f:
        split = {row["image_id"]: row["split"] for row in csv.DictReader(f)}
    assert {p.id for p in listing.pairs} == set(split)
    assert all(p.mask.name == f"{p.id}_segmentation.png" for p in listing.pairs)
    pair = listing.pairs[0]  # its mask is full resolution, its image 256 x 256
    mask = read_mask(pair.mask.read_bytes(), str(pair.mask), (256, 256))
    assert mask.shape == (256, 256) and 0 < mask.mean() < 1


@pytest.mark.realdata
@pytest.mark.slow
def test_real_isic2017_prepare_acceptance(isic2017_prepared):
    m = PreparedData(isic2017_prepared).manifest
    assert {s: v["count"] for s, v in m["splits"].items()} == {"train": 1350, "val": 150, "test": 650}
    assert not m["skipped"]
    with open(SHARED_ISIC2017 / "split_7_3.csv") as f:
        expected = {}
        for row in csv.DictReader(f):
            expected.setdefault(row["split"], set()).add(row["image_id"])
    assert {s: set(v["ids"]) for s, v in m["splits"].items()} == expected


def test_mask_outline_is_the_inner_border():
    from scsonet.data.show import mask_outline

    mask = np.zeros((10, 10), np.uint8)
    mask[2:8, 2:8] = 1
    outline = mask_outline(mask, width=1)
    expected = mask.astype(bool)
    expected[3:7, 3:7] = False
    np.testing.assert_array_equal(outline, expected)
