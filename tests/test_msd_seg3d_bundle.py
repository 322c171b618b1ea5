"""End-to-end runs of every ``bundles/msd_seg3d`` workflow on tiny generated tasks (1-3 epochs).

The first test runs ``python -m monai.bundle run`` exactly as the bundle README documents, which
also plans the task with nnU-Net on first use; later tests reuse those plans through the Python
entry point :func:`medxfer.workflows.bundle.run_bundle` (same ``ConfigWorkflow``, no new interpreter).
"""

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_cli import bundle_cli, cache_env
from medxfer.data.msd import load_task
from medxfer.data.synth.msd import generate_msd_task
from medxfer.networks.registry import arch_layout
from medxfer.transfer.bank import BankError, ModelBank
from medxfer.workflows.bundle import bundle_dir, run_bundle

BUNDLE = bundle_dir("msd_seg3d")
TINY = dict(shape=(32, 32, 12), spacing=(9.6, 9.6, 24.0))
PATCH = [32, 32, 16]
FAST = {"num_workers": 0, "n_folds": 2, "patch_size": PATCH, "device": "cpu", "batch_size": 1, "num_samples": 1}


def _bundle_cli(args: list[str], tmp: Path, extra_env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return bundle_cli(BUNDLE, args, tmp, extra_env, check)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Tiny spleen (target) and liver (source) tasks; a 2-channel prostate task for the skip rule."""
    root = tmp_path_factory.mktemp("msd3d")
    spleen = generate_msd_task(root, "spleen", num_training=4, num_test=1, seed=1, **TINY)
    liver = generate_msd_task(root, "liver", num_training=4, num_test=0, seed=1, **TINY)
    prostate = generate_msd_task(root, "prostate", num_training=2, num_test=0, seed=1, **TINY)
    return {"root": root, "spleen": spleen, "liver": liver, "prostate": prostate}


@pytest.fixture(scope="module")
def trained(tasks, tmp_path_factory):
    """``python -m monai.bundle run --config_file configs/train.yaml`` as documented: 2 epochs."""
    out = tmp_path_factory.mktemp("train") / "run"
    _bundle_cli(["--config_file", "configs/train.yaml", "--bundle_root", ".", "--data_root", str(tasks["spleen"]),
                 "--output_dir", str(out), "--max_epochs", "2", "--val_interval", "1", "--num_workers", "0",
                 "--n_folds", "2", "--patch_size", json.dumps(PATCH), "--device", "cpu"], out.parent)
    # the liver source reuses the spleen plans (same generator grid), written as a user would edit them
    plans = json.loads((tasks["spleen"] / "medxfer_plans.json").read_text())
    liver = load_task(tasks["liver"])
    plans.update(task=liver.root.name, source=str(liver.root), labels={str(k): v for k, v in liver.labels.items()})
    (tasks["liver"] / "medxfer_plans.json").write_text(json.dumps(plans, indent=2))
    return out


def test_train_cli_plans_the_task_and_writes_resumable_checkpoints(trained, tasks):
    for name in ("model.pt", "model_final.pt", "checkpoint_epoch=2.pt", "plans.json", "splits.json", "step_times.json"):
        assert (trained / name).is_file(), name
    plans = json.loads((trained / "plans.json").read_text())
    assert plans["patch_size"] == PATCH and plans["task"] == "Task09_Spleen"
    assert json.loads((tasks["spleen"] / "medxfer_plans.json").read_text())["normalization"][0]["scheme"] == "CT"
    ckpt = torch.load(trained / "checkpoint_epoch=2.pt", weights_only=True)
    assert set(ckpt) >= {"network", "optimizer", "lr_scheduler", "trainer"}
    assert ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"]  # ignite saves the iteration
    timing = json.loads((trained / "step_times.json").read_text())
    assert 0.0 <= timing["data_wait_fraction"] <= 1.0 and timing["seconds_per_iteration"] > 0
    splits = json.loads((trained / "splits.json").read_text())
    assert len(splits) == 2


def test_evaluate_writes_dice_and_hd95_in_the_original_geometry(trained, tasks):
    run_bundle("msd_seg3d", ["train", "evaluate"], data_root=str(tasks["spleen"]), output_dir=str(trained), **FAST)
    rows = (trained / "eval" / "metrics.csv").read_text().strip().splitlines()
    header, cases = rows[0].split(","), [r.split(",") for r in rows[1:]]
    assert header == ["case", "dice_spleen", "hd95_spleen"]
    val_ids = json.loads((trained / "splits.json").read_text())[0]["val"]
    assert sorted(c[0] for c in cases) == sorted(val_ids)
    for case in cases:
        pred = nib.load(trained / "eval" / f"{case[0]}_seg.nii.gz")
        label = nib.load(tasks["spleen"] / "labelsTr" / f"{case[0]}.nii.gz")
        assert pred.shape == label.shape and np.allclose(pred.affine, label.affine, atol=1e-4)
        p, g = np.asanyarray(pred.dataobj) == 1, np.asanyarray(label.dataobj) == 1
        denom = 2 * (p & g).sum() + (p & ~g).sum() + (~p & g).sum()
        expected = float("nan") if denom == 0 else 2 * (p & g).sum() / denom
        assert float(case[1]) == pytest.approx(expected, abs=1e-6, nan_ok=True)
    summary = json.loads((trained / "eval" / "metrics.json").read_text())["summary"]
    assert summary["dice_spleen"]["n"] + sum(math.isnan(float(c[1])) for c in cases) == len(cases)
    with pytest.raises(FileExistsError, match="already holds"):
        run_bundle("msd_seg3d", ["train", "evaluate"], data_root=str(tasks["spleen"]), output_dir=str(trained), **FAST)


def test_inference_saves_label_maps_with_the_input_affine_and_never_overwrites(trained, tasks, tmp_path):
    out = tmp_path / "pred"
    common = dict(model_dir=str(trained), input_path=str(tasks["spleen"]), output_dir=str(out), num_workers=0, device="cpu")
    run_bundle("msd_seg3d", ["inference"], **common)
    images = load_task(tasks["spleen"]).test
    assert len(images) == 1
    src = nib.load(images[0]["image"])
    pred = nib.load(out / (Path(images[0]["image"]).name.replace(".nii.gz", "_seg.nii.gz")))
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1}
    before = (out / pred.get_filename().split("/")[-1]).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        run_bundle("msd_seg3d", ["inference"], **common)
    assert (out / pred.get_filename().split("/")[-1]).read_bytes() == before


KILLER = textwrap.dedent("""
    import os, signal
    from ignite.engine import Events

    class KillAt:
        '''SIGKILL the process (no cleanup, like an OOM kill) at one iteration of one epoch.'''
        def __init__(self, epoch, iteration_in_epoch):
            self.epoch, self.iteration = epoch, iteration_in_epoch
        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        def __call__(self, engine):
            per_epoch = engine.state.epoch_length
            if engine.state.epoch == self.epoch and (engine.state.iteration - 1) % per_epoch + 1 == self.iteration:
                os.kill(os.getpid(), signal.SIGKILL)
""")


def test_training_killed_mid_epoch_resumes_from_the_last_epoch_checkpoint(trained, tasks, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "killer.py").write_text(KILLER)
    args = ["--config_file", "configs/train.yaml", "--bundle_root", ".", "--data_root", str(tasks["spleen"]),
            "--output_dir", str(out), "--max_epochs", "3", "--val_interval", "3", "--num_workers", "0",
            "--n_folds", "2", "--patch_size", json.dumps(PATCH), "--device", "cpu", "--batch_size", "1",
            "--num_samples", "1"]
    killed = _bundle_cli(args + ["--train#handlers_extra", "[{'_target_': 'killer.KillAt', 'epoch': 2, 'iteration_in_epoch': 1}]"],
                         tmp_path, {"PYTHONPATH": str(tmp_path)}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
    resumed = _bundle_cli(args, tmp_path)
    log = resumed.stdout + resumed.stderr
    assert "resumed from" in log and "checkpoint_epoch=1.pt" in log
    final = torch.load(out / "checkpoint_epoch=3.pt", weights_only=True)
    n_train = len(json.loads((out / "splits.json").read_text())[0]["train"])
    assert final["trainer"]["epoch_length"] == n_train and final["trainer"]["iteration"] == 3 * n_train  # batch 1
    assert "Epoch: 1/3" not in log  # epoch 1 was not trained again


@pytest.fixture(scope="module")
def bank(trained, tasks, tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    run_bundle("msd_seg3d", ["train", "pretrain"], source_roots=[str(tasks["liver"])], bank_root=str(root / "bank"),
               output_dir=str(root / "pretrain"), max_epochs=2, val_interval=2, bank_epochs=[1], **FAST)
    return root / "bank"


def test_pretrain_adds_intermediate_and_final_checkpoints_with_their_sha256(bank, tasks):
    b = ModelBank.open(bank)
    assert b.names() == ["unet_Task03_Liver_e1", "unet_Task03_Liver_e2"]
    entry = b.get("unet_Task03_Liver_e2")
    assert entry.source == ["Task03_Liver"] and entry.out_channels == 3 and entry.epoch == 2
    assert entry.patch_size == PATCH and entry.preprocessing["normalization"] == ["CT"]
    # what it expects (the target's plans) and what it was trained on, with the numbers; made by medxfer
    plans = json.loads((tasks["liver"] / "medxfer_plans.json").read_text())
    assert entry.preprocessing["kind"] == "target_plans" and entry.preprocessing["orientation"] == "RAS"
    assert entry.preprocessing["normalization_numbers"] == plans["normalization"]
    assert entry.provenance["kind"] == "medxfer"
    import hashlib

    assert hashlib.sha256((bank / entry.checkpoint).read_bytes()).hexdigest() == entry.sha256


@pytest.mark.parametrize("mode", ["all_but_head", "frozen_encoder", "full", "truncated:2", "scratch"])
def test_finetune_runs_every_transfer_mode_and_reports_every_key(bank, tasks, tmp_path, mode):
    if mode == "full":  # full = every tensor; 3 source classes vs 2 target classes: the head cannot load
        from medxfer.transfer.weights import PartialTransferError

        with pytest.raises(PartialTransferError, match=r"transfer full loaded 59 of 63 required tensors.*"
                                                       r"model\.2\.0\.conv\.weight \(32,3,3,3,3\) vs \(32,2,3,3,3\)"):
            run_bundle("msd_seg3d", ["train", "finetune"], data_root=str(tasks["spleen"]), bank_root=str(bank),
                       bank_entry="unet_Task03_Liver_e2", transfer_mode=mode, output_dir=str(tmp_path / "refused"),
                       max_epochs=1, val_interval=1, **FAST)
    wf = run_bundle("msd_seg3d", ["train", "finetune"], data_root=str(tasks["spleen"]), bank_root=str(bank),
                    bank_entry="unet_Task03_Liver_e2", transfer_mode=mode, output_dir=str(tmp_path / "ft"),
                    max_epochs=1, val_interval=1, allow_partial=mode == "full", **FAST)  # full: accepted explicitly
    report = json.loads((tmp_path / "ft" / "transfer_report.json").read_text())
    source = ModelBank.open(bank).load_state_dict("unet_Task03_Liver_e2")
    net = wf.parser.get_parsed_content("network")
    layout = arch_layout("unet", net)
    final = torch.load(tmp_path / "ft" / "model_final.pt", weights_only=True)["network"]  # + optimizer, trainer
    assert set(report["loaded"]) | set(report["initialised"]) == set(final)
    head = {k for k in source if layout.in_head(k)}
    if mode == "scratch":
        assert report["loaded"] == []
    elif mode == "truncated:2":
        assert set(report["loaded"]) == {k for k in source if (layout.encoder_level(k) or 99) <= 2}
    elif mode == "full":  # 3 source classes vs 2 target classes: the head cannot be loaded
        assert set(report["shape_mismatch"]) == {k for k in head if source[k].dim() > 1 or source[k].shape[0] == 3}
    else:
        assert set(report["loaded"]) == set(source) - head and set(report["skipped_by_mode"]) == head
    if mode == "frozen_encoder":  # trained for one epoch, the encoder is still the pretrained one
        encoder = [k for k in source if layout.encoder_level(k) is not None]
        assert encoder and all(torch.equal(final[k], source[k]) for k in encoder)
        assert any(not torch.equal(final[k], source[k]) for k in source if layout.encoder_level(k) is None and k not in head)


def test_finetune_from_a_tampered_bank_entry_fails_naming_the_file(bank, tasks, tmp_path):
    copy = tmp_path / "bank"
    shutil.copytree(bank, copy)
    ckpt = copy / ModelBank.open(copy).get("unet_Task03_Liver_e1").checkpoint
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(BankError, match="sha256 mismatch") as err:
        run_bundle("msd_seg3d", ["train", "finetune"], data_root=str(tasks["spleen"]), bank_root=str(copy),
                   bank_entry="unet_Task03_Liver_e1", output_dir=str(tmp_path / "ft"), max_epochs=1, **FAST)
    assert str(ckpt) in str(err.value)


def test_multi_gpu_train_runs_ddp_with_two_processes_on_cpu(trained, tasks, tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run"]
    proc = subprocess.run(torchrun + ["--config_file", "['configs/train.yaml','configs/multi_gpu_train.yaml']", "--bundle_root", ".",
                                      "--data_root", str(tasks["spleen"]), "--output_dir", str(out), "--max_epochs", "1",
                                      "--val_interval", "1", "--num_workers", "0", "--n_folds", "2",
                                      "--patch_size", json.dumps(PATCH), "--batch_size", "1", "--num_samples", "1"],
                          cwd=BUNDLE, env=cache_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / "model_final.pt", weights_only=True)["network"]
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped: loads into a plain network
    ckpt = torch.load(out / "checkpoint_epoch=1.pt", weights_only=True)
    n_train = len(json.loads((out / "splits.json").read_text())[0]["train"])
    assert ckpt["trainer"]["iteration"] == math.ceil(n_train / 2)  # DistributedSampler: each rank half the cases


def test_bank_build_cli_leaves_the_target_out_and_adds_scratch_baselines(trained, tasks, tmp_path, capsys):
    from medxfer.cli import main

    out = tmp_path / "ccfv"
    assert main(["bank", "build", "--data", str(tasks["root"]), "--target", "Task09_Spleen", "--out", str(out),
                 "--archs", "unet", "--epochs", "1", "--patch", *map(str, PATCH), "--device", "cpu"]) == 0
    b = ModelBank.open(out)
    assert b.names() == ["unet_Task03_Liver_e1", "unet_scratch"]
    assert all("Task09_Spleen" not in e.source for e in b)
    assert b.get("unet_scratch").source == [] and b.get("unet_scratch").out_channels == 2
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["skipped_sources"] == [{"task": "Task05_Prostate", "reason": "2 channel(s), target has 1"}]
    assert main(["bank", "list", str(out)]) == 0
    digests = {e.name: e.sha256 for e in ModelBank.open(out)}
    capsys.readouterr()
    # the same command again: finished pretraining is kept, not redone (tests/test_faults_resume.py: after a kill)
    assert main(["bank", "build", "--data", str(tasks["root"]), "--target", "Task09_Spleen", "--out", str(out),
                 "--archs", "unet", "--epochs", "1", "--patch", *map(str, PATCH), "--device", "cpu"]) == 0
    assert "unet_Task03_Liver_e1  (already done, kept)" in capsys.readouterr().out
    assert main(["bank", "build", "--data", str(tasks["root"]), "--target", "Task09_Spleen", "--out", str(out),
                 "--archs", "unet", "--epochs", "2", "--patch", *map(str, PATCH), "--device", "cpu"]) == 1
    assert "built with other settings" in capsys.readouterr().err  # another bank: refused unless --overwrite
    assert {e.name: e.sha256 for e in ModelBank.open(out)} == digests
