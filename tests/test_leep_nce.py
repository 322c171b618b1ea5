"""LEEP (Nguyen et al. 2020) and NCE (Tran et al. 2019) against independent computations."""

import math

import numpy as np
import pytest
import scipy.stats

from medxfer.transferability.features import CaseFeatures
from medxfer.transferability.leep import leep, leep_cases, pooled_source_probs
from medxfer.transferability.nce import nce, nce_cases, nce_from_probs


def _random_head(rng, n, z):
    logits = rng.normal(size=(n, z)) * 2
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def test_leep_matches_numpy_double_loop_transcription():
    rng = np.random.default_rng(0)
    n, z_classes, k_classes = 60, 5, 3
    theta = _random_head(rng, n, z_classes)
    y = rng.integers(0, k_classes, size=n)
    # Nguyen et al. eqs. (1)-(2), written out loop by loop.
    joint = np.zeros((k_classes, z_classes))
    for yy in range(k_classes):
        for zz in range(z_classes):
            joint[yy, zz] = sum(theta[i, zz] for i in range(n) if y[i] == yy) / n
    marginal = [sum(joint[yy, zz] for yy in range(k_classes)) for zz in range(z_classes)]
    total = 0.0
    for i in range(n):
        total += math.log(sum(joint[y[i], zz] / marginal[zz] * theta[i, zz] for zz in range(z_classes)))
    assert leep(theta, y) == pytest.approx(total / n, rel=1e-12)


def test_leep_is_zero_for_a_deterministic_source_head_that_determines_the_target():
    rng = np.random.default_rng(1)
    z = rng.integers(0, 6, size=200)
    theta = np.eye(6)[z]
    y = np.array([0, 0, 1, 2, 2, 1])[z]  # non-injective map source -> target
    assert leep(theta, y) == pytest.approx(0.0, abs=1e-12)
    # and it is the maximum: any soft / uninformative head scores below
    assert leep(_random_head(rng, 200, 6), y) < -1e-3


def test_leep_of_a_uniform_head_is_minus_the_target_label_entropy():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, size=300)
    theta = np.full((300, 7), 1 / 7)  # P(y|z) = P(y) for every z
    freq = np.bincount(y) / y.size
    assert leep(theta, y) == pytest.approx(-scipy.stats.entropy(freq), rel=1e-12)


def test_leep_treats_labels_as_categories_and_rejects_logits():
    rng = np.random.default_rng(3)
    theta = _random_head(rng, 40, 3)
    y = rng.integers(0, 2, size=40)
    assert leep(theta, np.where(y == 1, 7, 3)) == pytest.approx(leep(theta, y))
    with pytest.raises(ValueError, match="probabilities"):
        leep(np.log(theta), y)


def test_leep_ignores_a_source_class_that_never_gets_probability_mass():
    rng = np.random.default_rng(7)
    theta = _random_head(rng, 50, 3)
    y = rng.integers(0, 2, size=50)
    padded = np.concatenate([theta[:, :1], np.zeros((50, 1)), theta[:, 1:]], axis=1)  # P(z=1) = 0
    assert leep(padded, y) == pytest.approx(leep(theta, y), rel=1e-12)


def _cases(rng):
    cases = []
    for i in range(3):
        n = 30
        probs = _random_head(rng, n, 4).astype(np.float32)
        cases.append(CaseFeatures(case_id=f"c{i}", levels=[rng.normal(size=(n, 2)).astype(np.float32)],
                                  labels=rng.integers(0, 3, size=n), variety=rng.random(n) < 0.3,
                                  source_probs=probs))
    return cases


def test_leep_and_nce_on_cases_use_the_class_proportional_voxels():
    cases = _cases(np.random.default_rng(4))
    probs = np.concatenate([c.source_probs[~c.variety] for c in cases])
    labels = np.concatenate([c.labels[~c.variety] for c in cases])
    got_p, got_l = pooled_source_probs(cases)
    np.testing.assert_array_equal(got_p, probs)
    np.testing.assert_array_equal(got_l, labels)
    assert leep_cases(cases) == pytest.approx(leep(probs, labels))
    assert nce_cases(cases) == pytest.approx(nce(probs.argmax(1), labels))
    cases[1].source_probs = None
    with pytest.raises(ValueError, match="source_probs"):
        leep_cases(cases)


def test_nce_equals_conditional_entropy_computed_by_hand():
    # z = 0 -> y in {0, 1} half-half (H = ln 2), z = 1 -> y = 1 always; P(z = 0) = 1/2
    assert nce([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(-0.5 * math.log(2), rel=1e-12)


def test_nce_equals_joint_minus_source_entropy_from_scipy():
    rng = np.random.default_rng(5)
    z = rng.integers(0, 5, size=500)
    y = (z + rng.integers(0, 3, size=500)) % 4
    joint_counts = np.zeros((4, 5))
    np.add.at(joint_counts, (y, z), 1)
    h_yz = scipy.stats.entropy(joint_counts.ravel())
    h_z = scipy.stats.entropy(np.bincount(z))
    assert nce(z, y) == pytest.approx(-(h_yz - h_z), rel=1e-12)


def test_nce_is_zero_when_target_is_a_function_of_source_and_minus_target_entropy_when_independent():
    z = np.repeat(np.arange(6), 10)
    assert nce(z, z // 2) == pytest.approx(0.0, abs=1e-15)
    zi, yi = np.meshgrid(np.arange(2), np.array([0, 1, 1, 2]), indexing="ij")  # exact independence
    y_freq = np.array([1, 2, 1]) / 4
    assert nce(zi.ravel(), yi.ravel()) == pytest.approx(-scipy.stats.entropy(y_freq), rel=1e-12)


def test_nce_from_probs_takes_the_argmax_of_the_source_head():
    rng = np.random.default_rng(6)
    theta = _random_head(rng, 80, 4)
    y = rng.integers(0, 3, size=80)
    assert nce_from_probs(theta, y) == nce(theta.argmax(1), y)
