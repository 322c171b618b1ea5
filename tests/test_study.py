"""The README's main job (the CC-FV study) end to end with smoke-test budgets."""

import csv
import json

from medxfer.data.synth.msd import generate_msd_task
from medxfer.study import StudyConfig, estimate_seconds, run_study
from medxfer.transfer.bank import ModelBank

TINY = dict(shape=(32, 32, 12), spacing=(9.6, 9.6, 24.0), num_test=0, seed=4)


def test_quick_study_builds_scores_finetunes_and_evaluates_every_estimator(tmp_path):
    data = tmp_path / "msd"
    generate_msd_task(data, "spleen", num_training=6, **TINY)
    for profile in ("liver", "lung", "prostate"):  # prostate: 2 channels, never a source for a 1-channel target
        generate_msd_task(data, profile, num_training=3, **TINY)
    logged = []
    config = StudyConfig.quick()
    config.device = "cpu"
    summary = run_study(data, tmp_path / "study", config, progress=False, log=logged.append)
    assert logged[0].startswith("CC-FV study: targets ['Task09_Spleen']") and "estimated" in logged[0]
    bank = ModelBank.open(tmp_path / "study" / "bank")  # the pool: every task once, the target included
    assert sorted(bank.names()) == ["unet_Task03_Liver_e1", "unet_Task06_Lung_e1", "unet_Task09_Spleen_e1", "unet_scratch"]
    with open(tmp_path / "study" / "finetune_dice.csv") as f:
        dice = list(csv.DictReader(f))
    # leave-one-task-out: the model pretrained on the target is never scored or fine-tuned for it
    assert [r["model"] for r in dice] == ["unet_Task03_Liver_e1", "unet_Task06_Lung_e1", "unet_scratch"]
    assert all(r["target"] == "Task09_Spleen" and 0.0 <= float(r["dice"]) <= 1.0 for r in dice)
    scores = json.loads((tmp_path / "study" / "scores" / "Task09_Spleen" / "scores.json").read_text())
    assert len(scores["meta"]["cases"]) == 4  # fold 0 of 3: the 4 fine-tuning cases are scored, not the validation ones
    report = json.loads((tmp_path / "study" / "te_evaluation.json").read_text())
    assert set(report["mean"]) == set(config.estimators)
    assert summary["best_estimator"] in config.estimators
    assert (tmp_path / "study" / "scores_vs_dice.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "study" / "study.json").read_text())
    assert saved["tasks"] == ["Task03_Liver", "Task06_Lung", "Task09_Spleen"] and saved["seconds"]["fine_tuning"] > 0
    assert saved["skipped_tasks"] == ["Task05_Prostate"]


def test_default_study_is_estimated_under_15_minutes_on_the_demo_data():
    # demo: 7 generated profiles x 6 cases; 6 one-channel tasks pretrained, 2 targets
    est = estimate_seconds(StudyConfig(), n_tasks=6, n_source_cases=6, n_target_cases=6)
    assert est["total"] < 15 * 60
    assert est["pretraining"] > est["scoring"]  # scoring is cheap next to training
