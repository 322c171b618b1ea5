"""`medxfer study`: the paper-scale preset's dry run, its first job on generated MSD data, and a
study stopped between jobs (with a half-written run) that resumes without redoing finished jobs."""

import csv
import json
import math
import re
import shutil

import numpy as np
import pytest
import yaml

from medxfer.cli import main
from medxfer.study import RESULT_FILE, load_preset, run_study
from medxfer.resources import config_path

MSD5 = ["Task03_Liver", "Task06_Lung", "Task07_Pancreas", "Task09_Spleen", "Task10_Colon"]


def _per_epoch(n_cases, folds=5, batch=2):
    return math.ceil((n_cases - math.ceil(n_cases / folds)) / batch)


def test_ccfv_msd_dry_run_prints_configuration_jobs_and_estimate(capsys):
    assert main(["study", "--preset", "ccfv_msd", "--dry-run", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed.split("\n# tasks")[0])  # the configuration part is YAML
    assert config["targets"] == MSD5 and config["sources"] == MSD5 and set(config["archs"]) == {"unet", "unetr"}
    assert (config["pretrain_iterations"], config["finetune_iterations"], config["batch_size"]) == (250000, 100000, 2)
    assert config["finetune_folds"] == 5 and config["seeds"] >= 3  # 80/20 split
    # case counts from the published table (no data given): the budgets in epochs follow from them
    table = yaml.safe_load(config_path("msd_tasks.yaml").read_text())
    n = {t: table[t]["numTraining"] for t in MSD5}
    pre_epochs = round(250000 / np.mean([_per_epoch(n[t]) for t in MSD5]))
    assert f"pretraining {pre_epochs} epochs = {pre_epochs * _per_epoch(n['Task07_Pancreas'])} iterations" in printed
    spleen_epochs = math.ceil(100000 / _per_epoch(n["Task09_Spleen"]))  # 41 cases: 32 fine-tune, 9 test
    assert (f"target Task09_Spleen: 32 fine-tuning / scored cases, 9 test cases; fine-tuning {spleen_epochs} epochs"
            in printed)
    jobs = re.findall(r"^\s+\d+\s+(plan|pretrain|score|finetune) (\S+)(?: (\S+) seed (\d+))?", printed, re.M)
    kinds = [j[0] for j in jobs]
    # 5 plannings, 2 archs x 5 tasks pretrained, 5 scorings, 5 targets x (2 x 4 sources + 2 scratch) x 3 seeds
    assert (kinds.count("plan"), kinds.count("pretrain"), kinds.count("score"), kinds.count("finetune")) == (5, 10, 5, 150)
    assert f"# jobs (170;" in printed
    spleen = {j[2] for j in jobs if j[0] == "finetune" and j[1] == "Task09_Spleen" and j[3] == "0"}
    assert spleen == {f"{a}_{t}_e{pre_epochs}" for a in ("unet", "unetr") for t in MSD5 if t != "Task09_Spleen"} | \
        {"unet_scratch", "unetr_scratch"}  # leave-one-task-out
    # the estimate: the preset's seconds per iteration times the iterations, one worker
    s_it = config["seconds_per_iteration"]
    pre = sum(4 + s_it[a] * pre_epochs * _per_epoch(n[t]) for a in ("unet", "unetr") for t in MSD5)
    fine = 3 * sum(4 * 10 + (4 * s_it["unet"] + 4 * s_it["unetr"] + s_it["unet"] + s_it["unetr"])
                   * math.ceil(100000 / _per_epoch(n[t])) * _per_epoch(n[t]) for t in MSD5)
    score = sum(10 * (n[t] - math.ceil(n[t] / 5)) * 0.6 for t in MSD5)
    total_h = float(re.search(r"total ([\d.]+) h", printed).group(1))
    assert total_h == pytest.approx((5 * 12 + pre + fine + score) / 3600, abs=0.05)


def test_ccfv_msd_first_job_starts_on_generated_msd_data(tmp_path, capsys):
    data, out = tmp_path / "msd", tmp_path / "study"
    assert main(["synth", "msd", "--out", str(data), "--profiles", "liver", "lung", "pancreas", "spleen", "colon",
                 "--num-training", "5", "--num-test", "1", "--shape", "32", "32", "12", "--spacing", "9.6", "9.6", "24"]) == 0
    capsys.readouterr()
    tiny = ["--set", "patch_size=[32, 32, 16]", "--set", "pretrain_iterations=2", "--set", "finetune_iterations=2",
            "--set", "archs={unet: {channels: [8, 16, 32], strides: [2, 2], num_res_units: 1}}", "--device", "cpu"]
    assert main(["study", "--preset", "ccfv_msd", "--data", str(data), "--out", str(out), "--max-jobs", "1",
                 "--quiet", *tiny]) == 0
    printed = capsys.readouterr().out
    assert "CC-FV study: targets ['Task03_Liver', 'Task06_Lung', 'Task07_Pancreas', 'Task09_Spleen', 'Task10_Colon']" in printed
    assert "[1/" in printed and "plan Task03_Liver" in printed and "stopped after 1 job(s)" in printed
    plans = json.loads((data / "Task03_Liver" / "medxfer_plans.json").read_text())  # nnU-Net planned it
    assert plans["task"] == "Task03_Liver" and not (data / "Task06_Lung" / "medxfer_plans.json").exists()
    # the dry run on the data: counts from the folders, the finished planning costs nothing more
    assert main(["study", "--preset", "ccfv_msd", "--data", str(data), "--dry-run", "--workers", "1", *tiny]) == 0
    printed = capsys.readouterr().out
    assert f"# tasks from {data}" in printed and "Task03_Liver: 5 training cases" in printed
    assert re.search(r"plan Task03_Liver\s+nnU-Net planning\s+0$", printed, re.M)
    assert re.search(r"plan Task06_Lung\s+nnU-Net planning\s+12$", printed, re.M)


def test_bad_preset_and_settings_are_one_line_errors(capsys):
    assert main(["study", "--preset", "nope", "--dry-run"]) == 1
    assert "study_nope.yaml: no such study preset (presets: demo, quick, ccfv_msd" in capsys.readouterr().err
    assert main(["study", "--preset", "quick", "--set", "epochs=3", "--dry-run"]) == 1
    assert "unknown study setting(s) ['epochs']" in capsys.readouterr().err
    assert main(["study", "--preset", "quick", "--set", "seeds", "--dry-run"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err


def _mtimes(paths):
    return {p: p.stat().st_mtime_ns for p in paths}


def test_stopped_study_resumes_without_redoing_finished_jobs(quick_study, tmp_path):
    # the quick study (1 seed) is done; with 2 seeds its 7 jobs are kept and 3 seed-1 fine-tunings are added
    data, out = tmp_path / "msd", tmp_path / "study"
    shutil.copytree(quick_study["data"], data)
    shutil.copytree(quick_study["out"], out)
    config = load_preset("quick", {"seeds": 2, "device": "cpu"})
    finished = _mtimes(sorted(out.glob("finetune/*/*/result.json")) + sorted(out.glob("bank/pretraining/*.json"))
                       + [out / "scores" / "Task09_Spleen" / "scores.state.json"])
    log = []
    assert run_study(data, out, config, progress=False, log=log.append, max_jobs=1)["stopped"]
    assert any(line.startswith("resuming: 7 of 10 steps already done") for line in log), log
    first = out / "finetune" / "Task09_Spleen" / "unet_Task03_Liver_e1@seed1" / RESULT_FILE
    assert json.loads(first.read_text())["for"]["seed"] == 1
    done = _mtimes([first])
    # a half-written run (killed before its result.json) of the next job
    half = out / "finetune" / "Task09_Spleen" / "unet_Task06_Lung_e1@seed1"
    half.mkdir()
    (half / "half_written.pt").write_bytes(b"\0" * 10)
    log = []
    summary = run_study(data, out, config, progress=False, log=log.append)
    assert any(line.startswith("resuming: 8 of 10 steps already done") for line in log), log
    ran = [line for line in log if line.startswith("  [")]
    assert len(ran) == 2 and all("seed 1:" in line for line in ran), ran  # only the two missing fine-tunings
    assert _mtimes(finished) == finished and _mtimes(done) == done  # nothing finished was redone
    assert not (half / "half_written.pt").exists() and (half / RESULT_FILE).is_file()  # the half-written run redone
    stats = summary["statistics"]["Task09_Spleen"]
    assert stats["n_seeds"] == 2 and len(stats["noise_ceiling"]["pairs"]) == 1
    with open(out / "finetune_dice.csv") as f:
        rows = list(csv.DictReader(f))
    seeds = {(r["model"], int(r["seed"])): float(r["dice"]) for r in csv.DictReader(open(out / "finetune_dice_seeds.csv"))
             if r["case"] == "mean"}
    for r in rows:  # the ground truth: the mean over the two seeds
        assert int(r["seeds"]) == 2
        assert float(r["dice"]) == pytest.approx((seeds[r["model"], 0] + seeds[r["model"], 1]) / 2)
