"""Evaluating transferability estimators against the measured fine-tuned Dice of a model bank
(SPEC section 5): weighted Kendall tau, Pearson, Spearman and the transferability indicator
score TIS (thesis eq. 3.1), per target task and averaged over targets; CSV / JSON report and a
score-vs-Dice scatter plot.

Input: a table of rows ``{"target": str, "model": str, "dice": float, <estimator>: score, ...}``,
one row per (target task, bank model); every other key is an estimator's score (higher = the
estimator predicts better transfer).

Undefined values (``NaN`` / ``None`` / missing; e.g. LEEP for a model without a source head):
- rows with an undefined Dice are dropped for every estimator;
- for correlations (tau, Pearson, Spearman), rows where the estimator's score is undefined are
  **excluded**; with fewer than 2 scored models, or a constant score / Dice, the value is NaN;
- for TIS the pick is the argmax over the scored models, but the denominator is the best Dice
  over **all** models of the target, so an estimator cannot gain by abstaining; no scored model
  -> NaN;
- means over targets skip targets where a metric is NaN (``n_defined`` counts the others).
Nothing raises on NaN.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import scipy.stats

from medxfer.atomic import atomic_path
from medxfer.data.problems import DatasetError, read_json
from medxfer.jsonfile import write_json

__all__ = [
    "METRICS",
    "weighted_tau",
    "pearson",
    "spearman",
    "tis",
    "evaluate_estimators",
    "read_table",
    "table_from_files",
    "write_report",
    "plot_scores",
]

METRICS = ("weighted_tau", "pearson", "spearman", "tis")
_RESERVED = ("target", "model", "dice")


def _finite_pairs(scores, dice) -> tuple[np.ndarray, np.ndarray]:
    x = _as_float(scores)
    y = _as_float(dice)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"scores and dice must be 1-D of equal length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _as_float(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in np.ravel(np.asarray(values, dtype=object))],
                    dtype=np.float64)


def _correlation(fn, scores, dice) -> float:
    x, y = _finite_pairs(scores, dice)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y).statistic)


def weighted_tau(scores, dice) -> float:
    """Weighted Kendall tau ``scipy.stats.weightedtau(scores, dice)`` with scipy's defaults:
    additive hyperbolic weights ``1/(r+1)`` on ranks ``r`` counted from the top (higher values
    weigh more), averaged over the rankings by scores and by Dice. Non-finite pairs are dropped;
    NaN if fewer than 2 remain or either side is constant."""
    return _correlation(scipy.stats.weightedtau, scores, dice)


def pearson(scores, dice) -> float:
    """Pearson correlation (``scipy.stats.pearsonr``) over the finite pairs; NaN if undefined."""
    return _correlation(scipy.stats.pearsonr, scores, dice)


def spearman(scores, dice) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``) over the finite pairs; NaN if undefined."""
    return _correlation(scipy.stats.spearmanr, scores, dice)


def _pick(scores: np.ndarray) -> np.ndarray:
    """Indices of the models with the highest finite score (several on ties)."""
    finite = np.isfinite(scores)
    if not finite.any():
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(finite & (scores == scores[finite].max()))


def tis(scores, dice) -> float:
    """Transferability indicator score (thesis eq. 3.1):
    ``TIS = Dice(argmax_theta score_theta) / max_theta Dice_theta``.

    The argmax runs over models with a finite score; ties take the mean Dice of the tied models
    (the expected Dice of a random pick among them); the max runs over all models with a finite
    Dice. NaN when no model is scored or the best Dice is not positive. In ``(0, 1]`` otherwise
    (for Dice >= 0), 1 when the estimator picks a best model.
    """
    x, y = _as_float(scores), _as_float(dice)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"scores and dice must be 1-D of equal length, got {x.shape} and {y.shape}")
    x = np.where(np.isfinite(y), x, np.nan)
    picked = _pick(x)
    best = np.nanmax(y) if np.isfinite(y).any() else math.nan
    if picked.size == 0 or not best > 0:
        return math.nan
    return float(np.mean(y[picked]) / best)


