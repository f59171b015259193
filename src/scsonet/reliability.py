"""A reliability score per image: how likely the predicted outline is right (Dice >= 0.7).

Features come from the probability map alone (and from two-pass prediction's signals when it
ran), so any backend can compute them; a logistic model maps them to a probability in 0..1.
The model is fitted on the validation split only (plain and shifted val images, by
``benchmarks/fit_reliability.py``) and ships as a small JSON beside the weights it was fitted
for. An image whose score falls below the JSON's ``review_threshold`` gets ``review = True``.

Numpy only.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

from ._io import write_json_atomic
from .errors import ScsonetError
from .postprocess import erode, resize_probabilities
from .twopass import label_components

if TYPE_CHECKING:
    from .twopass import TwoPassInfo

__all__ = ["FEATURES", "FORMAT", "ReliabilityModel", "auroc", "choose_review_threshold", "default_model_path",
           "fit_logistic", "reliability_features"]

FORMAT = "scsonet-reliability-v1"
FEATURE_SIZE = (256, 256)  # features are computed on the map resized to this, whatever the photo's size
EDGE_BAND = 4  # px at FEATURE_SIZE: the band either side of the outline where the margin is measured
MIN_COMPONENT_SHARE = 0.001  # components under this share of the image are not counted (speckle)

FEATURES = (
    "border_touch",       # share of the image's border pixels that are lesion
    "lesion_share",       # share of the image that is lesion
    "lesion_share_sq",    # its square: both tiny and frame-filling masks are suspect
    "log_components",     # log(1 + number of components)
    "largest_share",      # largest component's share of the lesion (0 if none)
    "margin",             # mean |2p - 1| over the lesion and a band around its edge (1 = sure)
    "empty",              # 1 if no lesion was found
    "pass_disagreement",  # 1 - Dice(pass 1, pass 2) in the crop; 0 when pass 2 did not run
    "flip_disagreement",  # 1 - Dice between flipped predictions when given; else 0
)


def reliability_features(probs: np.ndarray, info: Optional[TwoPassInfo] = None, threshold: float = 0.5,
                         flip_probs: Optional[Sequence[np.ndarray]] = None) -> dict[str, float]:
    """The ``FEATURES`` of one probability map (H, W) at any size.

    Args:
        probs: the final lesion probabilities (after two-pass prediction, if used).
        info: two-pass prediction's ``TwoPassInfo`` for this image, the one made with ``probs`` (None).
        threshold: the mask threshold (0.5).
        flip_probs: probability maps of flipped inputs, each flipped back (None).
    """
    p = _feature_map(probs, info)
    mask = p >= threshold
    area = int(mask.sum())
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    share = area / mask.size
    if area:
        labels, count = label_components(mask)
        sizes = np.bincount(labels.ravel())[1:]
        components = int((sizes >= MIN_COMPONENT_SHARE * mask.size).sum())
        largest = float(sizes.max() / area)
        dilated = ~erode(~mask, EDGE_BAND)
        region = mask | dilated
        margin = float(np.abs(2.0 * p[region] - 1.0).mean(dtype=np.float64))
    else:
        components, largest, margin = 0, 0.0, float(np.abs(2.0 * p - 1.0).mean(dtype=np.float64))
    pass_dis = 1.0 - info.agreement if info is not None and info.agreement is not None else 0.0
    flip_dis = 0.0
    if flip_probs:
        flips = [resize_probabilities(f, FEATURE_SIZE) >= threshold for f in flip_probs]
        flip_dis = float(np.mean([1.0 - _dice(mask, f) for f in flips]))
    return {"border_touch": float(border.mean()), "lesion_share": share, "lesion_share_sq": share * share,
            "log_components": math.log1p(components), "largest_share": largest, "margin": margin,
            "empty": float(area == 0), "pass_disagreement": float(pass_dis), "flip_disagreement": flip_dis}


@functools.lru_cache(maxsize=16)
def _axis_operator(samples: int, span: tuple[int, int], length: int, out: int) -> np.ndarray:
    """(out, samples): along one axis, ``samples`` values upsampled (bilinear) onto ``span`` of a
    line ``length`` pixels long (zero elsewhere), then resized to ``out`` pixels (antialiased),
    each step by Pillow as ``resize_probabilities`` does it (row i: basis vector i through both)."""
    start, stop = span
    line = np.zeros((samples, length), np.float32)
    line[:, start:stop] = resize_probabilities(np.eye(samples, dtype=np.float32), (samples, stop - start))
    operator = resize_probabilities(line, (samples, out)).T
    operator.flags.writeable = False
    return operator


def _feature_map(probs: np.ndarray, info: Optional["TwoPassInfo"]) -> np.ndarray:
    """``probs`` resized to FEATURE_SIZE. With two-pass's maps at the model's size, the same figures
    (to float rounding) from those: both resizes are linear and separable, so the full-size map
    is never read (at 12 MP its resize costs more than all the features)."""
    if (info is None or info.pass1_small is None or info.image_size is None
            or probs.size <= FEATURE_SIZE[0] * FEATURE_SIZE[1]):  # a small map: resizing it is cheaper
        return resize_probabilities(probs, FEATURE_SIZE)
    height, width = info.image_size
    if not info.second_pass:
        small, (x0, y0, x1, y1) = info.pass1_small, (0, 0, width, height)
    elif info.pass2_small is not None:
        small, (x0, y0, x1, y1) = info.pass2_small, info.crop
    else:  # pass 1 kept outside the crop: read the full-size map
        return resize_probabilities(probs, FEATURE_SIZE)
    rows = _axis_operator(small.shape[0], (y0, y1), height, FEATURE_SIZE[0])
    cols = _axis_operator(small.shape[1], (x0, x1), width, FEATURE_SIZE[1])
    return (rows @ small @ cols.T).astype(np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iterations: int = 50) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method: (N, F) features, (N,) {0, 1} labels ->
    (coefficients (F,), intercept). The intercept is not penalised; the penalty keeps a separable
    problem's coefficients finite. Standardise ``x`` first so that one ``l2`` fits every feature."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    design = np.hstack([x, np.ones((len(x), 1))])
    penalty = np.full(design.shape[1], l2 * len(x))
    penalty[-1] = 0.0
    w = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = _sigmoid(design @ w)
        grad = design.T @ (p - y) + penalty * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w[:-1], float(w[-1])


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: the chance that a random positive (label 1) scores above a random
    negative, ties counting half (the Mann-Whitney U statistic). NaN unless both classes occur."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks (1-based) over runs of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def choose_review_threshold(scores: Sequence[float], dices: Sequence[float], catch: float = 0.9,
                            bad: float = 0.5) -> float:
    """The lowest score threshold under which at least ``catch`` of the images with Dice < ``bad``
    fall (score < threshold means review). 0.5 if there are no such images."""
    scores = np.asarray(scores, dtype=np.float64)
    bad_scores = np.sort(scores[np.asarray(dices) < bad])
    if bad_scores.size == 0:
        return 0.5
    k = int(math.ceil(catch * bad_scores.size)) - 1  # the k-th lowest bad score must fall below
    return float(np.nextafter(bad_scores[k], np.inf))


@dataclass
class ReliabilityModel:
    """A fitted logistic model over named features, with its standardisation and review threshold."""

    features: list[str]
    mean: list[float]
    std: list[float]
    coef: list[float]
    intercept: float
    review_threshold: float
    meta: dict[str, Any] = field(default_factory=dict)  # what fitted it: command, split, shifts, figures

    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, float]], labels: Sequence[int], features: Sequence[str] = FEATURES,
            l2: float = 1e-2, **meta) -> "ReliabilityModel":
        x = np.array([[row[name] for name in features] for row in rows], dtype=np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0)
        std[std < 1e-12] = 1.0  # a constant feature (e.g. no flips given) keeps a zero coefficient
        coef, intercept = fit_logistic((x - mean) / std, np.asarray(labels), l2)
        return cls(list(features), mean.tolist(), std.tolist(), coef.tolist(), intercept, 0.5, dict(meta))

    def score_many(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Reliability of each row of features: the modelled probability that Dice >= 0.7."""
        x = np.array([[row[name] for name in self.features] for row in rows], dtype=np.float64).reshape(-1, len(self.features))
        z = ((x - np.asarray(self.mean)) / np.asarray(self.std)) @ np.asarray(self.coef) + self.intercept
        return _sigmoid(z)

    def assess(self, features: Mapping[str, float]) -> dict[str, Any]:
        """{"reliability": 0..1 rounded to 4 places, "review": whether it is below the threshold}."""
        score = float(self.score_many([features])[0])
        return {"reliability": round(score, 4), "review": bool(score < self.review_threshold)}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "target": "dice >= 0.7", "features": self.features, "mean": self.mean,
                "std": self.std, "coef": self.coef, "intercept": self.intercept,
                "review_threshold": self.review_threshold, "meta": self.meta}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str = "reliability model") -> "ReliabilityModel":
        """Validate and build; every problem is a ScsonetError naming ``source``."""
        def fail(what: str):
            raise ScsonetError(f"{what} ({source})")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            fail(f"not a reliability model: expected format {FORMAT!r}")
        names = data.get("features")
        if not isinstance(names, list) or not names or len(set(names)) != len(names):
            fail("'features' must be a non-empty list of distinct names")
        unknown = [n for n in names if n not in FEATURES]
        if unknown:
            fail(f"unknown features {unknown}; known: {', '.join(FEATURES)}")
        values = {}
        for key in ("mean", "std", "coef"):
            v = data.get(key)
            if not isinstance(v, list) or len(v) != len(names):
                fail(f"'{key}' must be a list of {len(names)} numbers, one per feature")
            values[key] = v
        scalars = [data.get("intercept"), data.get("review_threshold")]
        numbers = values["mean"] + values["std"] + values["coef"] + scalars
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            fail("coefficients, means, stds, intercept and review_threshold must be finite numbers")
        if any(s <= 0 for s in values["std"]):
            fail("'std' must be positive")
        if not 0.0 <= data["review_threshold"] <= 1.0:
            fail("'review_threshold' must lie in 0..1")
        return cls(list(names), [float(v) for v in values["mean"]], [float(v) for v in values["std"]],
                   [float(v) for v in values["coef"]], float(data["intercept"]), float(data["review_threshold"]),
                   dict(data.get("meta") or {}))

    @classmethod
    def load(cls, path: str | Path) -> "ReliabilityModel":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ScsonetError(f"cannot read reliability model: {exc.__class__.__name__} ({path})") from None
        return cls.from_dict(data, str(path))


def default_model_path(weights_file: str | Path) -> Path:
    """The reliability model shipped beside a weights file: ``X.safetensors`` -> ``X.reliability.json``."""
    weights_file = Path(weights_file)
    return weights_file.with_name(weights_file.stem + ".reliability.json")
