"""Scoring a model bank on a target with every estimator: pipeline, bundle configs, `medxfer rank`."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from medxfer.data.synth.msd import generate_msd_task
from medxfer.networks.registry import build_network
from medxfer.transfer.bank import ModelBank
from medxfer.transferability.features import SamplingConfig
from medxfer.transferability.score import DEFAULT_ESTIMATORS, run_estimators, score_bank, write_scores
from medxfer.workflows.bundle import bundle_dir, run_bundle

PLANS = {"task": "Task09_Spleen", "target_spacing": [9.6, 9.6, 24.0], "patch_size": [32, 32, 16],
         "normalization": [{"channel": 0, "scheme": "CT", "clip": [-100.0, 200.0], "mean": 100.0, "std": 50.0}],
         "labels": {"0": "background", "1": "spleen"}, "channels": {"0": "CT"}}
UNET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
UNETR = {"feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 2}
SAMPLING = SamplingConfig(min_per_class=16, max_per_class=64, variety_samples=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    task = generate_msd_task(root / "msd", "spleen", num_training=3, num_test=0, seed=2, shape=(32, 32, 12),
                             spacing=(9.6, 9.6, 24.0))
    (task / "medxfer_plans.json").write_text(json.dumps(PLANS))
    bank = ModelBank.open(root / "bank", create=True)
    for seed, (arch, kw, out) in enumerate([("unet", UNET, 3), ("unet", UNET, 2), ("unetr", UNETR, 2)]):
        torch.manual_seed(seed)
        net = build_network(arch, 1, out, [32, 32, 16], **kw)
        bank.add(f"{arch}_{seed}", net, arch=arch, arch_kwargs=kw, in_channels=1, out_channels=out,
                 patch_size=[32, 32, 16], source=[f"Task0{seed}_X"], epoch=1)
    return {"root": root, "task": task, "bank": root / "bank"}


def test_every_estimator_scores_every_bank_model_in_one_pass(setup):
    rows = score_bank(setup["bank"], setup["task"], PLANS, sampling=SAMPLING, device="cpu", progress=False)
    assert [r["model"] for r in rows] == ["unet_0", "unet_1", "unetr_2"]
    for r in rows:
        assert all(math.isfinite(r[e]) for e in DEFAULT_ESTIMATORS), r
        assert r["errors"] == {} and r["seconds_forward"] > 0 and r["seconds_estimators"] > 0
        assert r["leep"] <= 0 and r["nce"] <= 0 and r["gbc"] <= 0
    csv_path, json_path = write_scores(rows, setup["root"] / "scores", {"estimators": list(DEFAULT_ESTIMATORS)})
    with open(csv_path) as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["unet_0", "unet_1", "unetr_2"]
    payload = json.loads(json_path.read_text())
    assert payload["higher_is_better"] and len(payload["rows"]) == 3


def test_a_failing_estimator_gives_nan_with_its_reason_and_the_others_still_run(setup):
    from medxfer.transferability.features import CaseFeatures

    one = CaseFeatures("c", [np.random.rand(10, 4).astype(np.float32)], np.r_[np.zeros(5, int), np.ones(5, int)],
                       np.zeros(10, bool), source_probs=None)
    out = run_estimators([one], ["leep", "logme", "ccfv"])
    assert math.isnan(out["leep"]["score"]) and "source" in out["leep"]["error"]
    assert math.isfinite(out["logme"]["score"])
    assert math.isnan(out["ccfv"]["score"])  # one case: class consistency is undefined
    with pytest.raises(ValueError, match="unknown estimator"):
        run_estimators([one], ["nope"])


def test_score_and_evaluate_bundle_configs_and_rank_cli_agree(setup, tmp_path, capsys):
    from medxfer.cli import main

    out = tmp_path / "bundle_scores"
    sampling = {"_target_": "medxfer.transferability.features.SamplingConfig", "min_per_class": 16,
                "max_per_class": 64, "variety_samples": 64, "seed": 0, "sw_batch_size": 2}
    run_bundle("transferability", ["score"], bank_root=str(setup["bank"]), data_root=str(setup["task"]),
               output_dir=str(out), device="cpu", sampling=sampling)
    bundle_rows = json.loads((out / "scores.json").read_text())["rows"]
    dice = tmp_path / "dice.csv"
    dice.write_text("model,dice\nunet_0,0.8\nunet_1,0.6\nunetr_2,0.7\n")
    run_bundle("transferability", ["evaluate"], scores_file=str(out / "scores.json"), dice_file=str(dice),
               output_dir=str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "te_evaluation.json").read_text())
    assert set(report["mean"]) == set(DEFAULT_ESTIMATORS) and report["targets"] == ["Task09_Spleen"]
    assert (tmp_path / "eval" / "scores_vs_dice.png").stat().st_size > 1000
    from scipy.stats import weightedtau

    ccfv = [r["ccfv"] for r in bundle_rows]
    assert report["mean"]["ccfv"]["weighted_tau"] == pytest.approx(weightedtau(ccfv, [0.8, 0.6, 0.7])[0])

    cli_out = tmp_path / "cli"
    assert main(["rank", "--bank", str(setup["bank"]), "--data", str(setup["task"]), "--out", str(cli_out),
                 "--dice", str(dice), "--device", "cpu", "--estimators", "ccfv", "logme", "leep"]) == 0
    printed = capsys.readouterr().out
    assert "ccfv" in printed and "w. tau" in printed
    assert (cli_out / "te_evaluation.csv").is_file()
    rank = ["rank", "--bank", str(setup["bank"]), "--data", str(setup["task"]), "--out", str(cli_out),
            "--dice", str(dice), "--device", "cpu", "--estimators", "ccfv", "logme", "leep"]
    assert main(rank) == 0  # the same command again: the finished scores are read back, not scored again
    assert "scored before with these settings" in capsys.readouterr().out
    assert main(["rank", "--bank", str(setup["bank"]), "--data", str(setup["task"]), "--out", str(cli_out)]) == 1
    assert "exists, scored with other settings (estimators)" in capsys.readouterr().err


def test_dice_file_that_does_not_match_the_scored_models_names_both_files(setup, tmp_path):
    from medxfer.data.problems import DatasetError
    from medxfer.transferability.evaluate import table_from_files

    rows = [{"model": "a", "ccfv": 1.0}, {"model": "b", "ccfv": 2.0}]
    write_scores(rows, tmp_path, {"estimators": ["ccfv"], "target": "T"})
    dice = tmp_path / "dice.csv"
    dice.write_text("model,dice\na,0.5\nc,0.7\n")
    with pytest.raises(DatasetError, match="dice.csv: models not in both scores.json"):
        table_from_files(tmp_path / "scores.json", dice)


def test_score_workflow_runs_with_monai_bundle_cli(setup, tmp_path):
    out = tmp_path / "cli_bundle"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/score.yaml",
                           "--bundle_root", ".", "--bank_root", str(setup["bank"]), "--data_root", str(setup["task"]),
                           "--output_dir", str(out), "--device", "cpu", "--estimators", "['ccfv','gbc']",
                           "--max_cases", "2"], cwd=bundle_dir("transferability"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert len(rows) == 3 and all(set(r) >= {"ccfv", "gbc"} and "logme" not in r for r in rows)


@pytest.mark.parametrize("arch,kw,roi,n_down", [("unet", {"channels": [4, 8, 16, 32], "strides": [2, 2, 2]}, [32, 32, 16], 3),
                                                ("unetr", UNETR, [32, 32, 16], None),
                                                ("swinunetr", {"feature_size": 12}, [64, 64, 32], 4)])
def test_robustness_reads_a_spatial_map_of_the_second_to_last_encoder_level(arch, kw, roi, n_down):
    from medxfer.networks.registry import arch_layout
    from medxfer.transferability.robustness import hooked_output, module_robustness

    net = build_network(arch, 1, 2, roi, **kw).eval()
    feats = hooked_output(net, arch_layout(arch, net).penultimate_encoder)(torch.zeros(2, 1, *roi))
    assert feats.dim() == 5 and feats.shape[0] == 2
    if n_down is not None:  # UNet: level 3 of 4 has passed 3 strided convs; Swin: patch 2 then 3 mergings
        assert list(feats.shape[2:]) == [r // 2 ** n_down for r in roi]
    value = module_robustness(net, arch_layout(arch, net).penultimate_encoder, torch.randn(3, 1, *roi),
                              mode="intensity", batch_size=2)
    assert -1.5 <= value <= 1.0


def test_a_single_labelled_target_case_gets_a_defined_score_from_every_estimator(setup):
    rows = score_bank(setup["bank"], setup["task"], PLANS, sampling=SAMPLING, device="cpu", progress=False,
                      max_cases=1, entries=["unet_0"])
    assert all(math.isfinite(rows[0][e]) for e in DEFAULT_ESTIMATORS), {e: rows[0][e] for e in DEFAULT_ESTIMATORS} | rows[0]["errors"]


def test_an_interrupted_scoring_resumes_at_the_next_model_and_a_finished_one_is_read_back(setup, tmp_path, monkeypatch):
    from medxfer.transferability import score as sc

    kw = dict(estimators=["ccfv", "logme", "leep"], sampling=SAMPLING, device="cpu", progress=False,
              entries=["unet_0", "unet_1"])
    reference, done = sc.score_bank_into(tmp_path / "reference", setup["bank"], setup["task"], PLANS, **kw)
    assert not done
    built, real = [], sc.build_network

    def killed_at_the_second_model(arch, *args, **kwargs):
        built.append(arch)
        if len(built) == 2:
            raise KeyboardInterrupt  # stands in for the kill
        return real(arch, *args, **kwargs)

    monkeypatch.setattr(sc, "build_network", killed_at_the_second_model)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        sc.score_bank_into(run, setup["bank"], setup["task"], PLANS, **kw)
    assert [p.name for p in (run / sc.ROWS_DIR).iterdir()] == ["unet_0.json"] and not (run / "scores.json").exists()
    kept = (run / sc.ROWS_DIR / "unet_0.json").stat().st_mtime_ns
    built.clear()
    monkeypatch.setattr(sc, "build_network", lambda arch, *a, **k: built.append(arch) or real(arch, *a, **k))
    rows, done = sc.score_bank_into(run, setup["bank"], setup["task"], PLANS, **kw)  # the same call again
    assert not done and built == ["unet"]  # only unet_1: the model scored before the kill is not scored again
    assert (run / sc.ROWS_DIR / "unet_0.json").stat().st_mtime_ns == kept

    def values(rows):
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rows]

    assert values(rows) == values(reference)  # the rows of an uninterrupted scoring
    built.clear()
    again, done = sc.score_bank_into(run, setup["bank"], setup["task"], PLANS, **kw)
    assert done and built == [] and again == rows
    other = {**kw, "estimators": ["ccfv"], "entries": ["unet_0"]}
    with pytest.raises(FileExistsError, match=r"scored with other settings \(entries, estimators\)"):
        sc.score_bank_into(run, setup["bank"], setup["task"], PLANS, **other)
    replaced, done = sc.score_bank_into(run, setup["bank"], setup["task"], PLANS, **other, overwrite=True)
    assert not done and [r["ccfv"] for r in replaced] == [rows[0]["ccfv"]]
    assert [sorted(r) for r in json.loads((run / "scores.json").read_text())["rows"]] == [sorted(replaced[0])]


def _reference_features(setup, arch="unet", amp_dtype=None):
    from medxfer.networks.registry import arch_layout
    from medxfer.transferability.features import sample_dataset
    from medxfer.transferability.score import task_target

    torch.manual_seed(0)
    kw = UNET if arch == "unet" else UNETR
    net = build_network(arch, 1, 3, [32, 32, 16], **kw).eval()
    cases = task_target(setup["task"], PLANS).cases
    return sample_dataset(net, arch_layout(arch, net).feature_stages(), cases, [32, 32, 16], SAMPLING, progress=False,
                          amp_dtype=amp_dtype)


def _relative_changes(ref: dict, got: dict) -> dict:
    return {k: abs(got[k]["score"] - ref[k]["score"]) / abs(ref[k]["score"]) for k in ref}


@pytest.mark.parametrize("arch", ["unet", "unetr"])
def test_estimators_do_not_change_with_float16_features(setup, arch):
    """Mixed precision (issue 16): features that went through float16 (what a CUDA autocast forward
    pass gives; :func:`medxfer.transferability.score.amp_dtype`) move no estimator by more than 1e-3
    relative, since every estimator computes in float64; bfloat16 would not be safe: 8 mantissa bits
    moved CC-FV and TransRate by up to 2e-3 here."""
    import dataclasses

    from medxfer.transferability.score import ESTIMATORS

    feats = _reference_features(setup, arch)
    reference = run_estimators(feats, list(ESTIMATORS))

    def through(dtype, f):
        probs = torch.from_numpy(f.source_probs).to(dtype).double()  # softmax of reduced-precision logits
        return dataclasses.replace(f, levels=[torch.from_numpy(x).to(dtype).float().numpy() for x in f.levels],
                                   source_probs=(probs / probs.sum(1, keepdim=True)).float().numpy())

    half = run_estimators([through(torch.float16, f) for f in feats], list(ESTIMATORS))
    assert all(math.isfinite(v["score"]) for v in half.values()), half
    changes = _relative_changes(reference, half)
    assert max(changes.values()) < 1e-3, changes
    assert max(changes.values()) > 0  # the features did change
    bf16 = _relative_changes(reference, run_estimators([through(torch.bfloat16, f) for f in feats], list(ESTIMATORS)))
    assert max(bf16.values()) > max(changes.values())


def test_autocast_sampling_runs_in_reduced_precision_and_falls_back_on_overflow(setup):
    """``amp_dtype`` puts the forward passes under ``torch.autocast`` (CPU here, CUDA in use): the
    whole network in float16 stays close to float32 (measured < 2e-3 relative; convolutions round
    at every layer), and a window batch that overflows float16 is run again in full precision."""
    from medxfer.transferability.features import sample_case

    reference = run_estimators(_reference_features(setup), ["ccfv", "logme", "leep"])
    amp = run_estimators(_reference_features(setup, amp_dtype=torch.float16), ["ccfv", "logme", "leep"])
    changes = _relative_changes(reference, amp)
    assert 0 < max(changes.values()) < 1e-2, changes

    class Huge(torch.nn.Module):  # 1e5 overflows float16 (max 65504) under autocast
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 1)
            torch.nn.init.constant_(self.conv.weight, 1e5)

        def forward(self, x):
            return self.conv(x)

    net = Huge().eval()
    image, label = torch.ones(1, 8, 8, 4), np.r_[np.zeros(128, int), np.ones(128, int)].reshape(8, 8, 4)
    full = sample_case(net, ["conv"], image, label, [8, 8, 4], SAMPLING)
    guarded = sample_case(net, ["conv"], image, label, [8, 8, 4], SAMPLING, amp_dtype=torch.float16)
    assert np.isfinite(guarded.levels[0]).all() and np.array_equal(guarded.levels[0], full.levels[0])
