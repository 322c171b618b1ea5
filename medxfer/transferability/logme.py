"""LogME: the maximum log evidence of a Bayesian linear model on the features (a SPEC section 5
baseline).

You, Liu, Wang, Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021 (Algorithm 1).

For a target column ``y (N,)`` and features ``F (N, D)``, with the prior ``w ~ N(0, alpha^-1 I_D)``
and the noise ``y | F, w ~ N(F w, beta^-1 I_N)``, the log evidence is, in closed form::

    L(alpha, beta) = N/2 ln beta + D/2 ln alpha - N/2 ln 2pi
                     - beta/2 ||y - F m||^2 - alpha/2 m^T m - 1/2 ln det A,
    A = alpha I_D + beta F^T F,   m = beta A^-1 F^T y.

It is maximised with MacKay's fixed-point updates (the paper's Algorithm 1)::

    gamma = sum_i beta s_i / (alpha + beta s_i),   alpha <- gamma / m^T m,
    beta <- (N - gamma) / ||y - F m||^2,

``s_i`` the eigenvalues of ``F^T F``. Everything comes from one thin SVD
``F = U diag(sqrt(s)) V^T`` (``k = min(N, D)`` singular values), so ``N < D`` and ``N >= D`` are
handled alike, and each class costs ``O(N k)``.

Exact evidence when ``N < D``: ``F^T F`` has at most ``k`` non-zero eigenvalues, the other
``D - k`` are zero, so ``ln det A = sum_{i<=k} ln(alpha + beta s_i) + (D - k) ln alpha``. The
official fixed-point code sums over the ``k`` singular values only and so drops
``-(D - k)/2 ln alpha``; here the determinant is the exact one over all ``D`` dimensions (SPEC
section 5). (The fixed-point updates are the stationarity conditions of this exact evidence: the
zero eigenvalues add nothing to ``gamma``.) Rank-deficient features (duplicate rows or columns)
enter with ``s_i = 0``, the same exact formula.

Conventions (documented decisions):

* The features are used as given (no centring, no bias column), as in the paper.
* The score is the evidence **per sample**, ``L / N``, of each one-hot column ``y_c = [label == c]``,
  **averaged over the classes present** in ``labels``; classes with no sample are skipped (they
  would give ``y = 0``, a degenerate target).
* At most ``max_iter = 11`` updates; stop when the ratio ``t = alpha / beta`` (which alone
  determines the next ``alpha`` and ``beta``) changes by at most ``tol = 1e-3`` relatively. The
  returned evidence is evaluated exactly at the final ``(alpha, beta)``.
* Starting point (``init``). The official code starts at ``alpha = beta = 1`` (``init="paper"``).
  That start is far on the over-fitting side when ``N < D`` (``t = 1`` is tiny next to the
  spectrum), and 11 updates then stop well short of the maximum (measured: 0.05-0.2 nats per
  sample below it; about 30 updates are needed). The default ``init="profile"`` starts at the best
  ratio on a log grid (4 per decade, ``1e-10..1e4 * max s``) of the profile evidence
  ``max_beta L(t beta, beta)``, which is closed-form: ``beta*(t) = N / (||y - F m||^2 + t m^T m)``.
  The fixed-point updates then reach the maximum to well within 1e-3 nats per sample, for
  ``N < D`` and ``N >= D``.
* Update denominators. The official code (thuml/LogME, ``each_evidence``) adds ``epsilon = 1e-5``
  to both denominators, ``alpha <- gamma / (m^T m + 1e-5)`` and ``beta <- (N - gamma) /
  (||y - F m||^2 + 1e-5)``, which caps ``beta`` (and ``alpha``) when the residual (the weights) is
  tiny. We do not (SPEC section 5): the updates are the exact stationarity conditions, guarded
  only against a zero denominator (``alpha`` is kept when ``m^T m = 0``; the residual is floored at
  the smallest positive float). The ``1e-5`` matters only when ``m^T m`` or ``||y - F m||^2`` is
  not far above it (a target almost in the span of ``F``, or almost no weight needed).
* A single class present: the score is the evidence of the constant all-ones target, a finite
  number that says nothing about class separation (do not rank models on it).
* When the evidence only approaches its supremum as ``alpha -> inf`` (a class with no linear
  signal, ``w = 0`` best), the iteration stops at a large finite ``alpha`` whose evidence is at
  that limit to within the tolerance.
"""

