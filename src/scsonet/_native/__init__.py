"""Small C kernels, compiled on first use with the system's C compiler and loaded with ctypes.

Optional by design: without a compiler (or with ``SCSONET_NATIVE=0``) ``native()`` is None
and callers keep their PyTorch route. Builds are cached per source, flags and CPU in
``$SCSONET_CACHE`` (default ``~/.cache/scsonet``) and written atomically, so concurrent
processes (the split-batch helpers) share one build.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["native"]

_SOURCES = sorted(Path(__file__).parent.glob("*.c"))  # one library from all of them
# -march=native first (the build is cached per CPU); then a portable build
_FLAG_SETS = (["-O3", "-march=native"], ["-O3"])


def _cache_dir() -> Path:
    if os.environ.get("SCSONET_CACHE"):
        return Path(os.environ["SCSONET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scsonet"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: a build for one CPU must not load on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _build(compiler: str, flags: list[str], target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-std=gnu99", "-fPIC", "-shared", "-o", tmp, *map(str, _SOURCES), "-lm"]
        if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
            return False
        os.replace(tmp, target)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    ptr, size = ctypes.c_void_p, ctypes.c_ssize_t
    dims = [size] * 11  # N, C, H, W, O, KH, KW, ph, pw, dh, dw
    # every kernel returns 0, or -1 when out of memory
    for name, pointers in (("forward", 4), ("grad_input", 3), ("grad_weight", 3)):
        fn = getattr(lib, f"direct_conv_{name}")
        fn.argtypes, fn.restype = [ptr] * pointers + dims, ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def native() -> ctypes.CDLL | None:
    """The library of this folder's C kernels, built if needed; None if it can't be."""
    if os.environ.get("SCSONET_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    source = b"\0".join(path.read_bytes() for path in _SOURCES)
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(),
                                            _cpu_signature().encode()])).hexdigest()[:16]
        path = _cache_dir() / f"kernels-{platform.machine()}-{digest}.so"
        if (path.is_file() or _build(compiler, flags, path)) and (lib := _load(path)) is not None:
            return lib
    return None
