"""Files of a dataset part, read from a folder or straight from a zip archive (no unpacking)."""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ScsonetError

# Written by file managers, never part of a dataset.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini"}


@dataclass(frozen=True, order=True)
class FileRef:
    """A file on disk (``member == ""``) or a member of the zip archive at ``path``."""

    path: str
    member: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name if self.member else Path(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix.lower()

    def read_bytes(self) -> bytes:
        try:
            if not self.member:
                return Path(self.path).read_bytes()
            return _open_zip(self.path).read(self.member)
        except (OSError, KeyError, zipfile.BadZipFile) as err:
            raise ScsonetError(f"{self}: cannot read ({type(err).__name__}: {err})") from None


# One open handle per (process, archive): a handle inherited through fork shares its file offset
# with the parent, so worker processes must open their own.
_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _open_zip(path: str) -> zipfile.ZipFile:
    key = (os.getpid(), path)
    if key not in _ZIPS:
        _ZIPS[key] = zipfile.ZipFile(path)
    return _ZIPS[key]


def close_archives() -> None:
    """Close the zip handles this process opened for reading members."""
    for key in [k for k in _ZIPS if k[0] == os.getpid()]:
        _ZIPS.pop(key).close()


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SYSTEM_FILES


def find_part(src: Path, name: str) -> Path | None:
    """``src/name`` as a folder, else the archive ``src/name.zip``, else None."""
    for candidate in (src / name, src / f"{name}.zip"):
        if candidate.exists():
            return candidate
    return None


def list_files(part: Path) -> list[FileRef]:
    """Every regular file below a folder or inside a zip archive, hidden and system files excluded."""
    if part.is_dir():
        return [FileRef(os.path.join(d, f)) for d, dirs, files in os.walk(part) for f in files
                if not _is_hidden(f) and not any(_is_hidden(p) for p in Path(d).relative_to(part).parts)]
    try:
        with zipfile.ZipFile(part) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ScsonetError(f"{part}: not a readable zip archive ({err})") from None
    return [FileRef(str(part), info.filename) for info in infos
            if not info.is_dir() and not any(_is_hidden(p) or p == "__MACOSX" for p in PurePosixPath(info.filename).parts)]