def _estimator_names(rows: Sequence[Mapping]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for key in row:
            if key not in _RESERVED and key not in names:
                names.append(key)
    return names


def _evaluate_one(models: list[str], scores: np.ndarray, dice: np.ndarray) -> dict:
    picked = _pick(np.where(np.isfinite(dice), scores, np.nan))
    return {
        "weighted_tau": weighted_tau(scores, dice),
        "pearson": pearson(scores, dice),
        "spearman": spearman(scores, dice),
        "tis": tis(scores, dice),
        "picked": ";".join(models[i] for i in picked) if picked.size else None,
        "n_models": int(np.isfinite(dice).sum()),
        "n_scored": int((np.isfinite(dice) & np.isfinite(scores)).sum()),
    }


def evaluate_estimators(table: Iterable[Mapping], estimators: Sequence[str] | None = None) -> dict:
    """Ranking quality of each estimator per target task and averaged over targets.

    Args:
        table: rows ``{"target", "model", "dice", <estimator>: score, ...}``; a (target, model)
            pair may appear once.
        estimators: the score columns to evaluate (default: every key but target/model/dice, in
            first-seen order). A missing key counts as an undefined score.

    Returns:
        ``{"estimators": [...], "targets": [...],
        "per_target": {target: {estimator: {weighted_tau, pearson, spearman, tis, picked,
        n_models, n_scored}}},
        "mean": {estimator: {weighted_tau, pearson, spearman, tis, n_targets,
        n_defined: {metric: count}}}}``; ``picked`` is the chosen model (``;``-joined on ties).
    """
    rows = [dict(r) for r in table]
    for row in rows:
        missing = [k for k in _RESERVED if k not in row]
        if missing:
            raise ValueError(f"table row {row} lacks {missing}")
    names = list(estimators) if estimators is not None else _estimator_names(rows)
    targets: list[str] = []
    by_target: dict[str, list[dict]] = {}
    for row in rows:
        t = str(row["target"])
        if t not in by_target:
            targets.append(t)
            by_target[t] = []
        if any(str(r["model"]) == str(row["model"]) for r in by_target[t]):
            raise ValueError(f"model {row['model']!r} appears twice for target {t!r}")
        by_target[t].append(row)

    per_target: dict[str, dict] = {}
    for t in targets:
        models = [str(r["model"]) for r in by_target[t]]
        dice = _as_float([r["dice"] for r in by_target[t]])
        per_target[t] = {e: _evaluate_one(models, _as_float([r.get(e) for r in by_target[t]]), dice)
                         for e in names}

    mean: dict[str, dict] = {}
    for e in names:
        entry: dict = {"n_targets": len(targets), "n_defined": {}}
        for m in METRICS:
            vals = np.array([per_target[t][e][m] for t in targets], dtype=np.float64)
            ok = np.isfinite(vals)
            entry[m] = float(vals[ok].mean()) if ok.any() else math.nan
            entry["n_defined"][m] = int(ok.sum())
        mean[e] = entry
    return {"estimators": names, "targets": targets, "per_target": per_target, "mean": mean}


def read_table(path: str | Path) -> list[dict]:
    """Rows of a score table from CSV (header ``target,model,dice,<estimators>``; empty or ``nan``
    cells are undefined) or JSON (a list of row objects, ``null`` = undefined)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return list(json.loads(path.read_text()))
    rows = []
    with path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            row: dict = {"target": raw.pop("target"), "model": raw.pop("model")}
            for key, value in raw.items():
                row[key] = float(value) if value not in ("", None) else math.nan
            rows.append(row)
    return rows


def table_from_files(scores_file: str | Path, dice_file: str | Path, target: str | None = None) -> list[dict]:
    """Join a ``scores.json`` of :func:`medxfer.transferability.score.write_scores` with measured
    fine-tuned Dice into the table :func:`evaluate_estimators` reads.

    ``dice_file``: CSV with columns ``model,dice`` (optionally ``target``; otherwise every row is
    the scores' target). Only the estimator columns named in the scores' meta are kept. A model
    scored but not fine-tuned (or the reverse) is an error naming both files.
    """
    scores = read_json(scores_file, "scores file not found; run the score workflow first")
    meta = scores.get("meta", {}) if isinstance(scores, dict) else {}
    rows = scores.get("rows") if isinstance(scores, dict) else None
    if not isinstance(rows, list):
        raise DatasetError(scores_file, "expected {'meta': ..., 'rows': [...]} as written by write_scores")
    estimators = list(meta.get("estimators") or [k for k in rows[0] if k not in ("model", "arch", "source", "epoch")])
    target = target or Path(str(meta.get("target", "target"))).name
    dice_path = Path(dice_file)
    if not dice_path.is_file():
        raise DatasetError(dice_path, "fine-tuned Dice file not found (CSV with columns model,dice)")
    with dice_path.open(newline="") as fh:
        measured = list(csv.DictReader(fh))
    if not measured or not {"model", "dice"} <= set(measured[0]):
        raise DatasetError(dice_path, "expected a CSV header with at least 'model' and 'dice'")
    dice = {(r.get("target") or target, r["model"]): float(r["dice"]) for r in measured}
    scored = {r["model"] for r in rows}
    unmatched = sorted(scored ^ {m for _, m in dice})
    if unmatched:
        raise DatasetError(dice_path, f"models not in both {Path(scores_file).name} and this file: {unmatched[:5]}")
    table = []
    for (t, model), value in dice.items():
        row = next(r for r in rows if r["model"] == model)
        table.append({"target": t, "model": model, "dice": value,
                      **{e: (math.nan if row.get(e) is None else float(row[e])) for e in estimators}})
    return table


def write_report(result: Mapping, out_dir: str | Path, name: str = "te_evaluation") -> dict[str, Path]:
    """Write :func:`evaluate_estimators`'s result as ``<name>.json`` (NaN -> ``null``) and
    ``<name>.csv`` (one row per target and estimator, then ``scope=mean`` rows; NaN -> ``nan``),
    each atomically (:mod:`medxfer.atomic`). Returns ``{"json": path, "csv": path}``."""
    out_dir = Path(out_dir)
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    write_json(json_path, dict(result))
    fields = ["scope", "target", "estimator", *METRICS, "picked", "n_models", "n_scored"]
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for t in result["targets"]:
            for e in result["estimators"]:
                r = result["per_target"][t][e]
                writer.writerow({"scope": "target", "target": t, "estimator": e,
                                 **{m: r[m] for m in METRICS}, "picked": r["picked"] or "",
                                 "n_models": r["n_models"], "n_scored": r["n_scored"]})
        for e in result["estimators"]:
            r = result["mean"][e]
            writer.writerow({"scope": "mean", "target": "", "estimator": e, **{m: r[m] for m in METRICS},
                             "picked": "", "n_models": "", "n_scored": ""})
    return {"json": json_path, "csv": csv_path}


def plot_scores(table: Iterable[Mapping], out_png: str | Path, estimators: Sequence[str] | None = None,
                result: Mapping | None = None) -> Path:
    """Scatter of estimator score (x) vs fine-tuned Dice (y), one panel per estimator, one colour
    per target task; undefined scores are left out (their count is noted in the panel title).
    With ``result`` (from :func:`evaluate_estimators`), titles show the mean weighted tau.
    Uses matplotlib's Agg canvas directly (no display, no pyplot state). Returns ``out_png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [dict(r) for r in table]
    names = list(estimators) if estimators is not None else _estimator_names(rows)
    targets = list(dict.fromkeys(str(r["target"]) for r in rows))
    ncols = max(1, min(3, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colours = [f"C{i % 10}" for i in range(len(targets))]
    for ax, e in zip(axes, names):
        skipped = 0
        for t, colour in zip(targets, colours):
            sel = [r for r in rows if str(r["target"]) == t]
            x, y = _as_float([r.get(e) for r in sel]), _as_float([r["dice"] for r in sel])
            ok = np.isfinite(x) & np.isfinite(y)
            skipped += int((~ok).sum())
            ax.scatter(x[ok], y[ok], color=colour, label=t, s=24, alpha=0.85)
        title = e
        if result is not None and e in result.get("mean", {}):
            title += f"  (mean tau_w {result['mean'][e]['weighted_tau']:.2f})"
        if skipped:
            title += f"  [{skipped} undefined]"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{e} score")
        ax.set_ylabel("fine-tuned Dice")
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if names and targets:
        axes[0].legend(fontsize=7, title="target", title_fontsize=7)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    return out_png
