"""AUROC and AUPRC for classification heads (SPEC sections 8 and 9).

Truncated transfer learning (Peng et al. 2021, "Rethink Transfer Learning in Medical Image
Classification") reports AUPRC beside AUROC: under class imbalance AUROC saturates (their example,
10 positives among 1000: classifiers with AUROC 0.999 and 0.991 have AUPRC 0.990 and 0.354),
while precision exposes how many negatives are ranked above the positives.

Definitions (computed by MONAI, ``monai.metrics.compute_roc_auc`` and
``monai.metrics.compute_average_precision``, one column at a time):

* AUROC = area under the ROC curve = P(score of a random positive > score of a random negative),
  ties counting 1/2 (the Mann-Whitney U statistic divided by ``n_pos * n_neg``).
* AUPRC, ``method="average_precision"`` (default of :func:`auprc`): ``sum_n (R_n - R_{n-1}) P_n``
  over the distinct score thresholds in decreasing order (step-wise, no interpolation:
  scikit-learn's ``average_precision_score``). A random scorer has expected AUPRC ~ the prevalence.
* AUPRC, ``method="trapezoid"``: the trapezoidal area under the same (R_n, P_n) points with
  (R, P) = (0, 1) prepended, ``sum_n (R_n - R_{n-1}) (P_n + P_{n-1}) / 2`` -- what the truncated
  transfer authors' code reports (scikit-learn ``auc(recall, precision)`` of
  ``precision_recall_curve``; the paper does not say). Linear interpolation between PR points is
  optimistic (it can exceed average precision), hence not the default; the truncated-transfer
  preset uses it to compare with the paper's numbers. Written out here (NumPy), no library has it
  besides scikit-learn.

Inputs: ``scores`` of shape ``(N,)`` (binary) or ``(N, C)`` (one column per class: multi-label, or
multi-class one-vs-rest); ``y_true`` of shape ``(N,)`` with 0/1 labels (binary), ``(N, C)`` 0/1
indicators (multi-label), or ``(N,)`` integer class indices in ``[0, C)`` with 2-D scores
(multi-class, one-hot encoded here). Scores may be logits or probabilities (only the ranking
matters) and must be finite.

**Single-class columns**: when a class has only positives or only negatives, AUROC and AUPRC are
undefined and reported as ``NaN`` (no warning); the macro mean is the mean over the classes where
the value is defined (NaN excluded, as the segmentation means of SPEC section 9), ``NaN`` when no
class is defined.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric, compute_average_precision, compute_roc_auc

__all__ = ["AUPRC_METHODS", "auroc", "auprc", "auprc_trapezoid", "classification_report", "RankingMetric"]

#: How :func:`auprc` integrates the precision-recall curve.
AUPRC_METHODS = ("average_precision", "trapezoid")


def _as_inputs(y_true, scores) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y, s) float64 tensors of the same shape, ``(N,)`` or ``(N, C)``, y in {0, 1}."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    y = torch.as_tensor(np.asarray(y_true))
    if s.ndim not in (1, 2):
        raise ValueError(f"scores must have shape (N,) or (N, C), got {tuple(s.shape)}")
    if s.shape[0] == 0:
        raise ValueError("scores are empty")
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples, scores {s.shape[0]}")
    if s.ndim == 2 and y.ndim == 1:  # multi-class labels -> one-vs-rest indicators
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise ValueError("y_true (N,) with 2-D scores must hold integer class indices")
        y = y.long()
        if y.min() < 0 or y.max() >= s.shape[1]:
            raise ValueError(f"class indices in y_true must be in [0, {s.shape[1]}), got "
                             f"[{int(y.min())}, {int(y.max())}]")
        y = torch.nn.functional.one_hot(y, s.shape[1])
    if tuple(y.shape) != tuple(s.shape):
        raise ValueError(f"y_true shape {tuple(y.shape)} does not match scores shape {tuple(s.shape)}")
    y = y.to(torch.float64)
    if not torch.all((y == 0) | (y == 1)):
        raise ValueError(f"y_true must hold 0/1 labels, found {sorted(set(y.unique().tolist()))}")
    return y, s


def _per_column(metric, y: torch.Tensor, s: torch.Tensor) -> list[float]:
    out = []
    for yc, sc in zip(y.T, s.T):
        n_pos = int(yc.sum().item())
        out.append(float("nan") if n_pos in (0, yc.numel()) else float(metric(sc, yc)))
    return out


def _nanmean(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(sum(defined) / len(defined)) if defined else float("nan")


def _evaluate(metric, y_true, scores):
    y, s = _as_inputs(y_true, scores)
    if s.ndim == 1:
        return _per_column(metric, y[:, None], s[:, None])[0]
    per_class = _per_column(metric, y, s)
    return {"per_class": per_class, "macro": _nanmean(per_class)}


def auroc(y_true, scores) -> float | dict:
    """Area under the ROC curve (MONAI ``compute_roc_auc`` per column).

    Args:
        y_true: ``(N,)`` 0/1 labels, ``(N, C)`` 0/1 indicators, or ``(N,)`` class indices with 2-D scores.
        scores: ``(N,)`` or ``(N, C)`` finite scores (higher = more positive).

    Returns:
        1-D: a float (NaN if ``y_true`` has a single value). 2-D: ``{"per_class": [C floats],
        "macro": float}`` (NaN classes excluded from the macro mean).
    """
    return _evaluate(compute_roc_auc, y_true, scores)


def auprc_trapezoid(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Trapezoidal area under the PR curve of one column (see the module docstring): thresholds
    = the distinct scores, highest first; (R, P) = (0, 1) prepended."""
    s, t = scores.double().cpu().numpy(), y.double().cpu().numpy()
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]   # last index of each distinct threshold
    tp = np.cumsum(t)[last]
    precision, recall = tp / (last + 1), tp / t.sum()
    recall, precision = np.r_[0.0, recall], np.r_[1.0, precision]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def _auprc_fn(method: str):
    if method not in AUPRC_METHODS:
        raise ValueError(f"AUPRC method must be one of {list(AUPRC_METHODS)}, got {method!r}")
    return compute_average_precision if method == "average_precision" else auprc_trapezoid


