"""ISIC 2018 Task 2 scoring of skin-attribute masks (SPEC sections 6 and 9).

The challenge rule, which TATL reports: per attribute, TP / FP / FN pixel counts are **summed
over all images of a fold** (an image without the attribute contributes its false positives, an
image with it its TP and FN) and only then turned into

    Jaccard = TP / (TP + FP + FN),      Dice = 2 TP / (2 TP + FP + FN)

(not averaged per image, which would make every empty-vs-empty image a perfect score). Across
folds, each attribute's Jaccard / Dice are averaged (mean and standard deviation over folds).

Undefined value: an attribute absent from every ground-truth mask of a fold *and* never
predicted has TP + FP + FN = 0; its Jaccard / Dice for that fold are NaN and it is left out of
the mean over folds (``n_folds`` in the summary says how many folds entered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

__all__ = ["AttributeCounts", "FoldScorer", "summarize_folds"]


@dataclass
class AttributeCounts:
    """Pixel counts of one attribute summed over images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    images: int = 0

    @property
    def jaccard(self) -> float:
        denom = self.tp + self.fp + self.fn
        return self.tp / denom if denom else math.nan

    @property
    def dice(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else math.nan


@dataclass
class FoldScorer:
    """Accumulates the TP / FP / FN of every attribute over the images of one fold.

    >>> scorer = FoldScorer(["globules", "streaks"])
    >>> scorer.add(pred, gt)          # (A, H, W) binary masks, attributes in that order
    >>> scorer.scores()               # {"globules": {"jaccard", "dice", "tp", "fp", "fn", "images"}, ...}
    """

    attributes: Sequence[str]
    counts: dict[str, AttributeCounts] = field(default_factory=dict)

    def __post_init__(self):
        self.attributes = list(self.attributes)
        self.counts = {a: AttributeCounts() for a in self.attributes}

    def add(self, pred, gt) -> None:
        """Add one image: ``pred`` and ``gt`` are ``(A, H, W)`` masks (bool, 0/1 or 0/255; anything
        > 0 is foreground), one channel per attribute in :attr:`attributes` order, same size (score
        at the evaluation resolution, e.g. both resized to 256x256)."""
        p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
        if p.shape != g.shape or p.ndim != 3 or p.shape[0] != len(self.attributes):
            raise ValueError(f"pred {p.shape} and gt {g.shape} must both be (A={len(self.attributes)}, H, W)")
        for a, pa, ga in zip(self.attributes, p, g):
            c = self.counts[a]
            c.tp += int(np.count_nonzero(pa & ga))
            c.fp += int(np.count_nonzero(pa & ~ga))
            c.fn += int(np.count_nonzero(~pa & ga))
            c.images += 1

    def scores(self) -> dict[str, dict]:
        """Per attribute ``{"jaccard", "dice", "tp", "fp", "fn", "images"}`` (NaN when undefined)."""
        return {a: {"jaccard": c.jaccard, "dice": c.dice, "tp": c.tp, "fp": c.fp, "fn": c.fn, "images": c.images}
                for a, c in self.counts.items()}


def summarize_folds(folds: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict]:
    """Mean and std over folds of each attribute's Jaccard and Dice (from :meth:`FoldScorer.scores`),
    NaN folds left out; plus ``"mean"``: the average over attributes of the per-attribute means.

    Returns ``{attribute: {"jaccard_mean", "jaccard_std", "dice_mean", "dice_std", "n_folds"}, ...,
    "mean": {"jaccard_mean", "dice_mean"}}``. Std is the population std (``ddof=0``) over folds.
    """
    attributes = list(dict.fromkeys(a for fold in folds for a in fold))
    out: dict[str, dict] = {}
    for a in attributes:
        entry = {}
        for metric in ("jaccard", "dice"):
            values = np.array([f[a][metric] for f in folds if a in f], dtype=float)
            values = values[np.isfinite(values)]
            entry[f"{metric}_mean"] = float(values.mean()) if values.size else math.nan
            entry[f"{metric}_std"] = float(values.std()) if values.size else math.nan
            entry["n_folds"] = int(values.size)
        out[a] = entry
    means = {m: [out[a][f"{m}_mean"] for a in attributes if math.isfinite(out[a][f"{m}_mean"])] for m in ("jaccard", "dice")}
    out["mean"] = {f"{m}_mean": float(np.mean(v)) if v else math.nan for m, v in means.items()}
    return out
