"""Voxel features of a pretrained network on a target dataset, the input of every estimator.

(Sampling code follows in this file; the container below is the interface the estimators use.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CaseFeatures", "pooled"]


@dataclass
class CaseFeatures:
    """Sampled voxels of one target case, seen by one source model.

    Attributes:
        case_id: the case's id.
        levels: per decoder level ``l`` (deepest first), ``(n, d_l)`` float32 features of the
            ``n`` sampled voxels (each decoder map resized to the window before sampling).
        labels: ``(n,)`` int64 target label of each sampled voxel (0 = background).
        variety: ``(n,)`` bool, True for the voxels drawn uniformly over the whole case (the
            feature-variety sample of CC-FV); the others were drawn per class
            (class-proportional counts), for class consistency and the baselines.
        source_probs: ``(n, Z)`` float32 softmax of the source head at the sampled voxels
            (``Z`` = source classes), for LEEP / NCE; ``None`` when not recorded.
    """

    case_id: str
    levels: list[np.ndarray]
    labels: np.ndarray
    variety: np.ndarray
    source_probs: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def pooled(cases: list[CaseFeatures], level: int = -1, class_sample: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All cases' voxels of one decoder level as ``(features (N, d), labels (N,))``.

    ``level=-1`` is the last (highest-resolution) decoder stage, the "layer before the final
    convolution" the CC-FV paper feeds to the baselines. ``class_sample=True`` keeps the
    class-proportional sample (not the uniform variety sample).
    """
    feats, labels = [], []
    for case in cases:
        keep = ~case.variety if class_sample else np.ones_like(case.variety)
        feats.append(case.levels[level][keep])
        labels.append(case.labels[keep])
    return np.concatenate(feats), np.concatenate(labels)
