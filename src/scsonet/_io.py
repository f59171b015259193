"""Atomic, durable writes: a reader never sees a half-written checkpoint, report or dataset, and
a finished write survives a power cut.

Each write goes to a temporary sibling ``.{name}.{pid}-{host}.{random}.tmp``, which is flushed to
disk (``fsync``), renamed over ``name`` in one step, and then the folder is flushed too, so that
the rename itself is on disk. A writer killed midway (kill -9, power cut) leaves its temporary
behind; the next writer into that folder removes temporaries whose process is gone. The pid in
the name says whose it is; the host tag keeps a writer on another machine sharing the folder
(whose pids mean nothing here) from being taken for a dead one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[A-Za-z0-9_]+\.tmp")
_swept: set[str] = set()  # folders already cleared of dead writers' temporaries by this process


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{_HOST}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries in ``folder`` that writers of this host left when they died; returns them.

    A temporary of a live process (this one included) is never touched. Only on POSIX, where
    ``os.kill(pid, 0)`` probes a process without signalling it.
    """
    removed = []
    if os.name != "posix":
        return removed
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.fullmatch(entry.name)
        if match is None or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    """Clear ``folder`` of dead writers' temporaries the first time this process writes there."""
    key = os.path.abspath(folder)
    if key not in _swept:
        remove_stale_temps(folder)
        _swept.add(key)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to disk."""
    try:
        fd = os.open(path, os.O_RDWR)
    except PermissionError:  # made read-only by its writer; Linux and macOS sync it read-only too
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened
    or synced (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def give_usual_mode(path: Path) -> None:
    """The mode a plain ``open(path, 'w')`` would give, for files that writers create 0600."""
    os.chmod(path, 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is synced and replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    give_usual_mode(tmp_path)  # mkstemp makes 0600
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` (synced) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            # A folder cannot be renamed over a non-empty one: move the old one aside (under a
            # temporary's name, so a kill here leaves it for the sweep), rename, then delete it.
            old = path.parent / f"{_prefix(path)}{os.urandom(4).hex()}.tmp"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # the old folder back in place
                old = None
            raise
        fsync_dir(path.parent)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
