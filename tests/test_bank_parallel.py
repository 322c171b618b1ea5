"""Parallel pretraining of a bank build (issue 16, item 4): ``medxfer bank build --workers N``.

Two generated tasks: Task03_Liver (the source) and Task06_Lung (the target); two tiny archs, so the
build has two pretraining jobs, both on the liver task, which the two workers train at the same
time. The bank built with ``--workers 2`` must equal the one built in this process with one torch
thread (the workers run with one thread each; the thread count changes the last bits of CPU
convolutions): the same entries in the same order, the same checkpoint bytes (sha256, read from the
files, not the manifest), the same metadata, markers and summary (timings aside), each entry listed
once in ``bank.yaml``; a second run finds everything done. A job failing in its worker (a resumed
build redoing a half-done run on a broken image) stops the build with one line naming the job and
leaves no entry for it; the finished run's entry is kept. Cost: each worker process imports torch
and MONAI (~13 s of CPU here), which dominates the ~1 s runs.
"""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from medxfer.cli import main
from medxfer.data.msd import load_task
from medxfer.data.synth.msd import generate_msd_task
from medxfer.handlers.bank_saver import read_pretraining_marker, write_pretraining_marker
from medxfer.transfer.bank import ModelBank, sha256_file
from medxfer.workflows import bank_build
from medxfer.workflows.bank_build import pretrain_bank

