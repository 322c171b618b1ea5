"""CC-FV (SPEC section 5): exact batched W2, class consistency, feature variety, the score and the
official-code variant, each compared with an independent computation (sqrtm closed form, loops)."""

import math

import numpy as np
import pytest
import scipy.linalg

from medxfer.transferability import ccfv
from medxfer.transferability.ccfv import (ENERGY_EPS, ccfv_score, class_consistency, feature_variety,
                                          hyperspherical_energy, w2_distance_matrix,
                                          w2_distance_matrix_from_moments, w2_squared)
from medxfer.transferability.features import CaseFeatures


# ---------------------------------------------------------------- independent references

def _w2_sqrtm(mu1, s1, mu2, s2):
    """W2 (not squared) by the textbook closed form, written here independently of the module."""
    root = np.real(scipy.linalg.sqrtm(s1))
    cross = np.real(np.trace(scipy.linalg.sqrtm(root @ s2 @ root)))
    return math.sqrt(max(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross, 0.0))


def _moments(x):
    x = np.asarray(x, np.float64)
    return x.mean(axis=0), np.cov(x.T, ddof=1)


def _brute_consistency(cases, level):
    per_class = []
    for k in sorted({int(k) for c in cases for k in c.labels[~c.variety] if k > 0}):
        groups = [c.levels[level][~c.variety][c.labels[~c.variety] == k] for c in cases]
        groups = [g for g in groups if len(g) >= 2]
        dists = [_w2_sqrtm(*_moments(a), *_moments(b)) for i, a in enumerate(groups)
                 for j, b in enumerate(groups) if i != j]
        if dists:
            per_class.append(np.mean(dists))
    return float(np.mean(per_class))


def _brute_energy(f, normalise=True):
    f = np.asarray(f, np.float64)
    if normalise:
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
    total, count = 0.0, 0
    for a in range(len(f)):
        for b in range(len(f)):
            if a != b:
                total += 1.0 / math.sqrt(np.sum((f[a] - f[b]) ** 2) + ENERGY_EPS)
                count += 1
    return total / count


def _brute_variety(cases, level):
    return float(np.mean([1.0 / _brute_energy(c.levels[level][c.variety]) for c in cases]))


# ---------------------------------------------------------------- synthetic cases

def _case(rng, class_sizes, d, n_variety=30, shift=None, fg_mean=2.0, levels=1):
    """One case: per label ``k`` in ``class_sizes`` that many class-sample voxels, then a uniform
    variety sample; background ~ N(0, I), foreground class k ~ N(fg_mean * k (+ shift), 0.5 I)."""
    labels = [np.full(n, k) for k, n in class_sizes.items()]
    var_labels = rng.choice(list(class_sizes), size=n_variety)
    labels = np.concatenate(labels + [var_labels]).astype(np.int64)
    variety = np.r_[np.zeros(sum(class_sizes.values()), bool), np.ones(n_variety, bool)]
    feats = []
    for lv in range(levels):
        dl = d * (lv + 1)
        x = rng.normal(size=(len(labels), dl))
        fg = labels > 0
        x[fg] = 0.5 * x[fg] + fg_mean * labels[fg, None]
        if shift is not None:
            x[fg] += shift[:dl]
        feats.append(x.astype(np.float32))
    return CaseFeatures(case_id=f"c{rng.integers(1e9)}", levels=feats, labels=labels, variety=variety)


def _random_spd(rng, d):
    b = rng.normal(size=(d, d))
    return b @ b.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------- W2

def test_w2_from_moments_matches_sqrtm_closed_form_on_random_spd_covariances():
    rng = np.random.default_rng(0)
    d = 12
    means = [rng.normal(size=d) for _ in range(4)]
    covs = [_random_spd(rng, d) for _ in range(4)]
    fast = w2_distance_matrix_from_moments(means, covs)
    for i in range(4):
        for j in range(4):
            if i != j:
                ref = _w2_sqrtm(means[i], covs[i], means[j], covs[j])
                assert fast[i, j] == pytest.approx(ref, rel=1e-6)
                assert math.sqrt(w2_squared(means[i], covs[i], means[j], covs[j])) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("sizes", [(5, 9, 14), (40, 60, 25)], ids=["n_lt_d", "n_ge_d"])
def test_w2_from_samples_matches_sqrtm_closed_form_on_sample_covariances(sizes):
    rng = np.random.default_rng(1)
    d = 16 if sizes[0] < 16 else 20
    xs = [rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.4 + rng.normal(size=d) for n in sizes]
    fast = w2_distance_matrix(xs)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert fast[i, j] == pytest.approx(_w2_sqrtm(*_moments(xs[i]), *_moments(xs[j])), rel=1e-6)


