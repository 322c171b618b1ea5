"""NCE, the negative conditional entropy of the target labels given the source labels (Tran et al.,
"Transferability and Hardness of Supervised Classification Tasks", ICCV 2019; thesis eq. 3.2).

With hard source labels ``z_i`` (here: the argmax of the source head at each sampled voxel) and
target labels ``y_i``, the empirical joint is ``P(y, z) = (1/N) #{i : y_i = y, z_i = z}`` and

    ``NCE = -H(Y | Z) = sum_{y, z} P(y, z) log P(y | z),   P(y | z) = P(y, z) / P(z)``    (eq. 3.2)

in nats (natural log); cells with ``P(y, z) = 0`` contribute 0 (``0 log 0 = 0``). ``NCE <= 0``;
higher = more transferable; ``NCE = 0`` exactly when the target label is a function of the source
label.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .features import CaseFeatures
from .leep import pooled_source_probs

__all__ = ["nce", "nce_from_probs", "nce_cases"]


def nce(source_labels, target_labels) -> float:
    """Negative conditional entropy ``-H(Y | Z)`` (eq. 3.2) of target labels given source labels.

    Args:
        source_labels: ``(N,)`` integer source-class label ``z_i`` of each sample.
        target_labels: ``(N,)`` integer target label ``y_i`` of each sample.

    Returns:
        ``-H(Y | Z)`` in nats, ``<= 0``.
    """
    z = np.asarray(source_labels)
    y = np.asarray(target_labels)
    if z.ndim != 1 or z.shape != y.shape:
        raise ValueError(f"source_labels and target_labels must both be (N,), got {z.shape} and {y.shape}")
    if z.size == 0:
        raise ValueError("NCE needs at least one sample")
    if not (np.issubdtype(z.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be integers, got dtypes {z.dtype} and {y.dtype}")
    _, zi = np.unique(z, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    joint = np.zeros((int(yi.max()) + 1, int(zi.max()) + 1))  # (K, Z) counts
    np.add.at(joint, (yi, zi), 1.0)
    joint /= z.size
    marginal = joint.sum(axis=0, keepdims=True)               # P(z), every column > 0
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log((joint / marginal)[nz])))


def nce_from_probs(source_probs, target_labels) -> float:
    """:func:`nce` with the hard source labels ``z_i = argmax_z theta_z(x_i)`` of a ``(N, Z)``
    source-head output (probabilities or logits; ties go to the lowest class index)."""
    probs = np.asarray(source_probs)
    if probs.ndim != 2:
        raise ValueError(f"source_probs must be (N, Z), got shape {probs.shape}")
    return nce(np.argmax(probs, axis=1), target_labels)


def nce_cases(cases: Sequence[CaseFeatures], class_sample: bool = True) -> float:
    """:func:`nce_from_probs` on the sampled voxels of all cases (the voxels of
    :func:`medxfer.transferability.leep.pooled_source_probs`)."""
    return nce_from_probs(*pooled_source_probs(cases, class_sample))
