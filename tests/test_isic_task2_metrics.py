"""ISIC 2018 Task 2 scoring: counts summed over a fold's images, then Jaccard / Dice; folds averaged."""

import math

import numpy as np
import pytest

from medxfer.metrics.isic_task2 import FoldScorer, summarize_folds


def test_counts_are_summed_over_images_before_the_ratio():
    scorer = FoldScorer(["globules", "streaks"])
    gt1 = np.zeros((2, 4, 4), np.uint8)
    gt1[0, :2, :2] = 255                      # globules: 4 px
    pred1 = np.zeros_like(gt1)
    pred1[0, :2, :1] = 1                      # 2 TP, 2 FN
    gt2 = np.zeros_like(gt1)                  # no attribute in image 2
    pred2 = np.zeros_like(gt1)
    pred2[0, 3, :] = 1                        # 4 FP for globules
    pred2[1, 0, 0] = 1                        # 1 FP for streaks
    scorer.add(pred1, gt1)
    scorer.add(pred2, gt2)
    s = scorer.scores()
    assert (s["globules"]["tp"], s["globules"]["fp"], s["globules"]["fn"]) == (2, 4, 2)
    assert s["globules"]["jaccard"] == pytest.approx(2 / 8) and s["globules"]["dice"] == pytest.approx(4 / 10)
    # per-image averaging would give (2/4 + 0/4) / 2 = 0.25 Jaccard by coincidence but Dice (2/3 + 0) / 2 = 0.33
    assert s["streaks"]["jaccard"] == 0.0 and s["streaks"]["images"] == 2


def test_attribute_absent_and_never_predicted_is_undefined_and_left_out_of_the_fold_mean():
    scorer = FoldScorer(["streaks"])
    scorer.add(np.zeros((1, 3, 3)), np.zeros((1, 3, 3)))
    assert math.isnan(scorer.scores()["streaks"]["jaccard"])
    folds = [{"streaks": {"jaccard": math.nan, "dice": math.nan}}, {"streaks": {"jaccard": 0.5, "dice": 2 / 3}},
             {"streaks": {"jaccard": 0.3, "dice": 0.6 / 1.3}}]
    summary = summarize_folds(folds)
    assert summary["streaks"]["n_folds"] == 2
    assert summary["streaks"]["jaccard_mean"] == pytest.approx(0.4) and summary["streaks"]["jaccard_std"] == pytest.approx(0.1)
    assert summary["mean"]["jaccard_mean"] == pytest.approx(0.4)


def test_mismatched_shapes_are_refused():
    scorer = FoldScorer(["a", "b"])
    with pytest.raises(ValueError, match="must both be"):
        scorer.add(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="A=2"):
        scorer.add(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
