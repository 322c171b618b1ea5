"""GBC: Gaussian Bhattacharyya Coefficient, the overlap of per-class Gaussians in feature space (a
SPEC section 5 baseline).

Pándy, Baptista, Unterthiner, Gelly, Karamitsos, Smith, Sabottke, Fuchs, Ferrari,
"Transferability Estimation using Bhattacharyya Class Separability", CVPR 2022.

Steps (SPEC section 5):

1. PCA of the features to ``p = min(pca_dim, D, N)`` dimensions (default ``pca_dim = 64``): thin SVD
   of the centred features, projection on the top ``p`` right singular vectors.
2. Per class ``c``: a diagonal Gaussian ``N(mu_c, diag(v_c))``, ``mu_c`` the class mean and ``v_c`` the
   per-dimension **population** variance (divisor ``n_c``, as ``tf.math.reduce_variance`` in the
   official code), clamped to ``v_c >= min_var = 1e-4``.
3. Bhattacharyya distance between two classes, with ``S = (S_i + S_j) / 2``::

       BD_ij = 1/8 (mu_i - mu_j)^T S^-1 (mu_i - mu_j) + 1/2 ln( det S / sqrt(det S_i det S_j) )

   (diagonal ``S``: sums over dimensions, computed with logs), and the coefficient ``BC_ij = exp(-BD_ij)``.
4. ``GBC = - sum_{i != j} BC_ij`` over **ordered** class pairs (each pair counted twice); ``GBC <= 0``,
   higher (closer to 0) = better separated classes = more transferable.

Edge cases (documented decisions): a class with one sample has variance ``min_var`` in every
dimension (population variance 0, clamped); a single class present gives ``GBC = 0.0`` (no pair
to overlap, the empty sum); ``N < D`` is handled by ``p <= N`` (the directions beyond the data's
rank have zero variance and are clamped); duplicate rows only lower variances (clamped).
"""

from __future__ import annotations

import numpy as np

from medxfer.transferability.features import checked_features

__all__ = ["gbc", "pca_project", "bhattacharyya_distance"]


def pca_project(features: np.ndarray, dim: int) -> np.ndarray:
    """Centred features ``(N, D)`` projected on their top ``min(dim, D, N)`` principal axes ->
    ``(N, p)``."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    p = int(min(dim, x.shape[1], x.shape[0]))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:p].T


def bhattacharyya_distance(mu1: np.ndarray, var1: np.ndarray, mu2: np.ndarray, var2: np.ndarray) -> np.ndarray:
    """Bhattacharyya distance of diagonal Gaussians, broadcast over leading axes.

    Args:
        mu1, mu2: ``(..., p)`` means.
        var1, var2: ``(..., p)`` per-dimension variances (> 0).

    Returns:
        ``(...)`` distances ``1/8 sum d^2 / s + 1/2 sum (ln s - (ln v1 + ln v2) / 2)``, ``s = (v1 + v2) / 2``.
    """
    s = 0.5 * (var1 + var2)
    mahal = np.sum((mu1 - mu2) ** 2 / s, axis=-1)
    logdet = np.sum(np.log(s) - 0.5 * (np.log(var1) + np.log(var2)), axis=-1)
    return 0.125 * mahal + 0.5 * logdet


def gbc(features: np.ndarray, labels: np.ndarray, pca_dim: int = 64, min_var: float = 1e-4) -> float:
    """Gaussian Bhattacharyya Coefficient of features for a classification target.

    Args:
        features: ``(N, D)`` features (e.g. ``pooled(cases, level)[0]``).
        labels: ``(N,)`` integer class of each sample; classes with no sample do not exist here.
        pca_dim: PCA dimension before fitting the Gaussians (default 64; ``min(pca_dim, D, N)`` used).
        min_var: lower clamp of the per-dimension class variances (default 1e-4).

    Returns:
        ``-sum_{i != j} exp(-BD_ij)`` over ordered pairs of present classes (0.0 for one class).
    """
    x, labels = checked_features(features, labels)
    if pca_dim < 1:
        raise ValueError(f"pca_dim must be >= 1, got {pca_dim}")
    classes = np.unique(labels)
    if classes.size < 2:
        return 0.0
    z = pca_project(x, pca_dim)
    mu = np.stack([z[labels == c].mean(axis=0) for c in classes])  # (C, p)
    var = np.stack([np.maximum(z[labels == c].var(axis=0), min_var) for c in classes])  # (C, p)
    bd = bhattacharyya_distance(mu[:, None], var[:, None], mu[None], var[None])  # (C, C)
    bc = np.exp(-bd)
    np.fill_diagonal(bc, 0.0)
    return float(-bc.sum())
