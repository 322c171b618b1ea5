"""LogME (medxfer.transferability.logme) against independent dense computations.

The reference evidence below is a direct transcription of the closed form with dense linear
algebra (``A = alpha I + beta F^T F`` built explicitly, ``np.linalg.solve``, ``np.linalg.slogdet``);
the reference maximum is a log-grid search over ``(alpha, beta)`` refined by Nelder-Mead. Neither
uses the SVD or the fixed-point updates of the module.
"""

import numpy as np
import pytest
from scipy.optimize import minimize

from medxfer.transferability.logme import log_evidence, logme, maximise_evidence


def dense_log_evidence(f, y, alpha, beta):
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    r = y - f @ m
    _, logdet = np.linalg.slogdet(a)
    return (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
            - beta / 2 * r @ r - alpha / 2 * m @ m - logdet / 2)


GRID = np.linspace(-10.0, 16.0, 27)  # ln alpha and ln beta, one point per nat


def direct_max(f, y):
    """Max of the dense log evidence over a log grid of (alpha, beta), refined by Nelder-Mead on
    the log-parameters. Returns (max L / N, ln alpha, ln beta, grid argmax indices)."""
    vals = np.array([[dense_log_evidence(f, y, np.exp(la), np.exp(lb)) for lb in GRID] for la in GRID])
    i, j = np.unravel_index(np.argmax(vals), vals.shape)
    res = minimize(lambda p: -dense_log_evidence(f, y, np.exp(p[0]), np.exp(p[1])), [GRID[i], GRID[j]],
                   method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-9, "maxiter": 4000})
    best = max(-res.fun, vals[i, j])
    return best / f.shape[0], res.x[0], res.x[1], (i, j)


