"""Prepare a raw dataset into the form training loads: ``scsonet data prepare``.

A prepared dataset is a folder::

    manifest.json         format, dataset, source, size [H, W], splits {name: {count, ids}},
                          stats {mean, std} (RGB, 0..1 scale, training split only),
                          files {relative path: sha256}, skipped, warnings
    <split>/images.npy    uint8 (N, H, W, 3)
    <split>/masks.npy     uint8 (N, H, W), values {0, 1}
    <split>/ids.txt       one image ID per line, in array order

with splits ``train``, ``val`` and ``test`` (an empty split is left out). It is written into a
temporary sibling folder and renamed into place at the end: no partial output on failure.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .. import __version__
from .._checks import MIN_SIDE, MIN_STD
from .._io import atomic_dir
from ..errors import ScsonetError
from .decode import read_image, read_mask
from .layouts import LAYOUTS, Pair, Problem, list_pairs
from .sources import close_archives
from .splits import SPLITS, check_split_file, random_split, read_split_file

FORMAT = "scsonet-prepared-v1"
MANIFEST = "manifest.json"
_SHOWN_PROBLEMS = 3  # an error line names this many bad inputs, then counts the rest
# Largest prepared side. The models pad to multiples of 32 inside, so any side from MIN_SIDE
# runs; but each split is held in memory as uint8 arrays, here and in training: at 2048 x 2048
# an image is 12 MiB and ISIC 2017's 2,150 pairs 27 GB (the paper trains at 256). A larger
# value is a typo: --size 1000000 would ask for terabytes.
MAX_PREPARED_SIDE = 2048


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def parse_size(size: int | str | Sequence[int]) -> tuple[int, int]:
    """256, "256", "192x256" (H x W) or (H, W) -> (H, W) of positive ints."""
    try:
        if isinstance(size, str):
            parts = [int(v) for v in size.lower().split("x")]
        elif isinstance(size, int):
            parts = [size]
        else:
            parts = [int(v) for v in size]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not all(MIN_SIDE <= p <= MAX_PREPARED_SIDE for p in parts):
        raise ScsonetError(f"size {size!r}: expected N or HxW with sides in {MIN_SIDE}..{MAX_PREPARED_SIDE}")
    return parts[0], parts[1]


def _decode(pair: Pair, size: tuple[int, int]) -> tuple[str, np.ndarray | None, np.ndarray | None, Problem | None]:
    """(id, image, mask, problem); problems are returned, not raised, so one bad file stops nothing."""
    arrays = []
    for ref, read in ((pair.image, read_image), (pair.mask, read_mask)):
        try:
            arrays.append(read(ref.read_bytes(), str(ref), size))
        except ScsonetError as err:
            return pair.id, None, None, Problem(str(ref), str(err).removeprefix(f"{ref}: "), pair.id)
    return pair.id, arrays[0], arrays[1], None


def _decode_all(pairs: list[Pair], size: tuple[int, int], workers: int) -> Iterator[tuple]:
    work = partial(_decode, size=size)
    if workers <= 1:
        yield from map(work, pairs)
        return
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap_unordered(work, pairs, chunksize=max(1, min(16, len(pairs) // (4 * workers))))


def _check_problems(problems: list[Problem], skip_bad: bool) -> None:
    if problems and not skip_bad:
        shown = "; ".join(str(p) for p in problems[:_SHOWN_PROBLEMS])
        more = f" (+{len(problems) - _SHOWN_PROBLEMS} more)" if len(problems) > _SHOWN_PROBLEMS else ""
        raise ScsonetError(f"{len(problems)} bad input(s): {shown}{more}; use --skip-bad to leave them out")


def channel_stats(images: np.ndarray, chunk: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, H, W, 3) images, in 0..1 scale (float64 sums); a std
    is at least ``MIN_STD``, so that a channel constant over the training images (a synthetic or
    greyscale set) normalises to 0, not to 0 / 0."""
    total, total_sq = np.zeros(3), np.zeros(3)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += np.square(x).sum(0)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / n
    std = np.maximum(np.sqrt(np.maximum(total_sq / n - mean**2, 0.0)), MIN_STD)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _mask_warning(image_id: str, mask: np.ndarray, file: str) -> str:
    if not mask.any():
        return f"{image_id}: mask has no foreground ({file})"
    if mask.all():
        return f"{image_id}: mask has no background ({file})"
    return ""


