"""CC-FV: class consistency with feature variety constraint (Yang et al., MICCAI 2023, section 2.2).

SPEC section 5 is normative; equation numbers are the paper's.

- **Class consistency** (eqs. 1-2). For decoder level ``l``, foreground class ``k`` and case ``i``,
  the class-proportional sample of class ``k`` gives a Gaussian ``N(mu_ik, S_ik)`` (sample mean,
  covariance with ``n - 1``). Two Gaussians are compared with the 2-Wasserstein distance (eq. 1)::

      W2^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})

  and ``C_cons = mean_k mean_{i != j} W2(N_ik, N_jk)`` (eq. 2; ordered pairs, lower = better).
  **We average W2, the distance itself (the square root), not W2^2**: eq. 1 defines the distance
  and the official code also returns ``sqrt(|W2^2|)``.
- **Feature variety** (eqs. 3-4). Per case, the ``L`` voxels of the uniform variety sample,
  L2-normalised onto the unit sphere; hyperspherical energy
  ``E = mean_{a != b} 1 / |f_a - f_b|`` (``s = 1``) and ``F_var = mean_cases 1 / E``
  (higher = more uniform = better).
- **Score** (eq. 5). ``T = (1/D) sum_l log(F_var_l / C_cons_l)`` over the ``D`` decoder levels
  used; higher = more transferable.

Exact W2 without a matrix square root per pair
----------------------------------------------
The cross term only needs the eigenvalues of ``S1 S2`` (``S1^{1/2} S2 S1^{1/2}`` is similar to it):
``tr((S1^{1/2} S2 S1^{1/2})^{1/2}) = sum_i sqrt(lambda_i(S1 S2))``. With any factor ``F`` such that
``S = F^T F`` (``F`` of shape ``(r, d)``), the eigenvalues of ``S1 S2 = F1^T F1 F2^T F2`` are, apart
from zeros, those of ``(F1 F2^T)(F1 F2^T)^T``, so the cross term is the **nuclear norm of the
small ``(r1, r2)`` matrix** ``F1 F2^T`` (sum of its singular values). Factors, computed once per
Gaussian:

- from samples ``X (n, d)`` with ``n <= d``: the centred samples ``A = (X - mu) / sqrt(n - 1)``
  (``r = n``); with ``n > d``: the ``(d, d)`` triangular ``R`` of ``A = QR`` (``R^T R = A^T A``
  exactly, cheaper than an eigendecomposition), ``r = d``;
- from a covariance: ``F = diag(sqrt(w)) V^T`` from ``S = V diag(w) V^T`` (eigenvalues clamped at 0).

Mixed pairs (one side ``n < d``, the other ``n >= d``) are the same formula with ``r1 != r2``.
Pairs are batched (zero-padded factors; zero rows do not change singular values) and evaluated
in float64 with ``torch.linalg.svdvals``; rank-deficient covariances need no regularisation.
:func:`w2_squared` is the slow reference (two ``scipy.linalg.sqrtm`` per pair) for tests.

Degenerate input
----------------
A Gaussian needs two samples: a case with fewer than 2 voxels of class ``k`` is skipped for
``k``; a class kept in fewer than 2 cases contributes nothing; if no class is left (e.g. a
class in no case with enough voxels) :func:`class_consistency` returns NaN and :func:`ccfv_score` returns a NaN score
with a ``reason`` -- never an exception. Identical points in the energy are guarded by ``eps``
inside the square root: ``1 / sqrt(|f_a - f_b|^2 + eps)``, ``eps = 1e-3`` as in the official
code (a pair of identical points adds ``1/sqrt(1e-3) ~ 31.6`` instead of ``inf``; for typical
unit-sphere distances ``~1.4`` the bias is ``< 0.03 %``). A zero feature vector cannot be
normalised and stays at the origin. ``C_cons = 0`` (bit-identical class Gaussians in every
case) would make the log ratio infinite: it is floored at ``CONSISTENCY_FLOOR`` and reported in
``warnings``.

Official-code variant (``variant="official"``)
----------------------------------------------
What the authors' code (``EndoluminalSurgicalVision-IMR/CCFV``, ``main.py`` + ``utils/ccfv.py``)
computes instead, offered so both can be compared (SPEC section 5):

- per decoder level a **fixed number of voxels per class**: 100 / 200 / 400 for its 3 levels
  (deepest first). We subsample each class of the class-proportional sample (background too) to
  that count without replacement (seeded); **a class with fewer voxels keeps all of them** (the
  official ``min(count, sample_num)``). With more levels than counts the last count keeps
  doubling (``official_samples`` sets them).
- variety: the hyperspherical energy (same ``eps = 1e-3``) of the **per-case mean features**
  (mean over that case's subsampled voxels of every class, background included, as the official
  ``global_feat``), **without normalisation**, and used **as is**: the official ``var_f`` is the
  energy ``E``, not ``1/E``, so this variant rewards case means that lie *close* together.
  Needs >= 2 cases.
- **sum** over levels of ``log(E_l / C_cons_l)`` (not the mean).
- ``C_cons`` is the paper's mean of W2 over classes and pairs on the subsampled voxels. The
  official accumulation ``w_distance += w_distance / (length * length / 2) / num_classes`` (sum
  over pairs plus a rescaled copy of itself, carried over classes) is a bug we do not copy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.linalg
import torch

from medxfer.transferability.features import CaseFeatures

__all__ = [
    "ENERGY_EPS",
    "CONSISTENCY_FLOOR",
    "OFFICIAL_SAMPLES",
    "w2_squared",
    "w2_distance_matrix",
    "w2_distance_matrix_from_moments",
    "class_consistency",
    "hyperspherical_energy",
    "feature_variety",
    "ccfv_score",
]

ENERGY_EPS = 1e-3
"""Guard inside the energy's square root, ``1 / sqrt(|f_a - f_b|^2 + eps)`` (official value)."""