TINY = dict(shape=(32, 32, 12), spacing=(9.6, 9.6, 24.0), num_test=0, seed=4)
ARCHS = {"unet": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
         "segresnet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}}
JOBS = ["unet_Task03_Liver", "segresnet_Task03_Liver"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The two tasks; the liver plans written by hand as nnU-Net writes them (planning costs ~30 s)."""
    root = tmp_path_factory.mktemp("parallel") / "msd"
    liver = generate_msd_task(root, "liver", num_training=3, **TINY)
    generate_msd_task(root, "lung", num_training=3, **TINY)
    task = load_task(liver)
    plans = {"task": task.root.name, "source": str(task.root), "channels": {"0": "CT"},
             "labels": {str(k): v for k, v in task.labels.items()}, "plans_version": 1, "configuration": "3d_fullres",
             "target_spacing": [9.6, 9.6, 24.0], "patch_size": [32, 32, 16], "batch_size": 2,
             "median_shape": [32.0, 32.0, 12.0],
             "normalization": [{"channel": 0, "name": "CT", "nnunet_scheme": "CTNormalization", "scheme": "CT",
                                "clip": [-240.0, 130.0], "mean": 55.0, "std": 70.0}]}
    (liver / "medxfer_plans.json").write_text(json.dumps(plans, indent=2))
    config = root.parent / "bank.yaml"
    config.write_text(yaml.safe_dump({"archs": ARCHS, "patch_size": [32, 32, 16], "epochs": 1, "bank_epochs": [],
                                      "optimizer": "adamw", "learning_rate": 0.003, "n_folds": 3}, sort_keys=False))
    return {"root": root, "liver": liver, "config": config}


def _cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _build(data, out: Path, *extra) -> str:
    code, printed, err = _cli(["bank", "build", "--data", str(data["root"]), "--target", "Task06_Lung", "--out", str(out),
                               "--config", str(data["config"]), "--device", "cpu", *extra])
    assert code == 0, err[-3000:]
    return printed


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k not in ("seconds", "bank", "data_dir")}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def serial(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "bank"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build(data, out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def parallel(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_bank") / "bank"
    return {"out": out, "printed": _build(data, out, "--workers", "2")}


def test_two_workers_build_the_bank_of_one_process(data, serial, parallel):
    out = parallel["out"]
    ref, par = ModelBank.open(serial), ModelBank.open(out)
    expected = ["unet_Task03_Liver_e1", "segresnet_Task03_Liver_e1", "unet_scratch", "segresnet_scratch"]
    assert ref.names() == expected and par.names() == expected  # the serial (job) order
    # the bytes of every checkpoint file, hashed here, equal (and equal the manifests' sha256)
    ref_files = {n: sha256_file(ref.verify(n)) for n in expected}
    par_files = {n: sha256_file(par.verify(n)) for n in expected}
    assert par_files == ref_files and {e.name: e.sha256 for e in par} == ref_files
    for name in expected:
        a, b = ref.get(name).to_dict(), par.get(name).to_dict()
        a.pop("provenance"), b.pop("provenance")  # the import date
        assert a == b, name
    # each entry exactly once in the manifest as written on disk
    listed = [e["name"] for e in yaml.safe_load((out / "bank.yaml").read_text())["entries"]]
    assert sorted(listed) == sorted(expected) and len(listed) == len(set(listed))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(f"{n}.pt" for n in expected)
    # markers, run folders and summary as a serial build writes them; no staging bank left behind
    for job in JOBS:
        assert _without_seconds(read_pretraining_marker(out, job)) == _without_seconds(read_pretraining_marker(serial, job))
        run, ref_run = out / "runs" / job, serial / "runs" / job
        assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref_run.iterdir())
        assert not (run / bank_build.STAGED_BANK).exists()
        split = "splits_Task03_Liver.json"
        assert (run / split).read_text() == (ref_run / split).read_text()
    summary, ref_summary = (json.loads((p / "build_summary.json").read_text()) for p in (out, serial))
    assert _without_seconds(summary) == _without_seconds(ref_summary)
    assert "unet_Task03_Liver_e1" in parallel["printed"] and "(already done" not in parallel["printed"]

    # run again with workers: everything is done, nothing is rewritten (no pool is started)
    mtimes = {p: p.stat().st_mtime_ns for p in [*(out / "checkpoints").iterdir(), *(out / "pretraining").iterdir()]}
    printed = _build(data, out, "--workers", "2")
    assert "resumed: 2 of 2 pretraining run(s) were already done" in printed
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_job_failing_in_its_worker_is_named_in_one_line_and_leaves_no_entry(data, parallel, tmp_path):
    """The parallel bank copied, the segresnet run made half-done (marker ``running``) and one liver
    image truncated (the data digest stays: it covers dataset.json and the plans): the rerun keeps the
    unet run and redoes segresnet in a worker, whose check of the cases fails."""
    root, out = tmp_path / "msd", tmp_path / "bank"
    shutil.copytree(data["root"], root)
    shutil.copytree(parallel["out"], out)
    (out / "build_summary.json").unlink()
    marker = read_pretraining_marker(out, "segresnet_Task03_Liver")
    write_pretraining_marker(out, "segresnet_Task03_Liver", marker["for"], "running")
    image = sorted((root / "Task03_Liver" / "imagesTr").glob("liver_*.nii.gz"))[0]
    image.write_bytes(image.read_bytes()[:200])
    unet_bytes = sha256_file(out / "checkpoints" / "unet_Task03_Liver_e1.pt")
    code, printed, err = _cli(["bank", "build", "--data", str(root), "--target", "Task06_Lung", "--out", str(out),
                               "--config", str(data["config"]), "--device", "cpu", "--workers", "2"])
    message = err.strip().splitlines()[-1]
    assert code == 1 and message.startswith("error: "), err[-2000:]
    assert "pretraining segresnet_Task03_Liver (segresnet on Task03_Liver) failed: " in message, message
    assert image.name in message and "unet_Task03_Liver" not in message, message
    bank = ModelBank.open(out)
    assert bank.names() == ["unet_Task03_Liver_e1", "unet_scratch", "segresnet_scratch"]  # no segresnet_Task03_Liver_e1
    assert sha256_file(bank.verify("unet_Task03_Liver_e1")) == unet_bytes  # kept
    assert read_pretraining_marker(out, "segresnet_Task03_Liver")["state"] == "running"  # redone by the next build
    assert read_pretraining_marker(out, "unet_Task03_Liver")["state"] == "done"
    assert not (out / "checkpoints" / "segresnet_Task03_Liver_e1.pt").exists()
    assert not (out / "build_summary.json").exists()


def test_workers_get_one_gpu_each_round_robin_when_several_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert bank_build._worker_devices(None, 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert bank_build._worker_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert bank_build._worker_devices("cpu", 2) == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert bank_build._worker_devices("cuda", 2) == ["cuda", "cuda"]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        pretrain_bank(".", [], Path("unused"), {"archs": {}}, (1, 2), workers=0)
