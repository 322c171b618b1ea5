"""Per-case, per-class Dice and HD95 (SPEC section 9).

Conventions (stated once, used everywhere in medxfer):

* Dice = 2 TP / (2 TP + FP + FN) from voxel counts of the binary class masks.
* **Empty vs empty** (class absent from both ground truth and prediction): Dice and HD95 are
  undefined -> ``NaN`` in the per-case table and *excluded* from means (``n`` in the summary
  counts the cases that entered each mean). This is MONAI's ``ignore_empty`` behaviour, except
  that an empty ground truth with a non-empty prediction scores Dice 0 (a false positive is an
  error, MONAI would give NaN).
* HD95 (mm): MONAI ``compute_hausdorff_distance(percentile=95)`` with the voxel spacing of the
  file. When exactly one of the two masks is empty the distance is undefined; we report the
  diagonal of the image in mm (the largest distance possible inside it), a common worst-case
  convention, so a missed structure is penalised instead of silently dropped.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

__all__ = ["case_metrics", "summarize_cases", "dice_from_masks"]


def dice_from_masks(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Dice of two boolean masks of the same shape; NaN when both are empty."""
    tp = torch.count_nonzero(pred & gt).item()
    fp = torch.count_nonzero(pred & ~gt).item()
    fn = torch.count_nonzero(~pred & gt).item()
    denom = 2 * tp + fp + fn
    return float("nan") if denom == 0 else 2.0 * tp / denom


def case_metrics(pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float],
                 class_names: Mapping[int, str]) -> dict[str, float]:
    """Dice and HD95 of every foreground class of one case.

    Args:
        pred: ``(X, Y, Z)`` or ``(1, X, Y, Z)`` integer label map (argmax of the network output).
        label: ground truth label map of the same shape, in the same voxel grid.
        spacing: voxel size in mm along the three array axes.
        class_names: ``{class index: name}``; index 0 (background) is skipped.

    Returns:
        ``{"dice_<name>": float, "hd95_<name>": float (mm), ...}``.
    """
    pred = torch.as_tensor(pred).squeeze()
    label = torch.as_tensor(label).squeeze()
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
    spacing = [float(s) for s in spacing]
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(label.shape, spacing)))
    out: dict[str, float] = {}
    for index, name in sorted(class_names.items()):
        if int(index) == 0:
            continue
        p, g = pred == int(index), label == int(index)
        out[f"dice_{name}"] = dice_from_masks(p, g)
        has_p, has_g = bool(p.any()), bool(g.any())
        if not has_p and not has_g:
            out[f"hd95_{name}"] = float("nan")
        elif has_p != has_g:
            out[f"hd95_{name}"] = diagonal
        else:
            hd = compute_hausdorff_distance(p[None, None].float(), g[None, None].float(), include_background=True,
                                            percentile=95, spacing=spacing)
            out[f"hd95_{name}"] = float(hd.item())
    return out


def summarize_cases(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, std and count over cases of every metric column, NaN (empty vs empty) excluded.

    Args:
        rows: one mapping per case, e.g. ``{"case": "spleen_3", "dice_spleen": 0.91, ...}``;
            non-numeric columns are ignored.

    Returns:
        ``{column: {"mean": .., "std": .., "n": ..}}``; mean/std are NaN when ``n == 0``.
    """
    columns = [k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], (int, float))]
    summary = {}
    for col in columns:
        values = np.array([float(r[col]) for r in rows], dtype=float)
        values = values[~np.isnan(values)]
        summary[col] = {"mean": float(values.mean()) if values.size else float("nan"),
                        "std": float(values.std()) if values.size else float("nan"), "n": int(values.size)}
    return summary
