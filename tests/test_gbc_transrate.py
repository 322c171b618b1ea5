"""GBC and TransRate (medxfer.transferability.gbc / .transrate) against straightforward numpy
transcriptions of their formulas, written here with loops and dense matrices (PCA through the
eigenvectors of the covariance, not an SVD; coding rates through slogdet in D dimensions, not
through eigenvalues of the smaller Gram matrix; the official TransRate's rank through
``np.linalg.matrix_rank`` of the (D, D) matrix, as the authors' code computes it)."""

import numpy as np
import pytest

from medxfer.transferability.gbc import gbc
from medxfer.transferability.transrate import coding_rate, transrate


def reference_gbc(features, labels, pca_dim=64, min_var=1e-4):
    x = np.asarray(features, dtype=float)
    x = x - x.mean(axis=0)
    p = min(pca_dim, x.shape[1], x.shape[0])
    evals, evecs = np.linalg.eigh(x.T @ x)
    axes = evecs[:, np.argsort(evals)[::-1][:p]]
    z = x @ axes
    classes = sorted(set(labels.tolist()))
    stats = {}
    for c in classes:
        zc = z[labels == c]
        mean = zc.sum(axis=0) / len(zc)
        var = ((zc - mean) ** 2).sum(axis=0) / len(zc)
        stats[c] = (mean, np.diag(np.maximum(var, min_var)))
    total = 0.0
    for ci in classes:
        for cj in classes:
            if ci == cj:
                continue
            (mi, si), (mj, sj) = stats[ci], stats[cj]
            s = (si + sj) / 2
            diff = mi - mj
            bd = diff @ np.linalg.solve(s, diff) / 8
            bd += 0.5 * (np.linalg.slogdet(s)[1] - 0.5 * (np.linalg.slogdet(si)[1] + np.linalg.slogdet(sj)[1]))
            total += np.exp(-bd)
    return -total


def reference_rate(z, eps2):
    n, d = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps2))[1]


def normalise_rows(z):
    z = z.copy()
    for i in range(len(z)):
        norm = np.sqrt(np.sum(z[i] ** 2))
        if norm > 1e-9:
            z[i] = z[i] / norm
        else:
            z[i] = 0.0
    return z


def reference_transrate(features, labels, eps2=1e-4, variant="paper"):
    z = np.asarray(features, dtype=float)
    if variant == "official":  # authors' code: normalise, centre, normalise again, divide by rank
        z = normalise_rows(z)
    z = normalise_rows(z - z.mean(axis=0))
    result = reference_rate(z, eps2)
    for c in sorted(set(labels.tolist())):
        zc = z[labels == c]  # not re-centred (official code)
        result -= len(zc) / len(z) * reference_rate(zc, eps2)
    if variant == "official":
        result /= np.linalg.matrix_rank(z.T @ z / len(z))
    return result