def test_w2_matches_sqrtm_for_a_mixed_pair_one_side_n_lt_d():
    rng = np.random.default_rng(2)
    d = 10
    small, large = rng.normal(size=(4, d)) + 1.0, rng.normal(size=(50, d)) * 2.0
    fast = w2_distance_matrix([small, large])
    ref = _w2_sqrtm(*_moments(small), *_moments(large))
    assert fast[0, 1] == pytest.approx(ref, rel=1e-6) and fast[1, 0] == pytest.approx(ref, rel=1e-6)


def test_w2_of_a_gaussian_with_itself_is_zero_and_the_matrix_is_symmetric():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 8)) * 3.0
    others = [rng.normal(size=(n, 8)) for n in (5, 40)]
    fast = w2_distance_matrix([x, x.copy(), *others])
    scale = math.sqrt(np.trace(np.cov(x.T)))
    assert fast[0, 1] < 1e-6 * scale
    assert np.array_equal(fast, fast.T) and np.all(np.diag(fast) == 0)
    assert w2_squared(*_moments(x), *_moments(x)) < 1e-10 * scale ** 2


def test_w2_batched_chunks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(n, 6)) + i for i, n in enumerate((3, 4, 8, 20, 7, 2))]
    whole = w2_distance_matrix(xs)
    monkeypatch.setattr(ccfv, "_PAIR_CHUNK_ELEMENTS", 1)  # one pair per chunk
    np.testing.assert_allclose(w2_distance_matrix(xs), whole, rtol=1e-12, atol=1e-12)


def test_w2_squared_option_is_the_square():
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(n, 5)) + i for i, n in enumerate((4, 9, 12))]
    np.testing.assert_allclose(w2_distance_matrix(xs, squared=True), w2_distance_matrix(xs) ** 2, rtol=1e-12)


# ---------------------------------------------------------------- class consistency

def test_class_consistency_equals_brute_force_pairs_with_one_class_missing_in_one_case():
    rng = np.random.default_rng(6)
    d = 8
    cases = [_case(rng, {0: 10, 1: 15, 2: 5}, d),   # class 2: n < d
             _case(rng, {0: 10, 1: 12}, d),         # class 2 missing
             _case(rng, {0: 10, 1: 20, 2: 6}, d)]
    assert class_consistency(cases, 0) == pytest.approx(_brute_consistency(cases, 0), rel=1e-6)


def test_a_class_in_only_one_case_is_compared_across_two_halves_of_that_case():
    rng = np.random.default_rng(7)
    cases = [_case(rng, {0: 5, 1: 6}, 4), _case(rng, {0: 5, 2: 6}, 4), _case(rng, {0: 5, 1: 1}, 4)]
    x1 = cases[0].levels[0][(cases[0].labels == 1) & ~cases[0].variety]  # the class sample only
    x2 = cases[1].levels[0][(cases[1].labels == 2) & ~cases[1].variety]

    def w2_halves(x):
        a, b = x[0::2].astype(np.float64), x[1::2].astype(np.float64)
        return math.sqrt(max(w2_squared(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)), 0))

    expected = (w2_halves(x1) + w2_halves(x2)) / 2  # class 1: case 3 has 1 voxel only; class 2: one case
    assert class_consistency(cases, 0) == pytest.approx(expected, rel=1e-6)
    assert class_consistency(cases[:1], 0) == pytest.approx(w2_halves(x1), rel=1e-6)
    tiny = [_case(rng, {0: 5, 1: 3}, 4, n_variety=0)]  # fewer than 4 voxels: no halves -> undefined
    assert math.isnan(class_consistency(tiny, 0))


# ---------------------------------------------------------------- feature variety

def test_feature_variety_equals_numpy_double_loop():
    rng = np.random.default_rng(8)
    cases = [_case(rng, {0: 5, 1: 5}, 6, n_variety=n) for n in (12, 20, 7)]
    assert feature_variety(cases, 0) == pytest.approx(_brute_variety(cases, 0), rel=1e-10)


def test_energy_of_unnormalised_points_equals_double_loop_and_chunks_do_not_matter(monkeypatch):
    rng = np.random.default_rng(9)
    f = rng.normal(size=(37, 5)) * 2.0
    whole = hyperspherical_energy(f, normalise=False)
    assert whole == pytest.approx(_brute_energy(f, normalise=False), rel=1e-10)
    monkeypatch.setattr(ccfv, "_ENERGY_CHUNK_ELEMENTS", 40)  # one row per chunk
    assert hyperspherical_energy(f, normalise=False) == pytest.approx(whole, rel=1e-12)


