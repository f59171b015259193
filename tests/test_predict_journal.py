"""scsonet predict survives interruption, concurrent runs and bad files: the results.jsonl
journal, --continue after SIGKILL/SIGTERM, the folder lock, decompression bombs, --out errors."""
from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import scsonet.cli.predict as cli_predict
import scsonet.imageio as imageio
import scsonet.inference as inference
from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.imageio import read_image
from scsonet.inference import JOURNAL_NAME, predict_files
from scsonet.models import create_model
from test_predict import DiskSegmenter, rgb_image, save

posix_only = pytest.mark.skipif(os.name != "posix", reason="signals and flock are POSIX")

# `scsonet predict` in a fresh process, with a numpy stand-in for the model (no torch import, a
# fixed delay per image): the CLI, signal handling, journal and lock are the real ones.
DRIVER = r"""
import os, sys, time
import numpy as np
import scsonet.cli.predict as cli_predict
from scsonet.cli.main import main

class Stub:
    input_size = (16, 16)
    def predict_probs(self, images):
        time.sleep(DELAY * len(images))
        return np.full((len(images), 16, 16), 0.9, np.float32)

DELAY, GO = float(sys.argv[1]), sys.argv[2]
cli_predict._torch_segmenter = lambda args: (Stub(), "stub")
if GO != "-":  # start together with the other runs: say ready, wait for the go
    open(f"{GO}.ready.{os.getpid()}", "w").close()
    while not os.path.exists(GO):
        time.sleep(0.005)
sys.exit(main(sys.argv[3:]))
"""


def _images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [save(folder / f"img{i:02d}.png", Image.fromarray(rgb_image(24, 32, seed=i)))
            for i in range(start, start + count)]