def _write_split(root: Path, split: str, images: np.ndarray, masks: np.ndarray, ids: list[str]) -> dict[str, str]:
    """Write one split's files under ``root/split``; return {relative path: sha256}."""
    (root / split).mkdir()
    np.save(root / split / "images.npy", images)
    np.save(root / split / "masks.npy", masks)
    (root / split / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    return {f"{split}/{name}": sha256_file(root / split / name) for name in ("images.npy", "masks.npy", "ids.txt")}


def prepare_dataset(dataset: str, src: str | Path, out: str | Path, *, size: int | str | Sequence[int] = 256,
                    split_file: str | Path | None = None, seed: int = 42, test_ratio: float = 0.3,
                    val_ratio: float = 0.1, skip_bad: bool = False, overwrite: bool = False,
                    workers: int | None = None, progress: bool = True) -> dict:
    """Pair, decode, resize and split a raw dataset; write it to ``out``; return its manifest.

    Args:
        dataset: source layout, one of ``LAYOUTS`` (isic2017, isic2018, folder).
        src: folder holding the layout's image and mask folders (or their .zip archives).
        out: prepared dataset folder to create.
        size: output size, N or (H, W) (256).
        split_file: CSV with columns image_id, split; None for a seeded random split (None).
        seed: random split seed (42).
        test_ratio: random split: fraction of all pairs for test (0.3).
        val_ratio: random split: fraction of the non-test pairs for val (0.1).
        skip_bad: leave bad inputs out and list them in the manifest, instead of failing (False).
        overwrite: replace an existing ``out`` (False).
        workers: decoding processes (None = CPUs available to this process).
        progress: show a progress bar (True).
    """
    if dataset not in LAYOUTS:
        raise ScsonetError(f"unknown dataset {dataset!r} (choose from {', '.join(LAYOUTS)})")
    size = parse_size(size)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ScsonetError(f"{out}: already exists (use --overwrite to replace it)")
    start = time.perf_counter()

    listing = list_pairs(dataset, src)
    problems = list(listing.problems)
    if split_file is not None:
        assignment = read_split_file(split_file)
        problems += check_split_file(assignment, {p.id for p in listing.pairs}, {p.id for p in problems},
                                     str(split_file))
        split_info = {"method": "file", "file": str(Path(split_file).resolve()), "sha256": sha256_file(split_file)}
    else:
        assignment = random_split([p.id for p in listing.pairs], seed, test_ratio, val_ratio)
        split_info = {"method": "random", "seed": seed, "test_ratio": test_ratio, "val_ratio": val_ratio}
    pairs = [p for p in listing.pairs if p.id in assignment]
    _check_problems(problems, skip_bad)  # fail before the slow part
    split_ids = {s: [p.id for p in pairs if assignment[p.id] == s] for s in SPLITS}
    if not split_ids["train"]:
        raise ScsonetError(f"{src}: no usable training pairs")

    # Decode straight into per-split arrays, each ID at its sorted position.
    position = {i: (s, k) for s, ids in split_ids.items() for k, i in enumerate(ids)}
    images = {s: np.zeros((len(ids), *size, 3), np.uint8) for s, ids in split_ids.items() if ids}
    masks = {s: np.zeros((len(ids), *size), np.uint8) for s, ids in split_ids.items() if ids}
    mask_files = {p.id: str(p.mask) for p in pairs}
    workers = min(workers or len(os.sched_getaffinity(0)), len(pairs))
    failed, warnings = set(), []
    try:
        decoded = _decode_all(pairs, size, workers)
        for image_id, image, mask, problem in tqdm(decoded, total=len(pairs), desc=f"prepare {dataset}",
                                                   unit="pair", disable=not progress):
            if problem:
                problems.append(problem)
                failed.add(image_id)
                continue
            s, k = position[image_id]
            images[s][k], masks[s][k] = image, mask
            if warning := _mask_warning(image_id, mask, mask_files[image_id]):
                warnings.append(warning)
    finally:
        close_archives()
    _check_problems(problems, skip_bad)
    if failed:
        for s, ids in split_ids.items():
            keep = [k for k, i in enumerate(ids) if i not in failed]
            split_ids[s] = [ids[k] for k in keep]
            if s in images:
                images[s], masks[s] = images[s][keep], masks[s][keep]
        if not split_ids["train"]:
            raise ScsonetError(f"{src}: no training pair could be decoded")

    mean, std = channel_stats(images["train"])
    with atomic_dir(out, overwrite=overwrite) as tmp:
        files = {}
        for s, ids in split_ids.items():
            if ids:
                files.update(_write_split(tmp, s, images[s], masks[s], ids))
        manifest = {
            "format": FORMAT,
            "dataset": dataset,
            "source": str(Path(src).resolve()),
            "size": list(size),
            "split": split_info,
            "splits": {s: {"count": len(ids), "ids": ids} for s, ids in split_ids.items() if ids},
            "stats": {"mean": mean, "std": std, "computed_on": "train", "scale": "0..1"},
            "files": files,
            "skipped": [{"file": p.file, "reason": p.reason, "id": p.id} for p in problems],
            "warnings": sorted(warnings),
            "notes": listing.notes,
            "scsonet_version": __version__,
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