def blobs(n, d, num_classes, separation, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    centres = separation * rng.normal(size=(num_classes, d))
    return centres[labels] + rng.normal(size=(n, d)), labels


CASES = {  # (N, D, classes, pca_dim)
    "n_gt_d_no_reduction": (300, 12, 3, 64),
    "n_gt_d_pca": (400, 80, 4, 64),
    "small_pca": (200, 30, 3, 5),
    "n_lt_d": (25, 90, 3, 64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gbc_equals_numpy_transcription(name):
    n, d, k, pca_dim = CASES[name]
    f, labels = blobs(n, d, k, separation=0.7, seed=1)
    assert gbc(f, labels, pca_dim=pca_dim) == pytest.approx(reference_gbc(f, labels, pca_dim), rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("eps2", [1e-4, 1e-2])
def test_transrate_equals_numpy_transcription(name, eps2, variant):
    n, d, k, _ = CASES[name]
    f, labels = blobs(n, d, k, separation=0.7, seed=2)
    f = f * np.random.default_rng(12).uniform(0.2, 5.0, size=(n, 1))  # rows of different norms
    expected = reference_transrate(f, labels, eps2, variant)
    assert transrate(f, labels, eps2=eps2, variant=variant) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_transrate_default_is_the_paper_variant():
    f, labels = blobs(80, 10, 3, separation=0.7, seed=13)
    assert transrate(f, labels) == transrate(f, labels, variant="paper")
    assert transrate(f, labels) != pytest.approx(transrate(f, labels, variant="official"), rel=1e-3)


def test_transrate_official_is_the_paper_rate_over_the_rank_on_unit_rows():
    # rows already on the unit sphere: the first normalisation does nothing, only the rank division is left
    for n, d in [(200, 12), (20, 60)]:
        f, labels = blobs(n, d, 3, separation=1.0, seed=14)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        rank = min(d, n - 1)  # centring removes one dimension when N <= D
        assert transrate(f, labels, variant="official") * rank == pytest.approx(transrate(f, labels), rel=1e-9)


def test_transrate_official_ignores_row_norms_paper_does_not():
    f, labels = blobs(150, 16, 3, separation=1.0, seed=15)
    scaled = f * np.random.default_rng(15).uniform(0.1, 10.0, size=(150, 1))
    assert transrate(scaled, labels, variant="official") == pytest.approx(transrate(f, labels, variant="official"), rel=1e-9)
    assert abs(transrate(scaled, labels) - transrate(f, labels)) > 1e-2


@pytest.mark.parametrize("shape", [(50, 7), (7, 50)])
def test_coding_rate_through_the_smaller_gram_matrix_equals_slogdet_in_d_dims(shape):
    z = np.random.default_rng(3).normal(size=shape)
    assert coding_rate(z, 1e-3) == pytest.approx(reference_rate(z, 1e-3), rel=1e-10)


def test_gbc_well_separated_classes_score_higher_than_overlapping_ones():
    separated = gbc(*blobs(300, 20, 3, separation=3.0, seed=4))
    overlapping = gbc(*blobs(300, 20, 3, separation=0.1, seed=4))
    assert overlapping < separated <= 0.0
    assert separated > -1e-3  # nearly no overlap
    assert overlapping < -3.0  # 6 ordered pairs, each coefficient close to 1


def test_transrate_separated_classes_score_higher_than_mixed_ones():
    f, labels = blobs(300, 20, 3, separation=3.0, seed=5)
    shuffled = np.random.default_rng(5).permutation(labels)  # same class sizes, no relation to f
    assert transrate(f, labels) > transrate(f, shuffled) + 1.0


def test_scores_invariant_to_sample_order_and_label_names():
    f, labels = blobs(120, 15, 3, separation=1.0, seed=6)
    perm = np.random.default_rng(6).permutation(len(labels))
    renamed = np.array([4, 9, 1])[labels]
    for score in (gbc, transrate):
        ref = score(f, labels)
        assert score(f[perm], labels[perm]) == pytest.approx(ref, rel=1e-8)
        assert score(f, renamed) == pytest.approx(ref, rel=1e-8)
    # TransRate normalises rows, so a global scale of the features does not matter
    assert transrate(5.0 * f, labels) == pytest.approx(transrate(f, labels), rel=1e-8)


def test_class_with_one_sample_is_defined():
    f, labels = blobs(60, 10, 2, separation=1.0, seed=7)
    labels = labels.copy()
    labels[0] = 2  # class 2 has a single sample: variance clamped to 1e-4, R = 1/2 ln(1 + |z|^2 / eps2)
    g, t = gbc(f, labels), transrate(f, labels)
    assert np.isfinite(g) and np.isfinite(t)
    assert g == pytest.approx(reference_gbc(f, labels), rel=1e-7, abs=1e-12)
    assert t == pytest.approx(reference_transrate(f, labels), rel=1e-8)


def test_single_class_gives_zero():
    f, _ = blobs(40, 10, 1, separation=1.0, seed=8)
    labels = np.zeros(40, dtype=int)
    assert gbc(f, labels) == 0.0  # no pair of classes: the empty sum
    assert transrate(f, labels) == pytest.approx(0.0, abs=1e-9)  # R(Z) - R(Z)


def test_n_lt_d_is_defined():
    f, labels = blobs(12, 200, 3, separation=1.0, seed=9)
    g, t = gbc(f, labels), transrate(f, labels)
    assert np.isfinite(g) and np.isfinite(t)
    assert g == pytest.approx(reference_gbc(f, labels), rel=1e-7, abs=1e-12)
    assert t == pytest.approx(reference_transrate(f, labels), rel=1e-8)


def test_duplicate_rows_are_defined():
    rng = np.random.default_rng(10)
    base = rng.normal(size=(6, 20))
    f = np.repeat(base, 5, axis=0)  # every row 5 times
    labels = np.repeat(np.array([0, 0, 1, 1, 2, 2]), 5)
    g, t = gbc(f, labels), transrate(f, labels)
    assert np.isfinite(g) and np.isfinite(t)
    assert g == pytest.approx(reference_gbc(f, labels), rel=1e-6, abs=1e-12)
    assert t == pytest.approx(reference_transrate(f, labels), rel=1e-8)
    # all rows identical: nothing to code after centring, every rate is 0; GBC sees identical classes
    same = np.tile(base[:1], (30, 1))
    assert transrate(same, labels) == pytest.approx(0.0, abs=1e-12)
    assert transrate(same, labels, variant="official") == 0.0  # rank 0 (the authors' code: NaN)
    assert t == pytest.approx(reference_transrate(f, labels), rel=1e-8)
    assert transrate(f, labels, variant="official") == pytest.approx(reference_transrate(f, labels, variant="official"), rel=1e-8)
    assert gbc(same, labels) == pytest.approx(-6.0)  # 6 ordered pairs with BD = 0


def test_invalid_inputs_raise():
    f, labels = blobs(20, 5, 2, separation=1.0, seed=11)
    for score in (gbc, transrate):
        with pytest.raises(ValueError):
            score(f, labels[:-1])
        with pytest.raises(ValueError):
            score(f[:, :0], labels)
    with pytest.raises(ValueError):
        transrate(f, labels, eps2=0.0)
    with pytest.raises(ValueError, match="variant"):
        transrate(f, labels, variant="rank")
