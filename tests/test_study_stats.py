"""Statistics of repeated fine-tuning (medxfer.transferability.repeats): noise ceiling, bootstrap
intervals and paired comparisons, checked against scipy and closed forms."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from medxfer.transferability.repeats import bootstrap_evaluation, mean_dice, noise_ceiling, seed_dice

DICE = np.array([0.81, 0.62, 0.55, 0.43, 0.30, 0.12])  # six models, distinct Dice


def test_noise_ceiling_of_identical_rankings_is_one_and_of_reversed_ones_minus_one():
    assert noise_ceiling(np.stack([DICE, DICE]))["value"] == pytest.approx(1.0, abs=1e-12)
    # the same ranking at other Dice levels (a seed that trains better overall) is still identical
    assert noise_ceiling(np.stack([DICE, 0.5 * DICE + 0.1]))["value"] == pytest.approx(1.0, abs=1e-12)
    assert noise_ceiling(np.stack([DICE, DICE[::-1]]))["value"] == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(noise_ceiling(DICE[None])["value"])  # one seed: no pair


def test_noise_ceiling_is_the_mean_weighted_tau_over_all_seed_pairs():
    rng = np.random.default_rng(3)
    runs = DICE + rng.normal(0, 0.1, size=(4, DICE.size))  # 4 seeds
    expected = [scipy.stats.weightedtau(runs[i], runs[j]).statistic for i, j in itertools.combinations(range(4), 2)]
    got = noise_ceiling(runs)
    assert got["n_seeds"] == 4 and len(got["pairs"]) == 6
    assert got["pairs"] == pytest.approx(expected, abs=1e-12)
    assert got["value"] == pytest.approx(np.mean(expected), abs=1e-12)
    # per-case Dice: a seed's model Dice is the mean over its cases with a defined Dice
    cases = np.stack([runs - 0.05, runs + 0.05, np.full_like(runs, np.nan)], axis=2)
    assert seed_dice(cases) == pytest.approx(runs, abs=1e-12)
    assert noise_ceiling(cases)["value"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert mean_dice(cases) == pytest.approx(runs.mean(axis=0), abs=1e-12)


def test_bootstrap_interval_of_a_perfect_estimator_on_noiseless_dice_is_one_one():
    dice = np.broadcast_to(DICE[None, :, None], (3, DICE.size, 5))  # 3 seeds x 6 models x 5 cases, no noise
    result = bootstrap_evaluation(dice, {"perfect": DICE * 10, "ccfv": DICE[::-1]}, n_boot=200)
    for metric in ("weighted_tau", "pearson", "spearman", "tis"):
        r = result["estimators"]["perfect"][metric]
        assert (r["value"], r["low"], r["high"], r["n"]) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0), 200)
    assert result["noise_ceiling"]["value"] == pytest.approx(1.0)
    assert (result["noise_ceiling"]["low"], result["noise_ceiling"]["high"]) == (pytest.approx(1.0), pytest.approx(1.0))
    reversed_ = result["estimators"]["ccfv"]["weighted_tau"]
    assert reversed_["low"] == reversed_["high"] == pytest.approx(-1.0)
    # paired against the reference (ccfv): +2 in tau on every resample, always ahead
    paired = result["paired"]["perfect"]["weighted_tau"]
    assert paired["difference"] == pytest.approx(2.0) and paired["low"] == pytest.approx(2.0)
    assert paired["share_ahead"] == 1.0 and "ccfv" not in result["paired"]


def test_bootstrap_resamples_seeds_and_cases():
    rng = np.random.default_rng(0)
    # per-case offsets shift every model alike: the ranking on any case subset stays DICE's
    shifted = DICE[None, :, None] + rng.normal(0, 0.2, size=(1, 1, 8))
    steady = bootstrap_evaluation(np.repeat(shifted, 2, axis=0), {"perfect": DICE}, n_boot=100)
    assert steady["estimators"]["perfect"]["spearman"]["low"] == pytest.approx(1.0)
    # model x seed noise as large as the differences: the interval widens and the ceiling drops below 1
    noisy = DICE[None, :, None] + rng.normal(0, 0.15, size=(3, DICE.size, 4))
    result = bootstrap_evaluation(noisy, {"perfect": DICE, "ccfv": DICE + rng.normal(0, 0.2, DICE.size)},
                                  n_boot=300, seed=1)
    tau = result["estimators"]["perfect"]["weighted_tau"]
    truth = noisy.mean(axis=2).mean(axis=0)
    assert tau["value"] == pytest.approx(scipy.stats.weightedtau(DICE, truth).statistic)
    assert tau["low"] < tau["high"] and tau["low"] <= 1.0
    assert result["noise_ceiling"]["value"] < 1.0
    again = bootstrap_evaluation(noisy, {"perfect": DICE, "ccfv": result["mean_dice"]}, n_boot=300, seed=1)
    assert again["estimators"]["perfect"] == result["estimators"]["perfect"]  # seeded: reproducible
    # an estimator equal to the reference: difference 0 on every resample, ahead half the time
    same = bootstrap_evaluation(noisy, {"a": DICE, "ccfv": DICE}, n_boot=50)["paired"]["a"]["pearson"]
    assert (same["difference"], same["low"], same["high"], same["share_ahead"]) == (0.0, 0.0, 0.0, 0.5)


def test_bad_shapes_are_refused_in_one_line():
    with pytest.raises(ValueError, match="seeds x models x cases"):
        bootstrap_evaluation(DICE, {"a": DICE})
    with pytest.raises(ValueError, match="estimator 'a': 5 scores for 6 models"):
        bootstrap_evaluation(np.stack([DICE, DICE]), {"a": DICE[:5]})
