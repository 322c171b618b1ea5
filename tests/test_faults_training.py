"""Faults during training (issue 13): a killed run, a longer run, a resume after a better model,
a run too short to validate, a full disk — each ends in the documented safe state.

One tiny spleen task (3 cases of 32x32x12 voxels) with hand-written plans (nnU-Net planning costs
~20 s and is tested elsewhere), a small UNet (non-default ``arch_kwargs``), CPU, no workers.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.handlers import MeanDice

import medxfer.atomic
from bundle_cli import cache_env
from medxfer.atomic import WriteError
from medxfer.data.synth.msd import generate_msd_task
from medxfer.transfer.bank import ModelBank
from medxfer.networks.registry import build_network
from medxfer.workflows.bundle import bundle_dir, run_bundle

BUNDLE = bundle_dir("msd_seg3d")
KW = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}   # not the registry's default UNet
PATCH = [16, 16, 8]
PLANS = {"task": "Task09_Spleen", "channels": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
         "target_spacing": [9.6, 9.6, 24.0], "patch_size": PATCH,
         "normalization": [{"channel": 0, "scheme": "CT", "clip": [-259.0, 147.0], "mean": 54.0, "std": 85.0}]}
FAST = {"num_workers": 0, "device": "cpu", "n_folds": 2, "batch_size": 1, "num_samples": 1}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = generate_msd_task(tmp_path_factory.mktemp("faults_train"), "spleen", num_training=3, shape=(32, 32, 12),
                             spacing=(9.6, 9.6, 24.0), num_test=1, seed=4)
    (root / "medxfer_plans.json").write_text(json.dumps(PLANS, indent=2))
    return root


def train(task, out, max_epochs, val_interval=10, **extra):
    return run_bundle("msd_seg3d", ["train"], data_root=str(task), output_dir=str(out), max_epochs=max_epochs,
                      val_interval=val_interval, arch_kwargs=KW, **FAST, **extra)


class LrPerEpoch:
    """Records the optimizer's lr at the start of every epoch."""

    def __init__(self):
        self.lr = {}

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_STARTED,
                                 lambda e: self.lr.__setitem__(e.state.epoch, e.optimizer.param_groups[0]["lr"]))