from __future__ import annotations

import numpy as np

__all__ = ["logme", "log_evidence", "maximise_evidence"]

_TINY = np.finfo(np.float64).tiny


class _Spectrum:
    """The thin SVD of ``F (N, D)`` kept for every target: ``u (N, k)``, ``s (k,)`` eigenvalues of
    ``F^T F`` (squared singular values), ``k = min(N, D)``."""

    def __init__(self, features: np.ndarray):
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {f.shape}")
        if f.shape[0] == 0 or f.shape[1] == 0:
            raise ValueError(f"features must be non-empty, got shape {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError("features contain NaN or inf")
        self.n, self.d = f.shape
        self.u, sv, _ = np.linalg.svd(f, full_matrices=False)
        self.s = sv**2

    def project(self, y: np.ndarray) -> tuple[np.ndarray, float]:
        """``x = U^T y (k,)`` and ``||(I - U U^T) y||^2``, the part of ``y`` outside the span of F."""
        x = self.u.T @ y
        r = y - self.u @ x
        return x, float(r @ r)

    def terms(self, x: np.ndarray, perp2: float, t: float) -> tuple[float, float, float]:
        """``(gamma, m^T m, ||y - F m||^2)`` at ``t = alpha / beta``; they depend on ``t`` only:
        ``m = V diag(sqrt(s) / (t + s)) x`` and ``F m = U diag(s / (t + s)) x``."""
        denom = t + self.s
        shrink = self.s / denom  # in [0, 1]
        gamma = float(np.sum(shrink))
        m2 = float(np.sum(shrink * (x / denom) * x))
        res2 = float(np.sum(((t / denom) * x) ** 2)) + perp2
        return gamma, m2, res2

    def evidence(self, x: np.ndarray, perp2: float, alpha: float, beta: float) -> float:
        """``L(alpha, beta)`` (total, in nats), with the exact ``ln det A`` over all D dimensions."""
        _, m2, res2 = self.terms(x, perp2, alpha / beta)
        logdet_a = float(np.sum(np.log(alpha + beta * self.s))) + (self.d - self.s.size) * np.log(alpha)
        return (0.5 * self.n * np.log(beta) + 0.5 * self.d * np.log(alpha) - 0.5 * self.n * np.log(2 * np.pi)
                - 0.5 * beta * res2 - 0.5 * alpha * m2 - 0.5 * logdet_a)

    def profile(self, x: np.ndarray, perp2: float, t: np.ndarray) -> np.ndarray:
        """``max_beta L(t beta, beta)`` on a grid ``t (G,)`` -> ``(G,)``. For a fixed ratio the best
        ``beta`` is ``N / Q(t)``, ``Q(t) = ||y - F m||^2 + t m^T m = sum_i t x_i^2 / (t + s_i) + perp2``,
        giving ``N/2 ln(N / Q) - N/2 (1 + ln 2pi) + k/2 ln t - 1/2 sum_i ln(t + s_i)``."""
        tt = t[:, None]
        q = np.maximum(np.sum(tt / (tt + self.s) * x**2, axis=1) + perp2, _TINY)
        n, k = self.n, self.s.size
        return (0.5 * n * np.log(n / q) - 0.5 * n * (1 + np.log(2 * np.pi))
                + 0.5 * k * np.log(t) - 0.5 * np.sum(np.log(tt + self.s), axis=1))

    def start(self, x: np.ndarray, perp2: float, init: str) -> tuple[float, float]:
        """Starting ``(alpha, beta)``: ``(1, 1)`` for ``"paper"``; for ``"profile"`` the best ratio of a
        log grid of the profile evidence, with its optimal ``beta``."""
        if init == "paper":
            return 1.0, 1.0
        if init != "profile":
            raise ValueError(f"init must be 'profile' or 'paper', got {init!r}")
        top = float(self.s.max())
        if not top > 0:  # F = 0: L does not depend on alpha
            return 1.0, 1.0
        grid = top * np.logspace(-10.0, 4.0, 57)
        t = float(grid[np.argmax(self.profile(x, perp2, grid))])
        _, m2, res2 = self.terms(x, perp2, t)
        beta = self.n / max(res2 + t * m2, _TINY)
        return t * beta, beta

    def fixed_point(self, x: np.ndarray, perp2: float, max_iter: int, tol: float,
                    init: str) -> tuple[float, float]:
        """MacKay's updates from :meth:`start`; returns the final ``(alpha, beta)``."""
        alpha, beta = self.start(x, perp2, init)
        for _ in range(max_iter):
            t = alpha / beta
            gamma, m2, res2 = self.terms(x, perp2, t)
            if gamma > 0.0 and m2 > 0.0:  # else F = 0 or y orthogonal to F: keep alpha
                alpha = gamma / m2
            beta = (self.n - gamma) / max(res2, _TINY)
            if abs(alpha / beta - t) <= tol * t:
                break
        return alpha, beta


def _target(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.size != n:
        raise ValueError(f"target has {y.size} entries, features have {n} rows")
    if not np.any(y):
        raise ValueError("target is all zero (degenerate: the evidence has no maximum)")
    return y


def log_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """Closed-form log evidence ``L(alpha, beta)``, total over the N samples (not divided by N).

    Args:
        features: ``(N, D)`` features ``F``.
        target: ``(N,)`` real target ``y``.
        alpha: prior precision (> 0).
        beta: noise precision (> 0).
    """
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
    spec = _Spectrum(features)
    y = np.asarray(target, dtype=np.float64).reshape(-1)
    if y.size != spec.n:
        raise ValueError(f"target has {y.size} entries, features have {spec.n} rows")
    x, perp2 = spec.project(y)
    return spec.evidence(x, perp2, float(alpha), float(beta))


def maximise_evidence(features: np.ndarray, target: np.ndarray, max_iter: int = 11, tol: float = 1e-3,
                      init: str = "profile") -> tuple[float, float, float]:
    """Fixed-point maximisation of ``L(alpha, beta)`` for one target column.

    Args:
        features: ``(N, D)`` features ``F``.
        target: ``(N,)`` real target ``y`` (not all zero).
        max_iter: most fixed-point updates (11, as in the paper's code).
        tol: stop when ``alpha / beta`` changes by at most this, relatively.
        init: ``"profile"`` (default, grid start on the profile evidence) or ``"paper"``
            (``alpha = beta = 1``, the official code); see the module docstring.

    Returns:
        ``(L / N, alpha, beta)`` at the final iterate.
    """
    spec = _Spectrum(features)
    x, perp2 = spec.project(_target(target, spec.n))
    alpha, beta = spec.fixed_point(x, perp2, max_iter, tol, init)
    return spec.evidence(x, perp2, alpha, beta) / spec.n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 11, tol: float = 1e-3,
          init: str = "profile") -> float:
    """LogME score of features for a classification target (higher = more transferable).

    Args:
        features: ``(N, D)`` features (e.g. ``pooled(cases, level)[0]``).
        labels: ``(N,)`` integer class of each sample (voxel classes, background included).
        max_iter: most fixed-point updates per class (default 11).
        tol: relative tolerance on ``alpha / beta`` (default 1e-3).
        init: starting point of the updates, ``"profile"`` (default) or ``"paper"``.

    Returns:
        Mean over the classes present of ``L_c / N``, ``L_c`` the maximised log evidence of the
        one-hot column of class ``c`` (module docstring: conventions and edge cases).
    """
    spec = _Spectrum(features)
    labels = np.asarray(labels).reshape(-1)
    if labels.size != spec.n:
        raise ValueError(f"labels has {labels.size} entries, features have {spec.n} rows")
    scores = []
    for c in np.unique(labels):
        x, perp2 = spec.project((labels == c).astype(np.float64))
        alpha, beta = spec.fixed_point(x, perp2, max_iter, tol, init)
        scores.append(spec.evidence(x, perp2, alpha, beta) / spec.n)
    return float(np.mean(scores))
