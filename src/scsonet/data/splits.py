"""Train / val / test assignment: from a split file, or a seeded random split."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..errors import ScsonetError
from .layouts import Problem

SPLITS = ("train", "val", "test")


def read_split_file(path: str | Path) -> dict[str, str]:
    """CSV with columns ``image_id`` and ``split`` (train, val or test) -> {image_id: split}."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            fields = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ScsonetError(f"{path}: cannot read split file ({err})") from None
    if not {"image_id", "split"} <= fields:
        raise ScsonetError(f"{path}: split file needs columns image_id and split (has {sorted(fields)})")
    assignment: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        image_id, split = (row["image_id"] or "").strip(), (row["split"] or "").strip()
        if split not in SPLITS:
            raise ScsonetError(f"{path}: line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
        if image_id in assignment:
            raise ScsonetError(f"{path}: line {line}: image_id {image_id!r} appears twice")
        assignment[image_id] = split
    return assignment


def check_split_file(assignment: dict[str, str], ids: set[str], excluded: set[str], path: str) -> list[Problem]:
    """Problems: IDs the file names that the data lacks, and data IDs the file does not name.

    ``excluded`` are IDs already reported as bad inputs: not reported again.
    """
    unknown = sorted(assignment.keys() - ids - excluded)
    missing = sorted(ids - assignment.keys())
    return ([Problem(path, f"names image_id {i!r}, which is not in the data") for i in unknown]
            + [Problem(path, f"does not assign image_id {i!r}") for i in missing])


def random_split(ids: list[str], seed: int, test_ratio: float, val_ratio: float) -> dict[str, str]:
    """Seeded split of sorted ``ids``: ``test_ratio`` of all to test, ``val_ratio`` of the rest to val."""
    for name, ratio in (("test ratio", test_ratio), ("val ratio", val_ratio)):
        if not 0.0 <= ratio < 1.0:
            raise ScsonetError(f"{name} {ratio} is outside [0, 1)")
    order = np.random.default_rng(seed).permutation(len(ids))
    ordered = sorted(ids)
    shuffled = [ordered[i] for i in order]
    n_test = round(len(ids) * test_ratio)
    n_val = round((len(ids) - n_test) * val_ratio)
    return {i: "test" if k < n_test else "val" if k < n_test + n_val else "train" for k, i in enumerate(shuffled)}