CONSISTENCY_FLOOR = 1e-12
"""Floor of ``C_cons`` in the log ratio of eq. 5 (only reached by bit-identical Gaussians)."""

OFFICIAL_SAMPLES = (100, 200, 400)
"""Voxels per class and level (deepest first) of the official code."""

_PAIR_CHUNK_ELEMENTS = 1 << 23  # float64 elements per batched chunk (~64 MiB)
_ENERGY_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# 2-Wasserstein distance between Gaussians (eq. 1)
# --------------------------------------------------------------------------------------------

def w2_squared(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Reference closed form of eq. 1 for one pair, with ``scipy.linalg.sqrtm`` (slow path).

    ``W2^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})``.

    Args:
        mu1, mu2: ``(d,)`` means.
        cov1, cov2: ``(d, d)`` symmetric positive semi-definite covariances.

    Returns:
        ``W2^2`` (clamped at 0), a float. Use :func:`w2_distance_matrix` for many Gaussians.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root1 = np.real(scipy.linalg.sqrtm(cov1))
    root1 = (root1 + root1.T) / 2
    inner = root1 @ cov2 @ root1
    cross = np.real(np.trace(scipy.linalg.sqrtm((inner + inner.T) / 2)))
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)
    return max(value, 0.0)


def _factor_from_samples(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (n, d)`` float64, ``n >= 2`` -> ``(mu (d,), F (min(n, d), d))`` with ``F^T F = S``."""
    n, d = x.shape
    mu = x.mean(dim=0)
    a = (x - mu) / math.sqrt(n - 1)
    if n > d:
        a = torch.linalg.qr(a, mode="r").R  # (d, d), R^T R = A^T A
    return mu, a


def _factor_from_cov(cov: torch.Tensor) -> torch.Tensor:
    """``cov (d, d)`` -> ``F = diag(sqrt(w)) V^T (d, d)`` with ``F^T F = cov`` (w clamped >= 0)."""
    w, v = torch.linalg.eigh((cov + cov.T) / 2)
    return w.clamp_min(0).sqrt()[:, None] * v.T


def _w2_from_factors(mus: list[torch.Tensor], factors: list[torch.Tensor], squared: bool) -> np.ndarray:
    """``(C, C)`` W2 (or W2^2) of Gaussians given by means ``(d,)`` and factors ``(r_i, d)``."""
    c = len(mus)
    out = np.zeros((c, c), dtype=np.float64)
    if c < 2:
        return out
    d = mus[0].shape[0]
    ranks = [int(f.shape[0]) for f in factors]
    r_max = max(ranks)
    padded = torch.zeros((c, r_max, d), dtype=torch.float64)
    for i, f in enumerate(factors):
        padded[i, : f.shape[0]] = f
    mu = torch.stack(mus)
    trace = (padded * padded).sum(dim=(1, 2))

    # unordered pairs, small factor first (nuclear norm of M equals that of M^T); sorted by size
    # so that each batched chunk pads little.
    pairs = [(i, j) if ranks[i] <= ranks[j] else (j, i) for i in range(c) for j in range(i + 1, c)]
    pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
    start = 0
    while start < len(pairs):
        a, b = ranks[pairs[start][0]], ranks[pairs[start][1]]
        stop = start
        while stop < len(pairs):
            a2, b2 = max(a, ranks[pairs[stop][0]]), max(b, ranks[pairs[stop][1]])
            if stop > start and (stop - start + 1) * ((a2 + b2) * d + a2 * b2) > _PAIR_CHUNK_ELEMENTS:
                break
            a, b, stop = a2, b2, stop + 1
        idx_i = torch.tensor([p[0] for p in pairs[start:stop]])
        idx_j = torch.tensor([p[1] for p in pairs[start:stop]])
        cross = torch.matmul(padded[idx_i, :a], padded[idx_j, :b].transpose(1, 2))  # (P, a, b)
        nuclear = torch.linalg.svdvals(cross).sum(dim=-1)
        dmu2 = ((mu[idx_i] - mu[idx_j]) ** 2).sum(dim=-1)
        value = (dmu2 + trace[idx_i] + trace[idx_j] - 2.0 * nuclear).clamp_min(0)
        if not squared:
            value = value.sqrt()
        value = value.numpy()
        out[idx_i.numpy(), idx_j.numpy()] = value
        out[idx_j.numpy(), idx_i.numpy()] = value
        start = stop
    return out


def w2_distance_matrix(samples: Sequence[np.ndarray], squared: bool = False) -> np.ndarray:
    """Exact pairwise W2 (eq. 1) between the Gaussians estimated from per-case samples.

    Each ``samples[i]`` of shape ``(n_i, d)`` (``n_i >= 2``, any ``n_i`` versus ``d``) gives
    ``N(mu_i, S_i)`` with the unbiased sample covariance. No matrix square root is taken: the
    cross term is the nuclear norm of ``F_i F_j^T`` (see the module docstring), batched over
    pairs in float64.

    Args:
        samples: ``C`` arrays ``(n_i, d)``.
        squared: return ``W2^2`` instead of ``W2``.

    Returns:
        ``(C, C)`` float64 symmetric matrix, zero diagonal.

    Raises:
        ValueError: a sample with fewer than 2 rows, or differing feature sizes.
    """
    mus, factors = [], []
    for x in samples:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"each sample must be (n >= 2, d), got {tuple(x.shape)}")
        mu, f = _factor_from_samples(x)
        mus.append(mu)
        factors.append(f)
    if len({m.shape[0] for m in mus}) > 1:
        raise ValueError("all samples must have the same feature size d")
    return _w2_from_factors(mus, factors, squared)


def w2_distance_matrix_from_moments(means: Sequence[np.ndarray], covs: Sequence[np.ndarray],
                                    squared: bool = False) -> np.ndarray:
    """Exact pairwise W2 (eq. 1) between Gaussians given by means ``(d,)`` and covariances ``(d, d)``.

    One eigendecomposition per covariance (``S^{1/2}``-type factor ``diag(sqrt(w)) V^T``), then
    the same batched nuclear norms as :func:`w2_distance_matrix`. Returns ``(C, C)`` float64.
    """
    mus = [torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in means]
    factors = [_factor_from_cov(torch.as_tensor(np.asarray(s), dtype=torch.float64)) for s in covs]
    return _w2_from_factors(mus, factors, squared)


# --------------------------------------------------------------------------------------------
# Class consistency (eq. 2)
# --------------------------------------------------------------------------------------------

def _class_rows(case: CaseFeatures) -> np.ndarray:
    """Boolean mask of the class-proportional sample (not the variety sample)."""
    return ~np.asarray(case.variety, dtype=bool)


def _halves(x: np.ndarray) -> list[np.ndarray]:
    """Two interleaved halves of a sample (rows are in random draw order, so these are random halves)."""
    return [x[0::2], x[1::2]]


def _consistency_from_groups(groups: dict[int, list[np.ndarray]]) -> tuple[float, int]:
    """Mean over classes of the mean W2 over ordered pairs; ``(value, classes used)``.

    Single-case fallback: a class held (with >= 4 voxels) by only one case is compared across
    the two interleaved halves of that case's sample -- within-case consistency -- so one labelled
    case (or a class only one case contains) still gives a defined value instead of NaN.
    """
    per_class = []
    for k in sorted(groups):
        kept = [x for x in groups[k] if x.shape[0] >= 2]
        if len(kept) == 1 and kept[0].shape[0] >= 4:
            kept = _halves(kept[0])
        if len(kept) < 2:
            continue
        dist = w2_distance_matrix(kept)
        c = len(kept)
        per_class.append(dist.sum() / (c * (c - 1)))  # diagonal is 0: mean over i != j
    if not per_class:
        return float("nan"), 0
    return float(np.mean(per_class)), len(per_class)


def class_consistency(cases: Sequence[CaseFeatures], level: int, classes: Sequence[int] | None = None) -> float:
    """Class consistency ``C_cons`` of one decoder level (eq. 2; lower = better).

    For each foreground class ``k`` and each ordered pair ``i != j`` of cases whose
    class-proportional sample (``~case.variety``) holds >= 2 voxels of ``k``: W2 (not squared)
    between ``N(mu_ik, S_ik)`` and ``N(mu_jk, S_jk)``; mean over pairs, then over classes.

    Args:
        cases: per-case sampled features; ``case.levels[level]`` is ``(n, d)``.
        level: index into ``case.levels`` (deepest first; negative allowed).
        classes: foreground labels to use; default every label > 0 in any case's class sample.

    Returns:
        ``C_cons`` (float). A class only one case holds is compared across two halves of that
        case's sample (see ``_consistency_from_groups``), so a single case is defined; NaN only
        when no foreground class has >= 2 voxels in two cases or >= 4 in one (the caller decides:
        ``ccfv_score`` reports a reason).
    """
    groups: dict[int, list[np.ndarray]] = {}
    for case in cases:
        rows = _class_rows(case)
        feats, labels = np.asarray(case.levels[level])[rows], np.asarray(case.labels)[rows]
        wanted = np.unique(labels[labels > 0]) if classes is None else [k for k in classes if k > 0]
        for k in wanted:
            groups.setdefault(int(k), []).append(feats[labels == k])
    return _consistency_from_groups(groups)[0]


# --------------------------------------------------------------------------------------------
# Feature variety (eqs. 3-4)
# --------------------------------------------------------------------------------------------

def hyperspherical_energy(features: np.ndarray, normalise: bool = True, eps: float = ENERGY_EPS) -> float:
    """Hyperspherical energy of eq. 3 with ``s = 1``: ``mean_{a != b} 1 / sqrt(|f_a - f_b|^2 + eps)``.

    Args:
        features: ``(L, d)`` points.
        normalise: L2-normalise the rows onto the unit sphere first (paper); a zero row stays 0.
        eps: guard for identical points (see the module docstring).

    Returns:
        ``E`` (float, lower = more uniform), NaN when ``L < 2``. Computed in row chunks, memory
        ``O(chunk * L)``.
    """
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    n = f.shape[0]
    if n < 2:
        return float("nan")
    if normalise:
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-300)
    sq = (f * f).sum(dim=1)
    chunk = max(1, _ENERGY_CHUNK_ELEMENTS // n)
    total = 0.0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        d2 = (sq[s:e, None] + sq[None, :] - 2.0 * f[s:e] @ f.T).clamp_min(0)
        inv = (d2 + eps).rsqrt()
        inv[torch.arange(e - s), torch.arange(s, e)] = 0.0  # a == b
        total += float(inv.sum())
    return total / (n * (n - 1))


def feature_variety(cases: Sequence[CaseFeatures], level: int, eps: float = ENERGY_EPS) -> float:
    """Feature variety ``F_var = mean_cases 1 / E`` of one decoder level (eq. 4; higher = better).

    ``E`` is the hyperspherical energy (:func:`hyperspherical_energy`) of the case's variety
    sample (``case.variety`` voxels, drawn uniformly over the case), normalised to the unit
    sphere. Cases with fewer than 2 variety voxels are skipped; NaN when none is left.
    """
    values = []
    for case in cases:
        rows = np.asarray(case.variety, dtype=bool)
        if rows.sum() < 2:
            continue
        values.append(1.0 / hyperspherical_energy(np.asarray(case.levels[level])[rows], True, eps))
    return float(np.mean(values)) if values else float("nan")


# --------------------------------------------------------------------------------------------
# Score (eq. 5) and the official-code variant
# --------------------------------------------------------------------------------------------

def _official_level(cases: Sequence[CaseFeatures], level: int, count: int, classes, eps: float,
                    rng: np.random.Generator) -> tuple[float, float]:
    """Official code at one level: ``(energy of per-case means, C_cons)`` on ``count`` voxels/class."""
    groups: dict[int, list[np.ndarray]] = {}
    means = []
    for case in cases:
        rows = _class_rows(case)
        feats, labels = np.asarray(case.levels[level])[rows], np.asarray(case.labels)[rows]
        picked = []
        for k in np.unique(labels):
            where = np.flatnonzero(labels == k)
            if where.size > count:
                where = np.sort(rng.choice(where, size=count, replace=False))
            picked.append(where)
            if k > 0 and (classes is None or k in classes):
                groups.setdefault(int(k), []).append(feats[where])
        if picked:
            chosen = feats[np.concatenate(picked)].astype(np.float64)
            # one case: the means of its two halves stand for two cases (as the consistency does)
            means.extend([h.mean(axis=0) for h in _halves(chosen)] if len(cases) == 1 and len(chosen) >= 2
                         else [chosen.mean(axis=0)])
    energy = hyperspherical_energy(np.stack(means), normalise=False, eps=eps) if len(means) >= 2 else float("nan")
    return energy, _consistency_from_groups(groups)[0]


def ccfv_score(cases: Sequence[CaseFeatures], levels: Sequence[int] | None = None, variant: str = "paper",
               classes: Sequence[int] | None = None, eps: float = ENERGY_EPS,
               official_samples: Sequence[int] = OFFICIAL_SAMPLES, seed: int = 0) -> dict:
    """CC-FV transferability of one source model on a target dataset (eq. 5; higher = better).

    Args:
        cases: per-case sampled features (:class:`CaseFeatures`), same decoder levels in each.
        levels: indices into ``case.levels`` (deepest first); default all of them.
        variant: ``"paper"``: ``T = (1/D) sum_l log(F_var_l / C_cons_l)``; ``"official"``: the
            authors' code (module docstring): ``sum_l log(E_l / C_cons_l)`` with the energy of
            the unnormalised per-case mean features and ``official_samples`` voxels per class.
        classes: foreground labels for the consistency; default all labels > 0 found.
        eps: energy guard (:data:`ENERGY_EPS`).
        official_samples: voxels per class for the chosen levels in order (official variant);
            missing entries continue by doubling the last.
        seed: subsampling seed (official variant).

    Returns:
        Plain-JSON dict: ``score`` (float, NaN when undefined), ``variant``, ``levels``,
        ``per_level`` (list of ``{"level", "consistency", "variety", "log_ratio"}``, plus
        ``"samples_per_class"`` for the official variant), ``reason`` (``None`` or why the
        score is NaN, e.g. a single case), ``warnings`` (list of str).
    """
    if variant not in ("paper", "official"):
        raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")
    cases = list(cases)
    result = {"score": float("nan"), "variant": variant, "levels": [], "per_level": [], "reason": None,
              "warnings": []}
    if not cases:
        result["reason"] = "no cases"
        return result
    n_levels = len(cases[0].levels)
    if any(len(c.levels) != n_levels for c in cases):
        raise ValueError("all cases must have the same number of decoder levels")
    if levels is not None and any(not -n_levels <= int(l) < n_levels for l in levels):
        raise ValueError(f"levels {list(levels)} out of range for {n_levels} decoder levels")
    chosen = list(range(n_levels)) if levels is None else [int(l) % n_levels for l in levels]
    if not chosen:
        result["reason"] = "no decoder levels"
        return result
    result["levels"] = chosen
    counts = list(official_samples)
    while len(counts) < len(chosen):
        counts.append(2 * counts[-1])
    rng = np.random.default_rng(seed)

    parts, reasons = [], []
    for pos, level in enumerate(chosen):
        entry = {"level": level}
        if variant == "paper":
            cons = class_consistency(cases, level, classes)
            var = feature_variety(cases, level, eps)
        else:
            entry["samples_per_class"] = int(counts[pos])
            var, cons = _official_level(cases, level, int(counts[pos]), classes, eps, rng)
        entry["consistency"], entry["variety"] = float(cons), float(var)
        if math.isnan(cons):
            reasons.append(f"level {level}: class consistency undefined (needs a foreground class with >= 2 "
                           f"voxels in >= 2 cases; got {len(cases)} case(s))")
        if math.isnan(var) or var <= 0:
            reasons.append(f"level {level}: feature variety undefined "
                           + ("(needs >= 2 cases)" if variant == "official" else "(needs >= 2 variety voxels)"))
        if not math.isnan(cons) and cons < CONSISTENCY_FLOOR:
            result["warnings"].append(f"level {level}: consistency {cons:g} floored at {CONSISTENCY_FLOOR:g}")
            cons = CONSISTENCY_FLOOR
        ratio = math.log(var / cons) if not (math.isnan(cons) or math.isnan(var) or var <= 0) else float("nan")
        entry["log_ratio"] = ratio
        parts.append(ratio)
        result["per_level"].append(entry)
    if reasons:
        result["reason"] = "; ".join(reasons)
        return result
    result["score"] = float(np.mean(parts) if variant == "paper" else np.sum(parts))
    return result
