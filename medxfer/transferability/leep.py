"""LEEP, the log expected empirical prediction (Nguyen et al., "LEEP: A New Measure to Evaluate
Transferability of Learned Representations", ICML 2020; thesis eqs. 3.3-3.6).

The source model's head is applied unchanged to the target samples (here: sampled voxels); its
class probabilities ``theta(x)`` over the ``Z`` source classes are turned into a predictor of the
target labels through the empirical conditional ``P(y | z)``:

- joint (eq. 3.3):        ``P(y, z) = (1/N) sum_i theta_z(x_i) 1[y_i = y]``           ``(K, Z)``
- marginal (eq. 3.4):     ``P(z) = sum_y P(y, z) = (1/N) sum_i theta_z(x_i)``         ``(Z,)``
- conditional (eq. 3.5):  ``P(y | z) = P(y, z) / P(z)``
- LEEP (eq. 3.6):         ``T = (1/N) sum_i log sum_z P(y_i | z) theta_z(x_i)``

``T <= 0``; higher = more transferable; ``T = 0`` exactly when the source head deterministically
predicts the target label (one-hot ``theta`` and every source class maps to one target class).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .features import CaseFeatures

__all__ = ["leep", "leep_cases", "pooled_source_probs", "LEEP_EPS"]

#: Floor of the EEP likelihood inside the log, a safeguard only: mathematically
#: ``sum_z P(y_i|z) theta_z(x_i) >= sum_z theta_z(x_i)^2 / (N P(z)) > 0`` (the sample itself
#: contributes ``theta_z(x_i)/N`` to ``P(y_i, z)``), so with float64 arithmetic it does not reach
#: 0; the floor keeps the log finite (``log(1e-12) ~ -27.6``) should it ever underflow, and leaves
#: every likelihood above it unchanged (so a perfect head still gives exactly 0).
LEEP_EPS = 1e-12


def _check_probs_labels(source_probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(source_probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"source_probs must be (N, Z), got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be (N,) = ({probs.shape[0]},), got shape {labels.shape}")
    if probs.shape[0] == 0:
        raise ValueError("LEEP needs at least one sample")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        raise ValueError("source_probs must be probabilities (non-negative rows summing to 1, e.g. a "
                         "softmax), not logits")
    return probs, labels


def leep(source_probs, labels) -> float:
    """LEEP score (eq. 3.6) of a source head on target samples.

    Args:
        source_probs: ``(N, Z)`` softmax of the source head at each sample (rows sum to 1).
        labels: ``(N,)`` integer target label of each sample (any integer values; they are used
            as categories only).

    Returns:
        ``T = (1/N) sum_i log max(sum_z P(y_i | z) theta_z(x_i), LEEP_EPS)`` in nats, ``<= 0``.
        A source class with ``P(z) = 0`` gets ``P(y | z) = 0`` (its ``theta_z`` is 0 everywhere,
        so it contributes nothing).
    """
    probs, labels = _check_probs_labels(source_probs, labels)
    n = probs.shape[0]
    _, y = np.unique(labels, return_inverse=True)
    k = int(y.max()) + 1
    joint = np.zeros((k, probs.shape[1]))                    # P(y, z), (K, Z)
    np.add.at(joint, y, probs)
    joint /= n
    marginal = joint.sum(axis=0)                              # P(z), (Z,)
    cond = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)  # P(y|z)
    eep = np.einsum("nz,nz->n", probs, cond[y])               # sum_z P(y_i|z) theta_z(x_i)
    return float(np.mean(np.log(np.maximum(eep, LEEP_EPS))))


def pooled_source_probs(cases: Sequence[CaseFeatures], class_sample: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All cases' source-head probabilities and target labels as ``((N, Z), (N,))``.

    The voxels are those of :func:`medxfer.transferability.features.pooled` (``class_sample=True``:
    the class-proportional sample, the one the baselines use), so LEEP / NCE see the same voxels
    as the feature-based baselines.
    """
    probs, labels = [], []
    for case in cases:
        if case.source_probs is None:
            raise ValueError(f"case {case.case_id!r} has no source_probs: record the source head's "
                             "softmax when sampling features (needed by LEEP / NCE)")
        keep = ~case.variety if class_sample else np.ones_like(case.variety)
        probs.append(case.source_probs[keep])
        labels.append(case.labels[keep])
    if not probs:
        raise ValueError("no cases given")
    return np.concatenate(probs), np.concatenate(labels)


def leep_cases(cases: Sequence[CaseFeatures], class_sample: bool = True) -> float:
    """:func:`leep` on the sampled voxels of all cases (see :func:`pooled_source_probs`)."""
    return leep(*pooled_source_probs(cases, class_sample))