def auprc(y_true, scores, method: str = "average_precision") -> float | dict:
    """Area under the precision-recall curve.

    ``method="average_precision"`` (MONAI ``compute_average_precision``): step-wise
    ``sum_n (R_n - R_{n-1}) P_n`` over decreasing distinct thresholds (tied scores form one
    threshold), scikit-learn's definition. ``method="trapezoid"``: :func:`auprc_trapezoid` (the
    truncated-transfer authors' number). Same shapes and NaN rules as :func:`auroc`.
    """
    return _evaluate(_auprc_fn(method), y_true, scores)


def classification_report(y_true, scores, class_names: Sequence[str] | None = None,
                          auprc_method: str = "average_precision") -> dict:
    """AUROC, AUPRC, prevalence and sample count in one dict.

    Returns:
        1-D: ``{"auroc", "auprc", "prevalence", "n", "n_positive"}``. 2-D: ``"auroc"`` / ``"auprc"``
        are the macro means, ``"prevalence"`` the mean per-class prevalence (the expected macro AUPRC
        of a random scorer), ``"n"`` the sample count, and ``"per_class"`` maps each class name
        (``class_names`` or ``"0"``, ``"1"``, ...) to its own ``auroc``, ``auprc``, ``prevalence``,
        ``n_positive``. ``auprc_method``: see :func:`auprc`; reported as ``"auprc_method"``.
    """
    y, s = _as_inputs(y_true, scores)
    n = int(y.shape[0])
    if s.ndim == 1:
        n_pos = int(y.sum().item())
        return {"auroc": auroc(y, s), "auprc": auprc(y, s, auprc_method), "prevalence": n_pos / n, "n": n,
                "n_positive": n_pos, "auprc_method": auprc_method}
    names = [str(c) for c in (class_names if class_names is not None else range(s.shape[1]))]
    if len(names) != s.shape[1]:
        raise ValueError(f"{len(names)} class names for {s.shape[1]} score columns")
    roc, pr = auroc(y, s), auprc(y, s, auprc_method)
    n_pos = [int(v) for v in y.sum(dim=0).tolist()]
    per_class = {name: {"auroc": roc["per_class"][i], "auprc": pr["per_class"][i], "prevalence": n_pos[i] / n,
                        "n_positive": n_pos[i]} for i, name in enumerate(names)}
    return {"auroc": roc["macro"], "auprc": pr["macro"], "prevalence": sum(n_pos) / (n * len(names)), "n": n,
            "per_class": per_class, "auprc_method": auprc_method}


class RankingMetric(CumulativeIterationMetric):
    """AUROC or AUPRC (macro mean over classes, NaN classes left out) as a MONAI cumulative metric,
    for ``monai.handlers.IgniteMetricHandler`` in an evaluator (e.g. the validation AUPRC the
    truncated-transfer protocol halves its learning rate on).

    Buffers every iteration's ``y_pred`` ``(B, C)`` / ``(B,)`` scores and ``y`` (0/1 indicators of
    the same shape, or ``(B,)`` class indices with 2-D scores); :meth:`aggregate` computes
    :func:`auroc` / :func:`auprc` over everything buffered. MONAI's own ``ROCAUCMetric`` /
    ``AveragePrecisionMetric`` warn and average differently on single-class columns.

    Args:
        kind: ``"auprc"`` or ``"auroc"``. method: the AUPRC method (:data:`AUPRC_METHODS`).
    """

    def __init__(self, kind: str = "auprc", method: str = "average_precision") -> None:
        super().__init__()
        if kind not in ("auprc", "auroc"):
            raise ValueError(f"RankingMetric: kind must be 'auprc' or 'auroc', got {kind!r}")
        _auprc_fn(method)
        self.kind, self.method = kind, method

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        return y_pred, y

    def aggregate(self) -> float:  # type: ignore[override]
        y_pred, y = self.get_buffer()
        value = auroc(y.cpu(), y_pred.cpu()) if self.kind == "auroc" else auprc(y.cpu(), y_pred.cpu(), self.method)
        return float(value["macro"] if isinstance(value, dict) else value)
