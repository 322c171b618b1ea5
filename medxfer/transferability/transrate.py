"""TransRate: the mutual information between features and labels, measured by coding rates (a
SPEC section 5 baseline).

Huang, Huang, Rong, Yang, Wei, "Frustratingly Easy Transferability Estimation", ICML 2022; the
coding rate is that of Ma et al. (2007) / Yu et al. (MCR^2, 2020).

Steps (SPEC section 5)::

    Z    = rows of (F - mean(F)), each L2-normalised                    (N, D)
    R(Z) = 1/2 ln det( I_D + Z^T Z / (n eps2) ),  n = rows of Z
    TrR  = R(Z) - sum_c (n_c / N) R(Z_c)

``R`` is computed from the eigenvalues of the smaller Gram matrix (``Z^T Z`` or ``Z Z^T``, which
share their non-zero eigenvalues ``lam``): ``R = 1/2 sum ln(1 + lam / (n eps2))``, stable for
``N < D`` and ``N >= D``.

Documented decisions:

* ``eps2`` is the squared distortion ``eps^2``, default ``1e-4`` (the official code's ``eps=1e-4``
  is used where ``eps^2`` stands, so the defaults coincide).
* Order: centre first, then L2-normalise each row (SPEC). A row equal to the mean (centred norm
  at most ``1e-12`` times the largest row norm, i.e. zero up to rounding) stays the zero vector.
* ``Z_c`` are the rows of class ``c`` of the globally centred and normalised ``Z``, **not
  re-centred** per class (as in the official code: ``coding_rate(Z[y == c])``), and ``R(Z_c)``
  uses its own row count ``n_c`` inside the log-det.
* Class weights ``n_c / N`` as in SPEC and the paper's coding rate of the partition (the official
  code uses ``1 / K``).
* Edge cases: a single class gives 0.0 (``R(Z) - R(Z)``); a class with one sample ``z`` has
  ``R = 1/2 ln(1 + |z|^2 / eps2)``; duplicate rows and ``N < D`` need no special case. Classes with
  no sample do not appear.
"""

from __future__ import annotations

import numpy as np

from medxfer.transferability.features import checked_features

__all__ = ["transrate", "coding_rate"]


def coding_rate(z: np.ndarray, eps2: float = 1e-4) -> float:
    """Coding rate ``R(Z) = 1/2 ln det(I_D + Z^T Z / (n eps2))`` of ``z (n, D)`` (0.0 for ``n = 0``)."""
    z = np.asarray(z, dtype=np.float64)
    n, d = z.shape
    if n == 0:
        return 0.0
    gram = z.T @ z if d <= n else z @ z.T
    lam = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    return float(0.5 * np.sum(np.log1p(lam / (n * eps2))))


def transrate(features: np.ndarray, labels: np.ndarray, eps2: float = 1e-4) -> float:
    """TransRate of features for a classification target (higher = more transferable).

    Args:
        features: ``(N, D)`` features (e.g. ``pooled(cases, level)[0]``).
        labels: ``(N,)`` integer class of each sample.
        eps2: squared distortion ``eps^2`` of the coding rate (default 1e-4).

    Returns:
        ``R(Z) - sum_c (n_c / N) R(Z_c)`` (module docstring: normalisation and edge cases).
    """
    x, labels = checked_features(features, labels)
    if not eps2 > 0:
        raise ValueError(f"eps2 must be > 0, got {eps2}")
    z = x - x.mean(axis=0, keepdims=True)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    # a row equal to the mean up to rounding (e.g. all rows identical) stays zero, not unit noise
    floor = 1e-12 * float(np.linalg.norm(x, axis=1).max())
    z = np.divide(z, norms, out=np.zeros_like(z), where=norms > floor)
    n = z.shape[0]
    rate = coding_rate(z, eps2)
    for c in np.unique(labels):
        zc = z[labels == c]
        rate -= zc.shape[0] / n * coding_rate(zc, eps2)
    return float(rate)
