"""Atomic writes are durable (fsync of file and folder) and leave no stale temporaries."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from scsonet import _io
from scsonet._io import atomic_dir, atomic_path, torch_save_atomic, write_text_atomic

posix_only = pytest.mark.skipif(os.name != "posix", reason="pid probing and /proc are POSIX/Linux")


@pytest.fixture
def fsyncs(monkeypatch):
    """The path each os.fsync flushed, in order (read from /proc/self/fd)."""
    calls = []
    real = os.fsync

    def record(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}")) if Path("/proc/self/fd").is_dir() else None
        calls.append(path)
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_name(name: str, pid: int, host: str = _io._HOST) -> str:
    return f".{name}.{pid}-{host}.abc123xy.tmp"


@posix_only
def test_file_is_synced_before_the_rename_and_the_folder_after(tmp_path, fsyncs):
    target = tmp_path / "report.json"
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and _temps(tmp_path) == []
    # first the temporary (so the rename never publishes unflushed data), then the folder
    assert len(fsyncs) == 2
    assert fsyncs[0].parent == tmp_path and fsyncs[0].name.startswith(f".report.json.{os.getpid()}-")
    assert fsyncs[1] == tmp_path


@posix_only
def test_torch_save_and_atomic_dir_are_synced(tmp_path, fsyncs):
    torch_save_atomic({"w": torch.ones(3)}, tmp_path / "last.pt")
    assert len(fsyncs) == 2 and fsyncs[0].name.startswith(".last.pt.") and fsyncs[1] == tmp_path
    assert torch.equal(torch.load(tmp_path / "last.pt")["w"], torch.ones(3))
    fsyncs.clear()
    with atomic_dir(tmp_path / "data") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.npy").write_bytes(b"a")
        (tmp / "sub" / "b.npy").write_bytes(b"b")
    names = {p.name for p in fsyncs}
    assert {"a.npy", "b.npy", "sub"} <= names  # every file and folder inside, before the rename
    assert fsyncs[-1] == tmp_path
    assert (tmp_path / "data" / "sub" / "b.npy").read_bytes() == b"b"


@posix_only
def test_a_dead_writers_temporaries_are_removed_and_live_ones_kept(tmp_path):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_file = tmp_path / _temp_name("last.pt", dead)
        stale_dir = tmp_path / _temp_name("data", dead)
        kept = [tmp_path / _temp_name("last.pt", live.pid),  # another live writer's
                tmp_path / _temp_name("last.pt", os.getpid()),  # this process's own
                tmp_path / _temp_name("last.pt", dead, host="0123abcd")]  # another machine's
        stale_file.write_bytes(b"half")
        stale_dir.mkdir()
        (stale_dir / "x").write_bytes(b"x")
        for path in kept:
            path.write_bytes(b"in progress")
        torch_save_atomic({"epoch": 1}, tmp_path / "last.pt")
        assert not stale_file.exists() and not stale_dir.exists()
        assert all(path.read_bytes() == b"in progress" for path in kept)
    finally:
        live.kill()
        live.wait()


@posix_only
def test_kill_9_mid_write_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from scsonet._io import atomic_path
        with atomic_path({str(tmp_path / 'out.bin')!r}) as tmp:
            tmp.write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".out.bin.{proc.pid}-")
    assert not (tmp_path / "out.bin").exists()
    write_text_atomic(tmp_path / "out.bin", "whole")
    assert _temps(tmp_path) == [] and (tmp_path / "out.bin").read_text() == "whole"


def test_a_failure_inside_the_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and _temps(tmp_path) == []


def test_atomic_dir_failure_keeps_the_old_folder_and_overwrite_replaces_it(tmp_path):
    target = tmp_path / "prepared"
    target.mkdir()
    (target / "meta.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "meta.json").write_text("half")
        raise RuntimeError("interrupted")
    assert (target / "meta.json").read_text() == "old" and _temps(tmp_path) == []
    with pytest.raises(FileExistsError), atomic_dir(target) as tmp:
        (tmp / "meta.json").write_text("new")
    assert (target / "meta.json").read_text() == "old" and _temps(tmp_path) == []
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "meta.json").write_text("new")
    assert (target / "meta.json").read_text() == "new" and _temps(tmp_path) == []