def linear_classes(n, d, seed, num_classes=3, rank=3, noise=0.3, flip=0.1):
    """Features = low-rank signal + noise; labels = argmax of a linear score of the signal, 10%
    relabelled at random (so every one-hot column has an interior evidence maximum)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, rank))
    f = latent @ rng.normal(size=(rank, d)) + noise * rng.normal(size=(n, d))
    labels = np.argmax(latent @ rng.normal(size=(rank, num_classes)), axis=1)
    flipped = rng.random(n) < flip
    labels[flipped] = rng.integers(0, num_classes, flipped.sum())
    return f, labels


SHAPES = {"n_gt_d": (200, 20), "n_lt_d": (40, 100)}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def case(request):
    n, d = SHAPES[request.param]
    f, labels = linear_classes(n, d, seed=1)
    maxima = {int(c): direct_max(f, (labels == c).astype(float)) for c in np.unique(labels)}
    return request.param, f, labels, maxima


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.03, 7.0), (250.0, 0.2), (5e3, 40.0)])
def test_log_evidence_matches_dense_numpy_at_arbitrary_alpha_beta(shape, alpha, beta):
    f, labels = linear_classes(*SHAPES[shape], seed=2)
    y = (labels == 0).astype(float)
    assert log_evidence(f, y, alpha, beta) == pytest.approx(dense_log_evidence(f, y, alpha, beta), rel=1e-9, abs=1e-7)
    y_real = np.random.default_rng(3).normal(size=f.shape[0])  # any real target, not only one-hot
    assert log_evidence(f, y_real, alpha, beta) == pytest.approx(dense_log_evidence(f, y_real, alpha, beta),
                                                                 rel=1e-9, abs=1e-7)


def test_log_evidence_includes_the_missing_log_alpha_term_when_n_lt_d():
    """The official fixed-point code sums ln(alpha + beta s_i) over the k = N singular values only;
    the exact evidence is that value minus (D - k)/2 ln alpha (SPEC section 5)."""
    n, d = 30, 90
    f, labels = linear_classes(n, d, seed=4)
    y = (labels == 1).astype(float)
    alpha, beta = 40.0, 3.0
    s = np.linalg.svd(f, compute_uv=False) ** 2  # k = n values
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ y)
    r = y - f @ m
    official = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * r @ r - alpha / 2 * m @ m - 0.5 * np.sum(np.log(alpha + beta * s)))
    ours = log_evidence(f, y, alpha, beta)
    assert ours == pytest.approx(official - (d - n) / 2 * np.log(alpha), rel=1e-10)
    assert ours == pytest.approx(dense_log_evidence(f, y, alpha, beta), rel=1e-10)


def test_fixed_point_reaches_the_direct_maximum_of_the_dense_evidence(case):
    name, f, labels, maxima = case
    for c, (best, log_alpha, log_beta, (i, j)) in maxima.items():
        # the reference maximum is interior (not on the grid's edge), so the comparison is meaningful
        assert 0 < i < GRID.size - 1 and 0 < j < GRID.size - 1, (name, c)
        value, alpha, beta = maximise_evidence(f, (labels == c).astype(float))
        assert value == pytest.approx(best, abs=1e-3), (name, c)
        assert value <= best + 1e-6  # it cannot beat the maximum
        assert np.log(alpha) == pytest.approx(log_alpha, abs=0.05) and np.log(beta) == pytest.approx(log_beta, abs=0.05)
        # the evidence it reports is the dense evidence at its own (alpha, beta)
        assert value == pytest.approx(dense_log_evidence(f, (labels == c).astype(float), alpha, beta) / f.shape[0],
                                      rel=1e-9)


def test_logme_is_the_mean_over_classes_of_the_per_sample_maximum_evidence(case):
    _, f, labels, maxima = case
    assert logme(f, labels) == pytest.approx(np.mean([m[0] for m in maxima.values()]), abs=1e-3)


def test_paper_start_stops_short_of_the_maximum_when_n_lt_d_but_not_when_n_gt_d(case):
    """Documents why the default start is the profile grid: from alpha = beta = 1, 11 updates do not
    reach the maximum when N < D (the fixed point is far away), but do when N > D."""
    name, f, labels, maxima = case
    paper = logme(f, labels, init="paper")
    best = np.mean([m[0] for m in maxima.values()])
    assert paper <= best + 1e-6
    if name == "n_lt_d":
        assert paper < best - 1e-2
        assert logme(f, labels, init="paper", max_iter=200, tol=1e-10) == pytest.approx(best, abs=1e-3)
    else:
        assert paper == pytest.approx(best, abs=1e-3)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_logme_invariant_to_sample_order_label_names_and_feature_rotation(shape):
    f, labels = linear_classes(*SHAPES[shape], seed=5)
    rng = np.random.default_rng(6)
    ref = logme(f, labels)
    perm = rng.permutation(f.shape[0])
    assert logme(f[perm], labels[perm]) == pytest.approx(ref, rel=1e-7)
    renamed = np.array([7, 2, 11])[labels]  # any integer names, gaps included
    assert logme(f, renamed) == pytest.approx(ref, rel=1e-7)
    q, _ = np.linalg.qr(rng.normal(size=(f.shape[1], f.shape[1])))  # isotropic prior: rotation-invariant
    assert logme(f @ q, labels) == pytest.approx(ref, rel=1e-6)


def test_logme_averages_only_over_classes_present():
    f, labels = linear_classes(150, 10, seed=7, num_classes=2)
    per_class = [maximise_evidence(f, (labels == c).astype(float))[0] for c in (0, 1)]
    assert logme(f, labels) == pytest.approx(np.mean(per_class), rel=1e-12)
    assert logme(f, np.where(labels == 1, 5, 0)) == pytest.approx(np.mean(per_class), rel=1e-12)  # 1..4 absent


def test_informative_features_score_higher_than_random_ones():
    rng = np.random.default_rng(8)
    n, d = 300, 16
    labels = rng.integers(0, 3, n)
    centres = 3.0 * rng.normal(size=(3, d))
    informative = centres[labels] + rng.normal(size=(n, d))
    random = rng.normal(size=(n, d)) * informative.std()
    assert logme(informative, labels) > logme(random, labels) + 0.1
    # and a weaker signal sits in between
    weak = 0.3 * centres[labels] + rng.normal(size=(n, d))
    assert logme(informative, labels) > logme(weak, labels) > logme(random, labels)


def test_single_class_gives_the_finite_evidence_of_the_all_ones_target():
    f, _ = linear_classes(50, 8, seed=9)
    labels = np.full(50, 3)
    value = logme(f, labels)
    assert np.isfinite(value)
    assert value == pytest.approx(direct_max(f, np.ones(50))[0], abs=1e-3)


def test_degenerate_inputs_give_finite_scores_or_clear_errors():
    rng = np.random.default_rng(10)
    labels = rng.integers(0, 2, 20)
    assert np.isfinite(logme(np.zeros((20, 5)), labels))  # no signal at all
    dup = np.repeat(rng.normal(size=(5, 30)), 4, axis=0)  # duplicate rows, N < D, rank 5
    assert np.isfinite(logme(dup, labels))
    with pytest.raises(ValueError):
        logme(rng.normal(size=(20, 5)), labels[:19])
    with pytest.raises(ValueError):
        maximise_evidence(rng.normal(size=(20, 5)), np.zeros(20))


def test_no_1e5_in_the_update_denominators():
    """The official code updates beta <- (N - gamma) / (||y - F m||^2 + 1e-5), so its beta never
    exceeds N / 1e-5; ours is the exact stationarity condition (module docstring): for a target
    almost in the span of F (residual ~5e-7) beta goes past that cap and satisfies the update exactly."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(60, 5))
    y = f @ rng.normal(size=5) + 1e-4 * rng.normal(size=60)
    _, alpha, beta = maximise_evidence(f, y, max_iter=50, tol=1e-10)
    assert beta > 60 / 1e-5
    # fixed point of the exact updates: beta = (N - gamma) / ||y - F m||^2 with m the posterior mean
    s = np.linalg.svd(f, compute_uv=False) ** 2
    gamma = np.sum(beta * s / (alpha + beta * s))
    m = np.linalg.solve(alpha * np.eye(5) + beta * f.T @ f, beta * f.T @ y)
    assert beta == pytest.approx((60 - gamma) / np.sum((y - f @ m) ** 2), rel=1e-6)