def test_identical_points_give_finite_energy_and_variety():
    f = np.ones((10, 4))
    energy = hyperspherical_energy(f)
    assert energy == pytest.approx(1 / math.sqrt(ENERGY_EPS))
    zeros = np.zeros((6, 3))  # cannot be normalised: stays at the origin
    assert np.isfinite(hyperspherical_energy(zeros))
    case = CaseFeatures("c", [np.ones((10, 4), np.float32)], np.zeros(10, np.int64), np.ones(10, bool))
    assert np.isfinite(feature_variety([case], 0))


# ---------------------------------------------------------------- score

def test_ccfv_score_is_the_mean_over_two_levels_of_log_variety_over_consistency():
    rng = np.random.default_rng(10)
    cases = [_case(rng, {0: 12, 1: 14, 2: 10}, 5, levels=2) for _ in range(3)]
    result = ccfv_score(cases)
    expected = np.mean([math.log(_brute_variety(cases, lv) / _brute_consistency(cases, lv)) for lv in (0, 1)])
    assert result["score"] == pytest.approx(expected, rel=1e-6)
    assert result["levels"] == [0, 1] and result["reason"] is None
    assert [p["level"] for p in result["per_level"]] == [0, 1]
    assert ccfv_score(cases, levels=[-1])["score"] == pytest.approx(result["per_level"][1]["log_ratio"])


def test_consistent_foreground_scores_higher_than_case_specific_shifts():
    d, sizes = 8, {0: 30, 1: 30}
    same = [_case(np.random.default_rng(s), sizes, d, n_variety=40) for s in range(4)]
    shifts = np.random.default_rng(99).normal(size=(4, d)) * 2.0
    shifted = [_case(np.random.default_rng(s), sizes, d, n_variety=40, shift=shifts[s]) for s in range(4)]
    a, b = ccfv_score(same), ccfv_score(shifted)
    assert a["per_level"][0]["consistency"] < b["per_level"][0]["consistency"]
    assert a["score"] > b["score"]


def test_single_case_gives_a_defined_score_in_both_variants():
    case = _case(np.random.default_rng(11), {0: 10, 1: 10}, 4, levels=2)
    for variant in ("paper", "official"):
        result = ccfv_score([case], variant=variant)
        assert np.isfinite(result["score"]) and result["reason"] is None, result
    assert np.isfinite(ccfv_score([case])["per_level"][0]["variety"])
    assert "no cases" in ccfv_score([])["reason"]
    starved = _case(np.random.default_rng(12), {0: 10, 1: 2}, 4, n_variety=0)  # too few voxels: NaN + reason
    result = ccfv_score([starved])
    assert math.isnan(result["score"]) and "consistency" in result["reason"]


def test_empty_class_and_rank_deficient_covariances_give_finite_scores():
    rng = np.random.default_rng(12)
    d = 32  # every class sample has n < d: singular covariances
    cases = [_case(rng, {0: 8, 1: 6, 2: 5}, d, levels=2), _case(rng, {0: 8, 1: 7}, d, levels=2),
             _case(rng, {0: 8, 1: 9, 2: 1}, d, levels=2)]  # one voxel of class 2: skipped for it
    for variant in ("paper", "official"):
        result = ccfv_score(cases, variant=variant)
        assert np.isfinite(result["score"]) and result["reason"] is None, result


def test_official_variant_sums_levels_over_energy_of_unnormalised_case_means():
    rng = np.random.default_rng(13)
    cases = [_case(rng, {0: 12, 1: 14, 2: 10}, 5, levels=2) for _ in range(4)]
    # counts above every class size: nothing is subsampled, so the result is deterministic
    result = ccfv_score(cases, variant="official", official_samples=(50, 50))
    expected = 0.0
    for lv in (0, 1):
        means = np.stack([c.levels[lv][~c.variety].astype(np.float64).mean(axis=0) for c in cases])
        expected += math.log(_brute_energy(means, normalise=False) / _brute_consistency(cases, lv))
    assert result["score"] == pytest.approx(expected, rel=1e-6)
    paper = ccfv_score(cases)
    assert np.isfinite(paper["score"]) and paper["score"] != pytest.approx(result["score"])


def test_official_variant_subsamples_to_the_fixed_counts_per_level_seeded():
    rng = np.random.default_rng(14)
    cases = [_case(rng, {0: 60, 1: 50, 2: 3}, 4, levels=3) for _ in range(3)]
    a = ccfv_score(cases, variant="official", official_samples=(10, 20), seed=1)
    assert [p["samples_per_class"] for p in a["per_level"]] == [10, 20, 40]
    assert np.isfinite(a["score"])
    assert a["score"] == ccfv_score(cases, variant="official", official_samples=(10, 20), seed=1)["score"]
    assert a["score"] != ccfv_score(cases, variant="official", official_samples=(10, 20), seed=2)["score"]
    with pytest.raises(ValueError):
        ccfv_score(cases, variant="other")
