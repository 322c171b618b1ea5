"""TransRate: the mutual information between features and labels, measured by coding rates (a
SPEC section 5 baseline).

Huang, Huang, Rong, Yang, Wei, "Frustratingly Easy Transferability Estimation", ICML 2022; the
coding rate is that of Ma et al. (2007) / Yu et al. (MCR^2, 2020).

Two variants (SPEC section 5), chosen with ``variant``:

``"paper"`` (default: the paper's definition, as SPEC section 5 writes it)::

    Z    = rows of (F - mean(F)), each L2-normalised                    (N, D)
    R(Z) = 1/2 ln det( I_D + Z^T Z / (n eps2) ),  n = rows of Z
    TrR  = R(Z) - sum_c (n_c / N) R(Z_c)

``"official"`` (the authors' code, Long-Kai/TransRate, with its default options): the two places
where it differs from the paper, measured to be the only two on identical inputs:

1. the rows of ``F`` are L2-normalised **before** centring (the feature extractor's
   ``torch.nn.functional.normalize``, i.e. ``f / max(|f|, 1e-12)``), then centred, then
   L2-normalised again;
2. the result is divided by ``rank(Z^T Z / N)`` (its ``normalize_opt='rank'``; numpy's
   ``matrix_rank`` tolerance ``lam_max * D * machine eps``), both ``R(Z)`` and every ``R(Z_c)`` by
   the same rank of the whole ``Z``::

    TrR_official = ( R(Z) - sum_c (n_c / N) R(Z_c) ) / rank(Z)

Everything else is the same in both: ``eps2`` stands where the official code's ``eps`` does (its
docstring: "value of eps^2"), the rates come from all eigenvalues of ``Z^T Z / n`` (its
``opt_active_eigs='all'``, so its residual option changes nothing), and classes are weighted
``n_c / N`` in the official code too (the ``1 / K`` weighting found elsewhere is a third-party
library's, not the authors').

``R`` is computed from the eigenvalues of the smaller Gram matrix (``Z^T Z`` or ``Z Z^T``, which
share their non-zero eigenvalues ``lam``): ``R = 1/2 sum ln(1 + lam / (n eps2))``, stable for
``N < D`` and ``N >= D``; the official variant's rank counts the same eigenvalues.

Documented decisions:

* ``eps2`` is the squared distortion ``eps^2``, default ``1e-4`` (the official code's default
  ``eps=1e-4`` is its ``eps^2``, so the defaults coincide).
* A row equal to the mean (centred norm at most ``1e-12`` times the largest row norm, i.e. zero up
  to rounding) stays the zero vector, in both variants (the official code divides by its zero norm
  and returns NaN there).
* ``Z_c`` are the rows of class ``c`` of the globally centred and normalised ``Z``, **not
  re-centred** per class (as in the official code), and ``R(Z_c)`` uses its own row count ``n_c``
  inside the log-det.
* Classes are the label values present (the official code takes ``0 .. max(label)`` and needs
  every one of them to have a sample); classes with no sample do not appear.
* Edge cases: a single class gives 0.0 (``R(Z) - R(Z)``); a class with one sample ``z`` has
  ``R = 1/2 ln(1 + |z|^2 / eps2)``; duplicate rows and ``N < D`` need no special case. When every
  row is the mean (``Z = 0``, rank 0) the official variant gives 0.0, like the paper variant.
"""

from __future__ import annotations

import numpy as np

from medxfer.transferability.features import checked_features

__all__ = ["transrate", "coding_rate", "TRANSRATE_VARIANTS"]

#: The values of ``transrate(..., variant=...)`` (module docstring).
TRANSRATE_VARIANTS = ("paper", "official")


def _gram_eigenvalues(z: np.ndarray) -> np.ndarray:
    """Non-negative eigenvalues of the smaller of ``Z^T Z`` / ``Z Z^T`` (the non-zero ones of both)."""
    n, d = z.shape
    gram = z.T @ z if d <= n else z @ z.T
    return np.clip(np.linalg.eigvalsh(gram), 0.0, None)


def _rate(lam: np.ndarray, n: int, eps2: float) -> float:
    return float(0.5 * np.sum(np.log1p(lam / (n * eps2))))


def coding_rate(z: np.ndarray, eps2: float = 1e-4) -> float:
    """Coding rate ``R(Z) = 1/2 ln det(I_D + Z^T Z / (n eps2))`` of ``z (n, D)`` (0.0 for ``n = 0``)."""
    z = np.asarray(z, dtype=np.float64)
    if z.shape[0] == 0:
        return 0.0
    return _rate(_gram_eigenvalues(z), z.shape[0], eps2)


def _unit_rows(z: np.ndarray, floor: float) -> np.ndarray:
    """Rows of ``z`` divided by their L2 norm; rows with norm at most ``floor`` become zero."""
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return np.divide(z, norms, out=np.zeros_like(z), where=norms > floor)


def transrate(features: np.ndarray, labels: np.ndarray, eps2: float = 1e-4, variant: str = "paper") -> float:
    """TransRate of features for a classification target (higher = more transferable).

    Args:
        features: ``(N, D)`` features (e.g. ``pooled(cases, level)[0]``).
        labels: ``(N,)`` integer class of each sample.
        eps2: squared distortion ``eps^2`` of the coding rate (default 1e-4).
        variant: ``"paper"`` (default: centre, then L2-normalise rows) or ``"official"`` (the
            authors' code: L2-normalise, centre, L2-normalise again, divide by ``rank(Z)``).

    Returns:
        ``R(Z) - sum_c (n_c / N) R(Z_c)``, divided by ``rank(Z)`` for ``"official"`` (module
        docstring: normalisation and edge cases).
    """
    x, labels = checked_features(features, labels)
    if not eps2 > 0:
        raise ValueError(f"eps2 must be > 0, got {eps2}")
    if variant not in TRANSRATE_VARIANTS:
        raise ValueError(f"TransRate variant must be one of {TRANSRATE_VARIANTS}, got {variant!r}")
    if variant == "official":
        # torch.nn.functional.normalize(feat) of the authors' feature extractor: f / max(|f|, 1e-12)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    z = x - x.mean(axis=0, keepdims=True)
    # a row equal to the mean up to rounding (e.g. all rows identical) stays zero, not unit noise
    z = _unit_rows(z, floor=1e-12 * float(np.linalg.norm(x, axis=1).max()))
    n, d = z.shape
    lam = _gram_eigenvalues(z)
    rate = _rate(lam, n, eps2)
    for c in np.unique(labels):
        zc = z[labels == c]
        rate -= zc.shape[0] / n * coding_rate(zc, eps2)
    if variant == "official":
        # numpy's matrix_rank of the (D, D) matrix Z^T Z / N: singular values above lam_max * D * eps
        lam = lam / n
        rank = int(np.sum(lam > lam.max() * d * np.finfo(np.float64).eps)) if lam.size else 0
        if rank == 0:  # Z = 0: every rate is 0 (the official code gives NaN here)
            return 0.0
        rate /= rank
    return float(rate)