def _spawn(tmp_path: Path, inputs, out: Path, *extra: str, delay: float = 0.03, go: str = "-") -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    argv = [sys.executable, str(driver), str(delay), go, "predict", *map(str, inputs), "--out", str(out),
            "--quiet", "--batch-size", "1", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _journal(out: Path, torn_end_ok: bool = False) -> list[dict]:
    """The journal's lines; json.loads raises on a damaged one. ``torn_end_ok``: after a SIGKILL,
    a last line without its newline is left out."""
    lines = (out / JOURNAL_NAME).read_bytes().split(b"\n")
    assert torn_end_ok or lines[-1] == b"", "every line ends with a newline"
    return [json.loads(line) for line in lines[:-1]]


def _wait_for_lines(out: Path, count: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        journal = out / JOURNAL_NAME
        if journal.exists() and journal.read_bytes().count(b"\n") >= count:
            return
        assert proc.poll() is None, f"predict ended early: {proc.communicate()}"
        time.sleep(0.005)
    raise AssertionError(f"the journal did not reach {count} lines in {timeout} s")


def _results(out: Path) -> tuple[list[dict], list[dict]]:
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    return json.loads((out / "results.json").read_text())["images"], csv_rows


def _assert_every_image_once_ok(out: Path, images: list[Path]) -> None:
    json_rows, csv_rows = _results(out)
    for rows in (json_rows, csv_rows):
        assert sorted(r["file"] for r in rows) == sorted(map(str, images))
        assert {r["status"] for r in rows} == {"ok"}


def _mtimes(out: Path, files) -> dict[str, int]:
    return {f: (out / f"{Path(f).stem}_mask.png").stat().st_mtime_ns for f in files}


def _kill_then_continue(tmp_path: Path, sig: int) -> tuple[subprocess.Popen, list[Path], Path]:
    images, out = _images(tmp_path / "in", 40), tmp_path / "out"
    proc = _spawn(tmp_path, [tmp_path / "in"], out, "--continue")
    _wait_for_lines(out, 5, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc, images, out


def _rerun_and_check(tmp_path: Path, images: list[Path], out: Path) -> None:
    done = [e["file"] for e in _journal(out, torn_end_ok=True)]
    assert 5 <= len(done) < len(images), "killed midway"
    before = _mtimes(out, done)
    rerun = _spawn(tmp_path, [tmp_path / "in"], out, "--continue", delay=0.0)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert f"{len(images) - len(done)} image(s) segmented, {len(done)} already done" in stdout
    assert _mtimes(out, done) == before, "no image finished before the kill is segmented again"
    assert sorted(e["file"] for e in _journal(out)) == sorted(map(str, images)), "each image done once"
    _assert_every_image_once_ok(out, images)


@posix_only
def test_sigkill_midway_then_continue_redoes_nothing_finished(tmp_path):
    proc, images, out = _kill_then_continue(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    _rerun_and_check(tmp_path, images, out)


@posix_only
def test_sigterm_rebuilds_the_results_then_continue_redoes_nothing_finished(tmp_path):
    proc, images, out = _kill_then_continue(tmp_path, signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "scsonet predict: terminated; finished images are recorded, rerun with --continue"]
    json_rows, csv_rows = _results(out)  # rebuilt on the way out: exactly what the journal holds
    done = [e["file"] for e in _journal(out)]
    assert [r["file"] for r in json_rows] == [r["file"] for r in csv_rows] == done
    _rerun_and_check(tmp_path, images, out)


@posix_only
@pytest.mark.parametrize("overlap", [0, 10])
def test_concurrent_runs_into_one_folder_keep_every_row(tmp_path, overlap):
    images = _images(tmp_path / "in", 40)
    halves = [images[:20 + overlap // 2], images[20 - overlap // 2:]]
    out, go = tmp_path / "out", tmp_path / "go"
    # The second run has --tta (the stand-in ignores it): its rows' settings say which run wrote them.
    procs = [_spawn(tmp_path, half, out, *extra, delay=0.02, go=str(go))
             for half, extra in zip(halves, [[], ["--tta"]])]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.ready.*"))) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.005)
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    journal = _journal(out)  # no line lost or torn by the other writer
    assert len(journal) == 40 + overlap
    writers = [e["settings"]["tta"] for e in journal]
    assert writers.count(True) == len(halves[1]) and writers not in (sorted(writers), sorted(writers, reverse=True)), \
        "the two runs' lines interleave: they ran at once"
    _assert_every_image_once_ok(out, images)


@posix_only
def test_journal_appends_wait_for_the_folder_lock(tmp_path):
    import fcntl

    _images(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / ".results.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as another run appending or rebuilding results.csv
    try:
        proc = _spawn(tmp_path, [tmp_path / "in"], out, delay=0.0)
        deadline = time.monotonic() + 60
        while not (out / "img00_mask.png").exists():  # its first image is written...
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
        time.sleep(0.3)
        assert proc.poll() is None and not (out / JOURNAL_NAME).exists(), "...and its append waits"
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert proc.wait(timeout=60) == 0 and len(_journal(out)) == 3


def test_torn_last_journal_line_is_ignored_and_its_image_done_again(tmp_path):
    paths, out = _images(tmp_path / "in", 3), tmp_path / "out"
    predict_files(paths, DiskSegmenter(), out, progress=False, batch_size=1)
    journal = out / JOURNAL_NAME
    data = journal.read_bytes()
    journal.write_bytes(data[:-40])  # a kill in the middle of the last append
    again = DiskSegmenter()
    rows = predict_files(paths, again, out, progress=False, skip_existing=True)
    assert again.seen == 1, "the image of the torn line is not taken for done"
    assert rows.already_done == 2 and [r["status"] for r in rows] == ["ok"] * 3
    lines = journal.read_bytes().split(b"\n")
    assert lines[2] == data.split(b"\n")[2][:-39], "the torn line is kept apart, not extended"
    assert [json.loads(line)["file"] for line in lines[:2] + lines[3:-1]] == list(map(str, paths))
    _assert_every_image_once_ok(out, paths)


def test_results_keep_other_runs_rows_with_their_settings(tmp_path):
    paths, out = _images(tmp_path / "in", 3), tmp_path / "out"
    predict_files(paths[:2], DiskSegmenter(), out, progress=False, settings={"backend": "stub"})
    rows = predict_files(paths[1:], DiskSegmenter(), out, progress=False, threshold=0.3,
                         settings={"backend": "stub"})
    assert [r["file"] for r in rows] == list(map(str, paths[1:])) and "settings" not in rows[0]
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"] == {"backend": "stub", "threshold": 0.3}
    assert [r["file"] for r in saved["images"]] == list(map(str, [paths[1], paths[2], paths[0]]))
    assert saved["images"][2]["settings"] == {"backend": "stub", "threshold": 0.5}
    assert all("settings" not in r for r in saved["images"][:2])
    csv_rows = _results(out)[1]
    assert [json.loads(r["settings"]) if r["settings"] else None for r in csv_rows] == [
        None, None, {"backend": "stub", "threshold": 0.5}]


def test_a_later_file_with_the_same_stem_owns_the_outputs(tmp_path):
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    first, second = (save(d / "x.png", Image.fromarray(rgb_image(seed=i))) for i, d in enumerate((a, b)))
    out = tmp_path / "out"
    predict_files([first], DiskSegmenter(), out, progress=False)
    predict_files([second], DiskSegmenter(), out, progress=False)  # overwrites x_mask.png
    assert [r["file"] for r in _results(out)[0]] == [str(second)]
    again = DiskSegmenter()
    predict_files([first], again, out, progress=False, skip_existing=True)
    assert again.seen == 1, "its outputs were overwritten: not done"


def _png(path: Path, width: int, height: int, truncated: bool = False) -> Path:
    """A 1-bit black PNG of any size made in little memory; ``truncated``: its header only."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compress = zlib.compressobj(9)
    idat = b"" if truncated else b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + (b"" if truncated else chunk(b"IEND", b"")))
    return path


def test_read_image_refuses_decompression_bombs_and_reads_a_phone_photo(tmp_path):
    for name, (w, h, truncated), size in [("claims.png", (15000, 12000, True), "180.0"),
                                          ("bomb.png", (15000, 12000, False), "180.0"),
                                          ("warns.png", (11000, 9000, False), "99.0")]:
        with pytest.raises(ScsonetError, match=rf"{name}: image of {size} megapixels is over the limit of 89.5"):
            read_image(_png(tmp_path / name, w, h, truncated))
    phone = tmp_path / "phone.jpg"
    Image.new("RGB", (4000, 3000), (180, 120, 100)).save(phone, quality=80)  # 12 MP
    assert read_image(phone).shape == (3000, 4000, 3)
    assert read_image(_png(tmp_path / "ok.png", 300, 200)).shape == (200, 300, 3)


def test_read_image_out_of_memory_is_one_error_naming_the_file(tmp_path, monkeypatch):
    def no_memory(img):
        raise MemoryError

    monkeypatch.setattr(imageio, "_pil_to_rgb", no_memory)
    with pytest.raises(ScsonetError, match=r"big.png: not enough memory to decode this 60x40 image"):
        read_image(save(tmp_path / "big.png", Image.fromarray(rgb_image())))


def test_every_kind_of_bad_file_is_one_line_and_an_error_row_the_rest_are_done(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    good = _images(folder, 3)
    bad = {"claims.png": _png(folder / "claims.png", 15000, 12000, truncated=True),
           "bomb.png": _png(folder / "bomb.png", 15000, 12000),
           "warns.png": _png(folder / "warns.png", 11000, 9000),
           "text.png": folder / "text.png", "cut.jpg": folder / "cut.jpg",
           "hostile.png": save(folder / "hostile.png", Image.fromarray(rgb_image())),
           "huge.png": save(folder / "huge.png", Image.fromarray(rgb_image(30, 1200)))}
    bad["text.png"].write_text("not an image")
    Image.fromarray(rgb_image(200, 300)).save(tmp_path / "whole.jpg")
    bad["cut.jpg"].write_bytes((tmp_path / "whole.jpg").read_bytes()[:3000])
    phone = folder / "phone.jpg"
    Image.new("RGB", (4000, 3000), (180, 120, 100)).save(phone, quality=80)
    good.append(phone)

    real_read, real_predict = inference.read_draft, inference.predict_maps

    def read(path, *args):  # a Pillow plugin tripping over a crafted file
        if Path(path).name == "hostile.png":
            raise ZeroDivisionError("division by zero")
        return real_read(path, *args)

    def predict(images, *args):  # the widest image does not fit in memory
        if any(rgb.shape[1] == 1200 for rgb in images):
            raise MemoryError
        return real_predict(images, *args)

    monkeypatch.setattr(inference, "read_draft", read)
    monkeypatch.setattr(inference, "predict_maps", predict)
    monkeypatch.setattr(cli_predict, "_torch_segmenter", lambda args: (DiskSegmenter(), "stub"))
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--out", str(out), "--quiet", "--batch-size", "4"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == len(bad) and "Traceback" not in captured.err, errors
    for name in bad:
        assert sum(name in line for line in errors) == 1, (name, errors)
    assert "huge.png: not enough memory to segment its 1200x30 pixels" in captured.err
    assert "hostile.png: cannot decode the image (ZeroDivisionError" in captured.err
    assert f"{len(good)} image(s) segmented" in captured.out
    for rows in _results(out):
        status = {Path(r["file"]).name: r["status"] for r in rows}
        assert status == {**dict.fromkeys(bad, "error"), **{p.name: "ok" for p in good}}
    assert all((out / f"{p.stem}_mask.png").exists() for p in good)
    assert Image.open(out / "phone_mask.png").size == (4000, 3000)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("scsonet predict: error: ")
    return lines[0]


@pytest.fixture
def stub_backend(monkeypatch, tmp_path):
    monkeypatch.setattr(cli_predict, "_torch_segmenter", lambda args: (DiskSegmenter(), "stub"))
    return save(tmp_path / "img.png", Image.fromarray(rgb_image()))


def test_out_under_a_file_is_one_error_line(tmp_path, stub_backend, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["predict", str(stub_backend), "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "afile/sub" in _one_error_line(capsys)


def test_unwritable_out_is_one_error_line_and_writes_nothing(tmp_path, stub_backend, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def refuse(path, *args, **kwargs):  # what chmod 0o500 does to a user who is not root
        if Path(os.fsdecode(path)).parent == out:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert main(["predict", str(stub_backend), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert str(out) in line and "Permission denied" in line
    assert list(out.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("out", ["/proc/self", "/proc/self/sub"])
def test_out_in_proc_is_one_error_line(stub_backend, capsys, out):
    assert main(["predict", str(stub_backend), "--out", out]) == 2
    assert out in _one_error_line(capsys)


@posix_only
@pytest.mark.slow
def test_real_cli_sigkill_then_continue(tmp_path):
    """The installed entry point with a random SCSONet (run at 32 x 32 to be quick)."""
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save({"model": create_model("scsonet").state_dict(), "model_name": "scsonet", "model_args": {},
                "preprocessing": {"resize_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}, weights)
    images, out = _images(tmp_path / "in", 16), tmp_path / "out"
    argv = [sys.executable, "-m", "scsonet.cli.main", "predict", str(tmp_path / "in"), "--out", str(out),
            "--weights", str(weights), "--device", "cpu", "--quiet", "--batch-size", "1", "--continue"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(out, 3, proc, timeout=120)
    proc.kill()
    proc.wait(timeout=60)
    done = [e["file"] for e in _journal(out, torn_end_ok=True)]
    assert len(done) < len(images)
    before = _mtimes(out, done)
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(images) - len(done)} image(s) segmented, {len(done)} already done" in rerun.stdout
    assert _mtimes(out, done) == before
    _assert_every_image_once_ok(out, images)
