"""The designed benchmark's study pieces (issue 18 item 2): banked pretraining checkpoints as models
of graded pretraining length, the transfer mode, and the design check (Spearman against the designed
order, the best designed model against the untrained one) on summaries whose answer is known."""

import csv
import math

import pytest
from scipy.stats import spearmanr

from medxfer.study import StudyConfig, _plan, _TaskInfo, design_check, load_preset


def _design(targets=("Task60_Grade0A", "Task61_Grade0B")):
    tasks = {t: {"grade": 0, "spleen_hu": 110.0, "task_id": 60 + i} for i, t in enumerate(targets)}
    return {"n_grades": 1, "tasks": tasks, "targets": list(targets),
            "distance": {t: {s: 0 for s in tasks if s != t} for t in targets}}


def test_bank_epochs_add_one_model_per_checkpoint_to_every_leave_one_out_bank():
    config = StudyConfig(targets=["Task60_Grade0A"], archs={"unet": {}}, pretrain_epochs=8, bank_epochs=[1, 4, 8],
                         seeds=2, workers=1)
    infos = [_TaskInfo("Task60_Grade0A", 12, 1), _TaskInfo("Task61_Grade0B", 12, 1)]
    plan = _plan(config, infos, False)
    assert plan.models["Task60_Grade0A"] == ["unet_Task61_Grade0B_e1", "unet_Task61_Grade0B_e4",
                                             "unet_Task61_Grade0B_e8", "unet_scratch"]
    # one pretraining run per (arch, task) banks every checkpoint: no extra pretraining jobs
    assert sum(j.kind == "pretrain" for j in plan.jobs) == 2
    assert sum(j.kind == "finetune" for j in plan.jobs) == 4 * 2
    with pytest.raises(ValueError, match=r"bank_epochs \[1, 9\]"):
        _plan(StudyConfig(**{**config.__dict__, "bank_epochs": [1, 9]}), infos, False)


def test_transfer_mode_is_checked_and_the_designed_preset_loads():
    with pytest.raises(ValueError, match="transfer_mode 'everything' is not one of"):
        load_preset(None, {"transfer_mode": "everything"})
    config = load_preset("designed")
    assert config.generated and config.bank_epochs and config.seeds >= 3
    assert set(config.sources) == set(config.targets)  # each target is the other's source: length is the lever


def _summary(dice_of, design, stds, tmp_path, seeds=(0, 1, 2)):
    """A study summary and per-seed CSV with the given mean Dice per (target, model) and seed offsets."""
    rows, seed_rows = [], []
    for target, models in dice_of.items():
        for model, dice in models.items():
            per_seed = [dice + o for o in stds]
            mean = sum(per_seed) / len(per_seed)
            std = math.sqrt(sum((v - mean) ** 2 for v in per_seed) / len(per_seed))
            rows.append({"target": target, "model": model, "dice": mean, "dice_std": std, "seeds": len(seeds)})
            seed_rows += [{"target": target, "model": model, "seed": s, "case": "mean", "dice": v}
                          for s, v in zip(seeds, per_seed)]
    path = tmp_path / "finetune_dice_seeds.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["target", "model", "seed", "case", "dice"])
        w.writeheader()
        w.writerows(seed_rows)
    stats = {"noise_ceiling": {"value": 0.9, "low": 0.8, "high": 1.0},
             "estimators": {"logme": {"weighted_tau": {"value": 0.5, "low": 0.1, "high": 0.9}}}}
    return {"targets": list(dice_of), "finetune_dice": rows, "noise_ceiling": {t: 0.9 for t in dice_of},
            "statistics": {t: stats for t in dice_of}}, path


def test_design_check_follows_the_designed_order_and_the_seed_spread(tmp_path):
    design = _design()
    epochs = {1: 0.40, 3: 0.55, 8: 0.70, 24: 0.80}
    good = {"Task60_Grade0A": {**{f"unet_Task61_Grade0B_e{e}": d for e, d in epochs.items()}, "unet_scratch": 0.30}}
    summary, csv_path = _summary(good, design, (-0.02, 0.0, 0.02), tmp_path)
    check = design_check(design, summary, csv_path)["Task60_Grade0A"]
    assert check["spearman_vs_design"] == pytest.approx(1.0)
    assert check["closest_vs_scratch"]["closest"] == "unet_Task61_Grade0B_e24"
    assert check["closest_vs_scratch"]["margin"] == pytest.approx(0.50)
    assert check["closest_vs_scratch"]["beyond_seed_spread"] and check["accepted"]
    assert [m["pretrain_epochs"] for m in check["models"]] == [24, 8, 3, 1, 0]

    # Dice against the design (the untrained model best): Spearman -1, not accepted; a margin inside the
    # seed spread is not "beyond" it
    bad = {"Task60_Grade0A": {**{f"unet_Task61_Grade0B_e{e}": 0.9 - d for e, d in epochs.items()}, "unet_scratch": 0.62}}
    summary, csv_path = _summary(bad, design, (-0.1, 0.0, 0.1), tmp_path)
    check = design_check(design, summary, csv_path)["Task60_Grade0A"]
    order = [24, 8, 3, 1, 0]
    dice = [0.9 - epochs[e] if e else 0.62 for e in order]
    assert check["spearman_vs_design"] == pytest.approx(spearmanr(dice, [-i for i in range(5)]).statistic)
    assert check["spearman_vs_design"] == pytest.approx(-1.0)
    assert not check["closest_vs_scratch"]["beyond_seed_spread"] and not check["accepted"]
