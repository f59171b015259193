"""No process of a training run outlives it: kill -9 of ``scsonet train`` takes its split-batch
helpers and multiprocessing's resource tracker with it, and the tracker unlinks the semaphores."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import prepared  # noqa: F401  (the tiny synthetic dataset fixture)

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of ``pid`` from /proc, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], fields[19]


def _descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``, with its command line."""
    found, todo = {}, [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            for child in children:
                if child not in found:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found[child] = cmdline
                    todo.append(child)
    return found


def _alive(pid: int, started: str) -> bool:
    now = _stat(pid)
    return now is not None and now[1] == started and now[0] not in "ZX"  # a zombie has ended


@pytest.mark.slow
def test_sigkill_of_train_leaves_no_process_behind(prepared, tmp_path):  # noqa: F811
    log = tmp_path / "console.log"
    cmd = [sys.executable, "-m", "scsonet.cli.main", "train", "--set", f"data={prepared}", "--set", "epochs=1000",
           "--set", "batch_size=4", "--set", "processes=2", "--set", "fast=true", "--set", "device=cpu",
           "--set", f"out_dir={tmp_path}", "--set", "progress=false", "--set", "tensorboard=false"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    watched: dict[int, tuple[str, str]] = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # training under way: an epoch done, helper and tracker there
            assert proc.poll() is None, log.read_text()[-2000:]
            kids = _descendants(proc.pid)
            roles = {"helper" if "spawn_main" in c else "tracker" if "resource_tracker" in c else "other"
                     for c in kids.values()}
            if {"helper", "tracker"} <= roles and "epoch 1/" in log.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never started its helpers:\n" + log.read_text()[-2000:])
        watched = {pid: (cmd, _stat(pid)[1]) for pid, cmd in _descendants(proc.pid).items() if _stat(pid)}
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        semaphores = {line.split()[-1] for line in maps.splitlines() if "/dev/shm/sem." in line}
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(5)
        left = [f"{pid}: {cmd}" for pid, (cmd, started) in watched.items() if _alive(pid, started)]
        assert not left, "still running 5 s after kill -9:\n" + "\n".join(left)
        assert semaphores and not [s for s in semaphores if os.path.exists(s)]  # the tracker cleaned up
    finally:
        for pid, (_, started) in watched.items():  # never leave strays, even when the test fails
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
