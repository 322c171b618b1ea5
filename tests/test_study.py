"""The README's main job (the CC-FV study) end to end with smoke-test budgets."""

import csv
import json

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


def test_default_study_is_estimated_under_15_minutes_on_the_demo_data():
    # demo: 7 generated profiles x 6 cases; 6 one-channel tasks pretrained, 2 targets
    est = estimate_seconds(StudyConfig(), n_tasks=6, n_source_cases=6, n_target_cases=6)
    assert est["total"] < 15 * 60
    assert est["pretraining"] > est["scoring"]  # scoring is cheap next to training
