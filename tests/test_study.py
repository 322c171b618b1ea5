"""The README's main job (the CC-FV study) end to end with smoke-test budgets."""

import csv
import json

import numpy as np
import pytest

from medxfer.study import StudyConfig, estimate_seconds
from medxfer.transfer.bank import ModelBank


def test_quick_study_builds_scores_finetunes_and_evaluates_every_estimator(quick_study):
    # the quick study of tests/conftest.py: spleen target (6 cases), liver + lung sources, prostate (2 channels)
    out, logged, config, summary = quick_study["out"], quick_study["log"], quick_study["config"], quick_study["summary"]
    assert logged[0].startswith("CC-FV study: targets ['Task09_Spleen']") and "estimated" in logged[0]
    assert not any(line.startswith("resuming") for line in logged)  # a fresh folder: nothing done before
    bank = ModelBank.open(out / "bank")  # the pool: every task once, the target included
    assert sorted(bank.names()) == ["unet_Task03_Liver_e1", "unet_Task06_Lung_e1", "unet_Task09_Spleen_e1", "unet_scratch"]
    with open(out / "finetune_dice.csv") as f:
        dice = list(csv.DictReader(f))
    # leave-one-task-out: the model pretrained on the target is never scored or fine-tuned for it
    assert [r["model"] for r in dice] == ["unet_Task03_Liver_e1", "unet_Task06_Lung_e1", "unet_scratch"]
    assert all(r["target"] == "Task09_Spleen" and 0.0 <= float(r["dice"]) <= 1.0 for r in dice)
    scores = json.loads((out / "scores" / "Task09_Spleen" / "scores.json").read_text())
    assert len(scores["meta"]["cases"]) == 4  # fold 0 of 3: the 4 fine-tuning cases are scored, not the validation ones
    report = json.loads((out / "te_evaluation.json").read_text())
    assert set(report["mean"]) == set(config.estimators)
    assert summary["best_estimator"] in config.estimators
    assert (out / "scores_vs_dice.png").stat().st_size > 1000
    saved = json.loads((out / "study.json").read_text())
    assert saved["tasks"] == ["Task03_Liver", "Task06_Lung", "Task09_Spleen"] and saved["seconds"]["fine_tuning"] > 0
    assert saved["skipped_tasks"] == ["Task05_Prostate"]
    # every finished step left its marker, recording what it is for (what a rerun after a kill trusts)
    for model in ("unet_Task03_Liver_e1", "unet_Task06_Lung_e1", "unet_scratch"):
        result = json.loads((out / "finetune" / "Task09_Spleen" / model / "result.json").read_text())
        assert result["for"]["entry_sha256"] == bank.get(model).sha256
        assert [r["dice"] for r in dice if r["model"] == model] == [str(result["dice"])]
    state = json.loads((out / "scores" / "Task09_Spleen" / "scores.state.json").read_text())
    assert state["done"] and sorted(state["for"]["entries"]) == [r["model"] for r in dice]
    for task in saved["tasks"]:
        marker = json.loads((out / "bank" / "pretraining" / f"unet_{task}.json").read_text())
        assert marker["state"] == "done" and marker["entries"] == {f"unet_{task}_e1": bank.get(f"unet_{task}_e1").sha256}


def test_quick_study_reports_repeats_statistics_beside_the_estimators(quick_study):
    out, config = quick_study["out"], quick_study["config"]
    report = json.loads((out / "te_evaluation.json").read_text())
    stats = report["statistics"]["Task09_Spleen"]
    assert stats["n_seeds"] == 1 and stats["n_cases"] == 2  # one seed (quick preset), 2 validation cases
    assert stats["noise_ceiling"]["value"] is None  # one seed: no pair of seeds, no ceiling
    assert set(stats["estimators"]) == set(config.estimators) and set(stats["paired"]) == set(config.estimators) - {"ccfv"}
    for name, metrics in stats["estimators"].items():  # the point value is evaluate_estimators' on the mean Dice
        assert metrics["weighted_tau"]["value"] == report["per_target"]["Task09_Spleen"][name]["weighted_tau"]
    rows = list(csv.DictReader(open(out / "te_statistics.csv")))
    assert rows[0]["kind"] == "noise_ceiling" and {r["kind"] for r in rows} == {"noise_ceiling", "estimator", "minus_ccfv"}
    assert (out / "tau_vs_ceiling.png").stat().st_size > 1000
    # per-case Dice of each run: their mean is MONAI MeanDice's own reduction (the run's val_mean_dice)
    split = json.loads((out / "splits" / "Task09_Spleen.json").read_text())
    for run in (out / "finetune" / "Task09_Spleen").iterdir():
        result = json.loads((run / "result.json").read_text())
        assert sorted(result["cases"]) == split[0]["val"]
        assert np.mean(result["case_dice"]) == pytest.approx(result["dice"], abs=1e-6)


def test_default_study_estimate_on_the_demo_data():
    # demo: 7 generated profiles x 6 cases; 6 one-channel tasks pretrained, 2 targets
    one = estimate_seconds(StudyConfig(seeds=1, workers=1), n_tasks=6, n_source_cases=6, n_target_cases=6)
    three = estimate_seconds(StudyConfig(workers=2), n_tasks=6, n_source_cases=6, n_target_cases=6)
    assert one["total"] < 15 * 60
    assert one["pretraining"] > one["scoring"]  # scoring is cheap next to training
    # three seeds: three times the fine-tuning, over two single-thread workers
    assert three["fine_tuning"] == pytest.approx(3 * one["fine_tuning"])
    assert three["total"] == pytest.approx(one["total"] + 0.5 * one["fine_tuning"])
    # 24 runs per seed: UNet and UNETR fine-tuned 40 epochs x 2 iterations (4 of 6 cases, batch 2)
    assert one["fine_tuning"] == pytest.approx(2 * 6 * ((4 + 0.07 * 80) + (4 + 0.20 * 80)))