def _network(path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return ckpt.get("network", ckpt)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#: A fresh interpreter that imports first, waits for a go-file, then runs the same training (the
#: Python form of the command, :func:`run_bundle`): its import overlaps the killed run.
RESUMER = """
import json, pathlib, sys, time
from monai.bundle import ConfigParser
from medxfer.workflows.bundle import run_bundle
import medxfer.handlers, medxfer.workflows.msd_seg3d
ConfigParser({"x": {"_target_": "monai.transforms.Identity"}}).get_parsed_content("x")  # MONAI's module scan
go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.02)
run_bundle("msd_seg3d", ["train"], **json.loads(sys.argv[2]))
"""


def test_killed_training_resumes_and_ends_with_the_weights_of_an_uninterrupted_run(task, tmp_path):
    killed, whole, go = tmp_path / "killed", tmp_path / "whole", tmp_path / "go"
    settings = {"data_root": str(task), "output_dir": str(killed), "max_epochs": 12, "val_interval": 2, "arch_kwargs": KW,
                **FAST}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.yaml", "--bundle_root", ".",
               *[a for k, v in settings.items() for a in (f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v))]]
    env = cache_env(tmp_path)
    victim = subprocess.Popen(command, cwd=BUNDLE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumer = subprocess.Popen([sys.executable, "-c", RESUMER, str(go), json.dumps(settings)], cwd=BUNDLE, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # a random point mid-run: after the checkpoint of a random epoch K <= 8, then up to 0.1 s (mid-epoch,
    # validation, save). Counting checkpoints, not seconds, keeps >= 4 epochs (>= 0.2 s at the fastest
    # 0.05 s/epoch seen) between the kill and the end on any machine
    kill = {"epoch": random.randint(1, 8), "delay": random.uniform(0.0, 0.1)}

    def saved_epoch():
        epochs = [int(p.stem.split("=")[1]) for p in killed.glob("checkpoint_epoch=*.pt")]
        return max(epochs, default=0)

    def killer():
        deadline = time.time() + 300
        while saved_epoch() < kill["epoch"]:
            if victim.poll() is not None or time.time() > deadline:
                return
            time.sleep(0.005)
        time.sleep(kill["delay"])
        kill["running"] = victim.poll() is None
        victim.send_signal(signal.SIGKILL)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        train(task, whole, 12, val_interval=2)  # the uninterrupted reference, meanwhile, in this process
        thread.join(timeout=300)
        assert kill.get("running"), f"the run was not running {kill['delay']:.2f} s after checkpoint {kill['epoch']}"
        assert victim.wait() == -signal.SIGKILL
        assert not (killed / "model_final.pt").exists()
        for path in killed.glob("*.pt"):  # whatever the kill interrupted, every checkpoint present is complete
            torch.load(path, weights_only=True)
        go.touch()  # the same training again
        log, _ = resumer.communicate(timeout=300)
    finally:
        for proc in (victim, resumer):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert resumer.returncode == 0, log[-3000:]
    assert "resumed from" in log, log[-3000:]

    a, b = torch.load(killed / "model_final.pt", weights_only=True), torch.load(whole / "model_final.pt", weights_only=True)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"]
    assert _same_tensors(a["network"], b["network"]), f"killed {kill['delay']:.2f} s after epoch {kill['epoch']}: weights differ"
    assert _same_tensors(_network(killed / "model.pt"), _network(whole / "model.pt"))
    assert json.loads((killed / "model.json").read_text()) == json.loads((whole / "model.json").read_text())
    assert sorted(p.name for p in killed.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=12.pt"]  # n_saved=1 kept


class Messages(logging.Handler):
    """The messages of one logger (the bundle's logging.conf replaces the root handlers, caplog's too)."""

    def __init__(self, name):
        super().__init__(logging.INFO)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def test_a_longer_max_epochs_continues_the_poly_schedule_over_the_new_total(task, tmp_path):
    out = tmp_path / "run"
    first, second = LrPerEpoch(), LrPerEpoch()
    train(task, out, 2, **{"train#handlers_extra": [first]})
    assert first.lr[2] == pytest.approx(0.01 * (1 - 1 / 2) ** 0.9)
    assert torch.load(out / "model_final.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 0.0
    with Messages("medxfer.resume") as messages:
        workflow = train(task, out, 4, **{"train#handlers_extra": [second]})
    assert sorted(second.lr) == [3, 4]  # epochs 1-2 are not trained again
    expected = {epoch: 0.01 * (1 - (epoch - 1) / 4) ** 0.9 for epoch in (3, 4)}
    assert second.lr[3] > 0 and second.lr == pytest.approx(expected, rel=1e-12)
    lines = [m for m in messages if m.startswith("extending run")]
    assert lines == [f"extending run from 2 to 4 epochs: polynomial schedule over 4 epochs, lr now {expected[3]:.6g}"]
    assert workflow.parser.get_parsed_content("lr_scheduler").total_iters == 4
    assert json.loads((out / "run.json").read_text())["settings"]["max_epochs"] == 4


class AtEpoch:
    """Calls ``fn(epoch)`` at the end of every training epoch (after its validation)."""

    def __init__(self, fn):
        self.fn = fn

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: self.fn(e.state.epoch))


def test_after_a_resume_a_worse_validation_does_not_replace_model_pt(task, tmp_path, monkeypatch):
    out = tmp_path / "run"
    scores = iter([0.5, 0.6, 0.1, 0.9])  # forced val_mean_dice of epochs 1, 2 | resumed: 3 (worse), 4 (better)
    monkeypatch.setattr(MeanDice, "compute", lambda self: next(scores))
    train(task, out, 2, val_interval=1)
    best = _network(out / "model.pt")
    assert json.loads((out / "model.json").read_text())["epoch"] == 2

    after = {}
    snapshot = AtEpoch(lambda epoch: after.__setitem__(epoch, (_network(out / "model.pt"),
                                                               json.loads((out / "model.json").read_text()))))
    workflow = train(task, out, 4, val_interval=1, **{"train#handlers_extra": [snapshot]})
    assert sorted(after) == [3, 4]
    model, info = after[3]  # a worse score right after the resume: model.pt and its record unchanged
    assert _same_tensors(model, best) and (info["weights"], info["epoch"], info["value"]) == ("best", 2, 0.6)
    model, info = after[4]  # a better one still replaces it
    assert not _same_tensors(model, best) and _same_tensors(model, _network(out / "model_final.pt"))
    assert (info["epoch"], info["value"]) == (4, 0.9)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (0.9, 4)


def test_a_run_shorter_than_val_interval_writes_model_pt_for_evaluate_and_inference(task, tmp_path):
    out = tmp_path / "run"
    train(task, out, 1, val_interval=2)
    assert _same_tensors(_network(out / "model.pt"), _network(out / "model_final.pt"))
    info = json.loads((out / "model.json").read_text())
    assert (info["weights"], info["epoch"], info["note"]) == ("final", 1, "model.pt = final weights, no validation ran")
    # the documented commands, with nothing about the network (run.json has it)
    run_bundle("msd_seg3d", ["train", "evaluate"], data_root=str(task), output_dir=str(out), device="cpu")
    assert (out / "eval" / "metrics.csv").read_text().splitlines()[0] == "case,dice_spleen,hd95_spleen"
    run_bundle("msd_seg3d", ["inference"], model_dir=str(out), input_path=str(task), output_dir=str(tmp_path / "pred"),
               device="cpu")
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 1


def test_finetuned_bank_model_with_custom_arch_kwargs_evaluates_and_infers_without_them(task, tmp_path):
    bank = ModelBank.open(tmp_path / "bank", create=True)
    torch.manual_seed(3)
    bank.add("unet_small_Task03_Liver_e1", build_network("unet", 1, 2, PATCH, **KW), arch="unet", arch_kwargs=KW,
             in_channels=1, out_channels=2, patch_size=PATCH, source=["Task03_Liver"], epoch=1)
    out = tmp_path / "ft"
    run_bundle("msd_seg3d", ["train", "finetune"], data_root=str(task), bank_root=str(tmp_path / "bank"),
               bank_entry="unet_small_Task03_Liver_e1", transfer_mode="all_but_head", output_dir=str(out),
               max_epochs=1, val_interval=1, **FAST)
    record = json.loads((out / "run.json").read_text())
    assert (record["arch"], record["arch_kwargs"], record["patch_size"]) == ("unet", KW, PATCH)
    assert record["transfer"]["bank_entry"] == "unet_small_Task03_Liver_e1" and record["transfer"]["mode"] == "all_but_head"
    assert record["transfer"]["entry_sha256"] == bank.get("unet_small_Task03_Liver_e1").sha256

    # documented evaluate / inference commands: data_root + output_dir / model_dir, no --arch_kwargs
    run_bundle("msd_seg3d", ["train", "evaluate"], data_root=str(task), output_dir=str(out), device="cpu")
    assert (out / "eval" / "metrics.json").is_file()
    run_bundle("msd_seg3d", ["inference"], model_dir=str(out), input_path=str(task), output_dir=str(tmp_path / "pred"),
               device="cpu")
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 1

    # an override that contradicts run.json is refused, in one line naming it
    with pytest.raises(ValueError, match=r"run\.json: the run was trained with arch_kwargs=") as err:
        run_bundle("msd_seg3d", ["train", "evaluate"], data_root=str(task), output_dir=str(out), device="cpu",
                   overwrite=True, arch_kwargs={"channels": [4, 8, 16], "strides": [2, 2]})
    assert "\n" not in str(err.value) and str(out / "run.json") in str(err.value)
    with pytest.raises(ValueError, match=r"run\.json: the run was trained with arch='unet'"):
        run_bundle("msd_seg3d", ["inference"], model_dir=str(out), input_path=str(task), device="cpu",
                   output_dir=str(tmp_path / "pred2"), arch="unetr")


def test_disk_full_while_saving_the_final_checkpoint_keeps_the_previous_one(task, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(task, out, 1)
    final = out / "model_final.pt"
    before = final.read_bytes()
    failed = []

    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.startswith(".model_final-"):  # the temporary file beside model_final.pt
            write = handle.write

            def write_half(data):
                write(data[: len(data) // 2])
                failed.append(file)
                raise OSError(errno.ENOSPC, "No space left on device")

            handle.write = write_half
        return handle

    monkeypatch.setattr(medxfer.atomic, "open", full_disk_open, raising=False)
    with pytest.raises(Exception) as err:
        train(task, out, 2)
    assert failed, "the writer was not reached (medxfer.atomic no longer writes with open?)"
    cause = err.value
    while not isinstance(cause, WriteError) and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    assert isinstance(cause, WriteError)
    assert str(cause) == f"{final}: no space left on device (ENOSPC) while writing"
    assert final.read_bytes() == before and torch.load(final, weights_only=True)["trainer"]["iteration"] > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert torch.load(out / "checkpoint_epoch=2.pt", weights_only=True)["trainer"]["iteration"] > 0
