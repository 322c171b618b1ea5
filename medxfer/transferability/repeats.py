"""Statistics of a transferability study with repeated fine-tuning (issue 18, item 1).

A study fine-tunes every model of a target's bank with several seeds and scores the final model
on the same validation cases each time: per target a Dice array ``dice[seed, model, case]``
(``NaN`` where a case has no defined Dice, e.g. no foreground in label and prediction). From it:

* **ground truth**: the mean Dice of a model, ``mean over seeds of (nanmean over cases)`` — the
  per-seed value is the Dice MONAI's ``MeanDice`` reports for that run;
* **noise ceiling** (:func:`noise_ceiling`): the mean weighted Kendall tau between the model
  rankings of two seeds, over all seed pairs: how well one fine-tuning run predicts another. An
  estimator is judged against the mean over seeds, which is less noisy than one run, so it can
  exceed the ceiling; a ceiling near 0 says the benchmark cannot rank the models at all;
* **bootstrap intervals** (:func:`bootstrap_evaluation`): each estimator's weighted tau, Pearson,
  Spearman and TIS (:mod:`medxfer.transferability.evaluate`) against the mean Dice, with a
  percentile 95% interval from resampling seeds and validation cases with replacement (both at
  once, the same draw for every estimator);
* **paired comparison** against a reference estimator (CC-FV by default): the difference of each
  metric on the same resamples, its 95% interval and the share of resamples where the estimator
  is ahead.

scipy computes the correlations (``weightedtau``, ``pearsonr``, ``spearmanr`` via
:mod:`~medxfer.transferability.evaluate`); the resampling is numpy (``Generator.integers``),
written here because scipy's ``bootstrap`` resamples one axis of independent observations, not
two crossed factors (seeds x cases) of one statistic. Choices where the issue is silent: 1000
resamples, percentile intervals (2.5 / 97.5 %), the noise ceiling's interval from resampling
cases only (resampling seeds would pair a seed with itself), resamples where a metric is
undefined left out of its interval (their count is reported).
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np

from medxfer.transferability.evaluate import METRICS, pearson, spearman, tis, weighted_tau

__all__ = ["mean_dice", "seed_dice", "noise_ceiling", "bootstrap_evaluation", "REFERENCE"]

#: The estimator every other one is compared with (the CC-FV paper's method).
REFERENCE = "ccfv"
_FUNCTIONS = {"weighted_tau": weighted_tau, "pearson": pearson, "spearman": spearman, "tis": tis}


def _as_dice(dice) -> np.ndarray:
    arr = np.asarray(dice, dtype=np.float64)
    if arr.ndim == 2:  # seeds x models: one value per run, no cases to resample
        arr = arr[:, :, None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"dice must be seeds x models x cases (or seeds x models), got shape {arr.shape}")
    return arr


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """``nanmean`` without the all-NaN warning (all-NaN slices give NaN)."""
    finite = np.isfinite(a)
    count = finite.sum(axis=axis)
    total = np.where(finite, a, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def seed_dice(dice) -> np.ndarray:
    """Dice per seed and model (seeds x models): the mean over the cases with a defined Dice."""
    return _nanmean(_as_dice(dice), axis=2)


def mean_dice(dice) -> np.ndarray:
    """The ground truth per model: the mean over seeds of :func:`seed_dice` (NaN seeds left out)."""
    return _nanmean(seed_dice(dice), axis=0)


def _ceiling_of(per_seed: np.ndarray) -> tuple[float, list[float]]:
    pairs = [weighted_tau(per_seed[i], per_seed[j]) for i, j in itertools.combinations(range(per_seed.shape[0]), 2)]
    finite = [p for p in pairs if math.isfinite(p)]
    return (float(np.mean(finite)) if finite else math.nan), pairs


def noise_ceiling(dice) -> dict:
    """Mean weighted Kendall tau between the model rankings of two seeds, over all seed pairs.

    ``dice``: seeds x models (x cases). Weighted tau is symmetric, so each unordered pair counts
    once. Returns ``{"value", "pairs": [tau of seed pair (i, j) for i < j], "n_seeds"}``;
    ``value`` is NaN with fewer than two seeds (or when every pair is undefined: constant Dice).
    """
    per_seed = seed_dice(dice)
    value, pairs = _ceiling_of(per_seed)
    return {"value": value, "pairs": pairs, "n_seeds": int(per_seed.shape[0])}


def _metrics(scores: np.ndarray, truth: np.ndarray) -> dict:
    return {m: _FUNCTIONS[m](scores, truth) for m in METRICS}


def _interval(values: np.ndarray, level: float) -> tuple[float, float, int]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan, 0
    lo, hi = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi), int(finite.size)


def bootstrap_evaluation(dice, scores: Mapping[str, Sequence[float]], n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95, reference: str | None = REFERENCE) -> dict:
    """Each estimator against the mean Dice over seeds, with bootstrap intervals (module docstring).

    Args:
        dice: ``dice[seed, model, case]`` of one target (or seeds x models).
        scores: ``{estimator: score per model}`` (same model order; NaN = undefined).
        n_boot: resamples; each draws the seeds and the cases with replacement.
        seed: of the resampling (``numpy.random.default_rng``), so the report is reproducible.
        level: of the percentile intervals.
        reference: the estimator the others are compared with (paired, on the same resamples);
            ``None`` or absent from ``scores``: no comparison.

    Returns:
        ``{"n_seeds", "n_models", "n_cases", "n_boot", "level", "mean_dice": [...],
        "noise_ceiling": {value, pairs, n_seeds, low, high},
        "estimators": {name: {metric: {value, low, high, n}}},
        "paired": {name: {metric: {difference, low, high, share_ahead, n}}}}``; ``value`` is the
        metric on all seeds and cases, ``n`` the resamples where it was defined, ``share_ahead``
        the share of those where the estimator's metric exceeds the reference's (ties count half).
    """
    arr = _as_dice(dice)
    n_seeds, n_models, n_cases = arr.shape
    names = list(scores)
    table = {e: np.array([np.nan if v is None else float(v) for v in scores[e]], dtype=np.float64) for e in names}
    for e, x in table.items():
        if x.shape != (n_models,):
            raise ValueError(f"estimator {e!r}: {x.size} scores for {n_models} models")
    truth = mean_dice(arr)
    point = {e: _metrics(table[e], truth) for e in names}
    ceiling = noise_ceiling(arr)

    rng = np.random.default_rng(seed)
    boot = {e: {m: np.full(n_boot, np.nan) for m in METRICS} for e in names}
    ceil_boot = np.full(n_boot, np.nan)
    for b in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        cases = rng.integers(0, n_cases, n_cases)
        resampled = arr[seeds][:, :, cases]
        t = mean_dice(resampled)
        for e in names:
            for m, v in _metrics(table[e], t).items():
                boot[e][m][b] = v
        if n_seeds > 1:  # the ceiling over the original seeds, on resampled cases
            ceil_boot[b] = _ceiling_of(seed_dice(arr[:, :, cases]))[0]

    estimators = {}
    for e in names:
        estimators[e] = {}
        for m in METRICS:
            lo, hi, n = _interval(boot[e][m], level)
            estimators[e][m] = {"value": point[e][m], "low": lo, "high": hi, "n": n}
    lo, hi, _ = _interval(ceil_boot, level)
    paired = {}
    if reference is not None and reference in table:
        for e in names:
            if e == reference:
                continue
            paired[e] = {}
            for m in METRICS:
                diff = boot[e][m] - boot[reference][m]
                finite = diff[np.isfinite(diff)]
                d_lo, d_hi, n = _interval(diff, level)
                share = float(((finite > 0).sum() + 0.5 * (finite == 0).sum()) / finite.size) if finite.size else math.nan
                paired[e][m] = {"difference": point[e][m] - point[reference][m], "low": d_lo, "high": d_hi,
                                "share_ahead": share, "n": n}
    return {"n_seeds": n_seeds, "n_models": n_models, "n_cases": n_cases, "n_boot": int(n_boot), "level": level,
            "reference": reference if paired else None, "mean_dice": [float(v) for v in truth],
            "noise_ceiling": {**ceiling, "low": lo, "high": hi},
            "estimators": estimators, "paired": paired}
