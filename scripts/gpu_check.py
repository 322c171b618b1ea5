#!/usr/bin/env python3
"""GPU check of medxfer: prepared here, run on a lent GPU machine; prints one JSON object.

The lent machine is bare (torch, but no MONAI, nibabel, ignite or nnU-Net), has no network and
takes at most 64 MiB of files. So the check comes in three commands:

``prepare`` (here, where PyPI is reachable; ``make gpu-check-prepare``)
    downloads the wheels of the distributions the device image lacks (:data:`WHEELS`, each at the
    version installed here, built here when PyPI has only a source archive) into
    ``.gpu-check/wheels`` and generates the GPU-sized data (:data:`PROFILES` ``"gpu"``) into
    ``.gpu-check/data``, so no device time goes to making data. ``.gpu-check/`` is git-ignored.
``device`` (there; the command to pass to the device tool with ``carry: [".gpu-check"]``)
    installs the wheels offline (``pip install --no-index --no-deps --target``), the project from
    the working tree (``--no-deps``, editable; the tree on ``PYTHONPATH`` where that install fails),
    then runs ``run --device cuda`` under a hard time limit (6 minutes) and prints its JSON last.
``run`` (anywhere; ``make gpu-check`` runs ``run --device cpu --tiny`` here, and a test does too)
    measures, through the project's own code paths (bundle configs run by
    :func:`medxfer.workflows.bundle.run_bundle`, ``torchrun``, the transferability bundle's ``score``):

    - ``msd_seg3d_train_unet`` / ``msd_seg3d_train_swinunetr``: ``train.yaml`` + ``pretrain.yaml``
      (AMP on CUDA, the bundle's default) on a generated liver-like source task, seconds per
      iteration from the bundle's own ``step_times.json``; each run adds its network to a bank;
    - ``msd_seg3d_inference``: ``inference.yaml`` (load, resample, Gaussian sliding window, invert,
      save NIfTI) with the trained UNet, seconds per volume after a warm-up run;
    - ``msd_seg3d_ddp_torchrun``: ``torchrun --standalone --nproc_per_node 1 -m monai.bundle run``
      of ``train.yaml`` + ``multi_gpu_train.yaml`` (NCCL with a GPU, gloo without);
    - ``score_bank``: the transferability bundle's ``score.yaml`` with every estimator
      (:data:`medxfer.transferability.score.DEFAULT_ESTIMATORS`) on that bank, seconds per model and case;
    - ``tatl_train``: one TATL network (``tatl_skin/configs/train.yaml``, ``unet_effb0``);
    - ``seg2d_train``: one ``seg2d_transfer/configs/train.yaml`` network;

    each on ``--device`` first (all sections), then again on the CPU of the same machine with
    fewer iterations and no validation, cheapest first while the time budget lasts
    (``cpu_over_device``: how many times slower the CPU is per unit). Every section's error
    is caught, written into ``errors`` (one line) with the traceback on stderr, and makes the exit
    status 1; a CUDA section that allocated no GPU memory counts as an error (a silent CPU fallback).

Choices where nobody said: plans are written as a user would write them (the tests do the same,
e.g. tests/test_te_score.py) rather than planned by nnU-Net: planning is CPU work outside what is
measured, takes 10-60 s, and reads images with SimpleITK, whose 53 MB wheel does not fit in the
64 MiB that travels. nnU-Net still imports SimpleITK at import time, so on the device, where it
is missing, ``device`` puts a stand-in module there that raises on any use (no measured path uses
it: NIfTI is read with nibabel); the JSON lists it under ``install.stubs``.

    python scripts/gpu_check.py prepare                  # here
    python3 scripts/gpu_check.py device                  # on the lent machine (carry .gpu-check)
    python scripts/gpu_check.py run --device cpu --tiny  # here, end to end in about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Standard library only at the top: ``device`` runs before anything else is installed.

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".gpu-check"

#: Distributions the device image lacks that the measured code imports (found by running ``run``
#: with every other non-image distribution made unimportable), each pinned to the version installed
#: where ``prepare`` runs; these fallbacks (the versions tested here) when it is not installed.
WHEELS = {
    "monai": "1.6.1", "nibabel": "5.4.2", "pytorch-ignite": "0.5.5",
    "fire": "0.7.1", "termcolor": "3.3.0",                      # python -m monai.bundle (torchrun)
    "nnunetv2": "2.8.1", "acvl-utils": "0.2.6", "batchgenerators": "0.25.5",
    "dynamic-network-architectures": "0.4.4",                   # medxfer's nnU-Net networks / plans
    "blosc2": "4.14.1", "numexpr": "2.14.2", "ndindex": "1.10.1",  # imported by acvl-utils
}
#: Modules nnU-Net imports at import time that no measured path uses; too large to carry.
STUBS = {"SimpleITK": "53 MB wheel, over what the device takes (64 MiB in all)"}
#: ``pip download`` platform tags for the device (its README), Python 3.12, CPython.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
CARRY_LIMIT_MIB = 64
DEVICE_LIMIT_S = 360          # the whole measuring run on the device, hard
DATA_VERSION = 1

#: Sizes. ``gpu``: realistic patches for the device (and its CPU, fewer iterations); ``tiny``: the
#: smallest sizes that run every path, for a CPU run here (CI) in about a minute.
PROFILES = {
    "gpu": {
        "msd_shape": [128, 128, 64], "msd_spacing": [4.8, 4.8, 12.0], "source_cases": 6, "source_test": 2,
        "target_cases": 4, "n_folds": 3, "batch_size": 2, "num_samples": 2,
        "patch": {"unet": [96, 96, 64], "swinunetr": [96, 96, 64]}, "arch_kwargs": {"unet": {}, "swinunetr": {}},
        "epochs": {"device": 15, "cpu": 1}, "ddp_epochs": {"device": 6, "cpu": 1},
        "score_cases": {"device": 4, "cpu": 1}, "sampling": {},
        "isic_images": 40, "isic_size": [384, 512], "tatl_working": [384, 512], "tatl_batch": 8, "tatl_folds": 4,
        "tatl_epochs": {"device": 4, "cpu": 1},
        "seg2d_images": 32, "seg2d_size": 224, "seg2d_arch": "resnet50_attention_unet", "seg2d_kwargs": {},
        "seg2d_batch": 8, "seg2d_folds": 4, "seg2d_epochs": {"device": 4, "cpu": 1},
    },
    "tiny": {
        "msd_shape": [32, 32, 12], "msd_spacing": [9.6, 9.6, 24.0], "source_cases": 3, "source_test": 1,
        "target_cases": 3, "n_folds": 3, "batch_size": 1, "num_samples": 1,
        "patch": {"unet": [32, 32, 16], "swinunetr": [64, 32, 32]},  # SwinUNETR: >= 2 bottleneck voxels
        "arch_kwargs": {"unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
                        "swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1]}},
        "epochs": {"device": 1, "cpu": 1}, "ddp_epochs": {"device": 1, "cpu": 1},
        "score_cases": {"device": 2, "cpu": 1},
        "sampling": {"min_per_class": 8, "max_per_class": 32, "variety_samples": 32},
        "isic_images": 8, "isic_size": [48, 64], "tatl_working": [32, 32], "tatl_batch": 4, "tatl_folds": 3,
        "tatl_epochs": {"device": 1, "cpu": 1},
        "seg2d_images": 8, "seg2d_size": 32, "seg2d_arch": "unet2d", "seg2d_kwargs": {"channels": [4, 8, 16]},
        "seg2d_batch": 4, "seg2d_folds": 2, "seg2d_epochs": {"device": 1, "cpu": 1},
    },
}
#: section -> the number that section is about (seconds per unit; lower is faster)
METRICS = {
    "msd_seg3d_train_unet": "s_per_iteration", "msd_seg3d_train_swinunetr": "s_per_iteration",
    "msd_seg3d_inference": "s_per_volume", "msd_seg3d_ddp_torchrun": "s_per_iteration",
    "score_bank": "s_per_model_case", "tatl_train": "s_per_iteration", "seg2d_train": "s_per_iteration",
}
ROLES = ("device", "cpu")


def _val_interval(role: str, epochs: int) -> int:
    """The device role validates once, after the last epoch (the evaluator's CUDA path: sliding window
    under AMP); the CPU role, which only times iterations, never."""
    return epochs if role == "device" else epochs + 1


def _log(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# prepare (here)

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wanted_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist, fallback in WHEELS.items():
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = fallback
    return out


def _wheel_of(folder: Path, dist: str) -> list[Path]:
    return sorted(p for p in folder.glob("*.whl") if _norm(p.name.split("-")[0]) == _norm(dist))


def _pip_tail(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stderr + "\n" + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    lines = errors or [line for line in lines if "WARNING" not in line]
    return lines[-1] if lines else f"exit {proc.returncode}"


def download_wheels(folder: Path, python_version: str = "3.12") -> dict[str, str]:
    """Wheels of :data:`WHEELS` for the device into ``folder`` (kept ones reused, other versions
    removed); returns ``{dist: wheel file name}``. Raises RuntimeError naming what failed."""
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    got, failed = {}, []
    for dist, ver in _wanted_versions().items():
        have = _wheel_of(folder, dist)
        keep = [p for p in have if p.name.split("-")[1] == ver]
        for p in have:
            if p not in keep:
                p.unlink()  # one version of each: two stop the whole install there
        if keep:
            got[dist] = keep[0].name
            continue
        cmd = [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(folder),
               f"{dist}=={ver}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 and "No matching distribution" in proc.stderr + proc.stdout:
            # a source archive only (acvl-utils): build the wheel here; it must be pure Python
            proc = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder), f"{dist}=={ver}"],
                                  capture_output=True, text=True)
            built = _wheel_of(folder, dist)
            if proc.returncode == 0 and built and not built[0].name.endswith("-none-any.whl"):
                built[0].unlink()
                failed.append(f"{dist}=={ver}: only a source archive, and its wheel is not pure Python")
                continue
        if proc.returncode != 0 or not _wheel_of(folder, dist):
            failed.append(f"{dist}=={ver}: {_pip_tail(proc)}")
            continue
        got[dist] = _wheel_of(folder, dist)[0].name
    if failed:
        raise RuntimeError("cannot download the device's wheels (is PyPI reachable from here?): " + "; ".join(failed))
    return got


def _folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def prepare(args) -> int:
    folder = Path(args.dir).absolute()
    wheels_dir = folder / "wheels"
    status = 0
    try:
        wheels = download_wheels(wheels_dir, args.python_version)
        _log(f"{len(wheels)} wheels in {wheels_dir} ({_folder_mib(wheels_dir):.1f} MiB)")
    except RuntimeError as err:
        _log(str(err))
        _log("the CPU run (`make gpu-check`, run --device cpu --tiny) needs no wheels; the device run does")
        wheels, status = None, 2
    if not args.no_data:
        seconds = ensure_data(folder / "data", "gpu")
        _log(f"GPU-sized data in {folder / 'data'} ({_folder_mib(folder / 'data'):.1f} MiB, {seconds:.0f} s)")
    total = _folder_mib(folder)
    manifest = {"wheels": wheels, "python_version": args.python_version, "stubs": sorted(STUBS),
                "mib": round(total, 1), "carry_limit_mib": CARRY_LIMIT_MIB}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if total > CARRY_LIMIT_MIB - 8:
        _log(f"warning: {folder} holds {total:.1f} MiB; with the working tree it must stay under {CARRY_LIMIT_MIB} MiB")
    rel = os.path.relpath(folder, ROOT)
    if rel.startswith(".."):
        _log(f"warning: {folder} is outside the repository; only the repository's folders travel to the device")
    print(json.dumps({"prepared": str(folder), "mib": round(total, 1), "wheels_ok": wheels is not None,
                      "device_command": f"python3 scripts/gpu_check.py device --dir {rel}",
                      "carry": [rel]}, indent=1))
    return status


# --------------------------------------------------------------------------------------------
# device (there)

STUB_SOURCE = '''"""Stand-in written by scripts/gpu_check.py: the real {name} is not installed here ({why}).
Importing works (nnU-Net imports it at import time); any use raises."""


def __getattr__(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    raise AttributeError(f"{name} is not installed on this machine (stand-in from scripts/gpu_check.py): "
                         f"{name}.{{attr}} was used")
'''


def _run_quiet(cmd: list[str], env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)


def install_offline(folder: Path, site: Path, project: bool = True) -> tuple[dict, dict]:
    """Wheels of ``folder/wheels`` into ``site``, the project from the working tree, stand-ins for
    :data:`STUBS`; returns ``(report, environment for the measuring process)``."""
    wheels = sorted((folder / "wheels").glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"no wheels in {folder / 'wheels'}: run `make gpu-check-prepare` where PyPI is reachable, "
                           f"and carry {os.path.relpath(folder, ROOT)}")
    t0 = time.perf_counter()
    proc = _run_quiet([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                       "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)])
    if proc.returncode != 0:
        raise RuntimeError(f"offline install of {len(wheels)} wheels failed: {_pip_tail(proc)}")
    report = {"wheels": [w.name for w in wheels], "site": str(site)}
    env = dict(os.environ)
    paths = [str(site)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    proc = _run_quiet([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                       "-e", str(ROOT)], env=dict(env, PYTHONPATH=os.pathsep.join(paths))) if project else None
    if proc is None:
        report["project"] = "PYTHONPATH (working tree; --no-install-project)"
        paths.insert(0, str(ROOT))
    elif proc.returncode == 0:
        report["project"] = "pip install --no-deps -e (working tree)"
    else:  # e.g. an older setuptools there: the working tree itself, as the editable install would
        report["project"] = f"PYTHONPATH (working tree; editable install failed: {_pip_tail(proc)})"
        paths.insert(0, str(ROOT))
    env.update(PYTHONPATH=os.pathsep.join(paths), PATH=os.pathsep.join([str(site / "bin"), env.get("PATH", "")]),
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    for var in ("MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME"):
        env.setdefault(var, str(site.parent / "gpu-check-cache" / var.lower()))
    report["stubs"] = []
    for name, why in STUBS.items():
        if _run_quiet([sys.executable, "-c", f"import {name}"], env=env).returncode != 0:
            (site / name).mkdir(parents=True, exist_ok=True)
            (site / name / "__init__.py").write_text(STUB_SOURCE.format(name=name, why=why))
            report["stubs"].append(name)
    report["seconds"] = time.perf_counter() - t0
    return report, env


def device(args) -> int:
    folder = Path(args.dir).absolute()
    out_env = os.environ.get("OUT")
    out = Path(out_env) if out_env else folder / "out"
    out.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.gettempdir()) / "gpu-check-site"
    t0 = time.monotonic()
    result: dict = {"check": "gpu_check", "errors": {}}
    try:
        install, env = install_offline(folder, site, project=not args.no_install_project)
    except Exception as err:  # nothing can run without the packages: report and stop
        result["errors"]["install"] = _short(err)
        result["ok"] = False
        print(json.dumps(result))
        return 1
    work = Path(tempfile.gettempdir()) / "gpu-check-run"
    result_file = work / "result.json"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data = work / "data" if args.tiny else folder / "data"  # the prepared GPU-sized data is kept
    cmd = [sys.executable, str(Path(__file__).resolve()), "run", "--device", args.device, "--out", str(work),
           "--data", str(data), "--result", str(result_file), "--budget", str(args.budget)] + (["--tiny"] if args.tiny else [])
    log = out / "gpu_check.log"
    status = 1
    with log.open("w") as f:
        try:
            status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.limit).returncode
        except subprocess.TimeoutExpired:
            status = None
    if result_file.is_file():
        result = json.loads(result_file.read_text())
    else:
        result.setdefault("errors", {})["run"] = f"no result written (exit {status}); see {log}"
    if status is None:
        result.setdefault("errors", {})["timeout"] = f"killed after {args.limit} s (limit of the measuring run)"
    result["install"] = install
    result["device_wall_s"] = time.monotonic() - t0
    result["ok"] = status == 0 and not result.get("errors")
    text = json.dumps(result)
    if log.stat().st_size > 15 * 2**20:  # what comes back from the device: 16 MiB a file
        data_tail = log.read_bytes()[-15 * 2**20:]
        log.write_bytes(data_tail)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    if not result["ok"]:
        tail = log.read_text(errors="replace")[-4000:]
        print(f"--- end of {log} ---\n{tail}\n---", file=sys.stderr, flush=True)
    print(text, flush=True)
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------------------------
# data

def _write_plans(task: Path, spacing, patch) -> None:
    """The plans JSON a user would write (``medxfer plan`` writes the same keys): the generator's
    spacing, one patch (each run overrides it), CT normalisation around soft tissue."""
    from medxfer.data.msd import load_task

    labels = {str(k): v for k, v in load_task(task).labels.items()}
    plans = {"task": task.name, "channels": {"0": "CT"}, "labels": labels, "target_spacing": list(spacing),
             "patch_size": list(patch),
             "normalization": [{"channel": 0, "scheme": "CT", "clip": [-160.0, 240.0], "mean": 100.0, "std": 60.0}]}
    (task / "medxfer_plans.json").write_text(json.dumps(plans, indent=1) + "\n")


def data_paths(root: Path) -> dict[str, Path]:
    return {"source": root / "msd" / "Task03_Liver", "target": root / "msd" / "Task09_Spleen",
            "isic": root / "isic2018", "seg2d": root / "seg2d"}


def ensure_data(root: Path, profile: str) -> float:
    """Generated data of ``profile`` in ``root`` (kept when its stamp matches); returns seconds spent."""
    from medxfer.data.synth.isic import generate_isic
    from medxfer.data.synth.msd import generate_msd_task
    from medxfer.data.synth.shapes2d import generate_seg2d

    p = PROFILES[profile]
    stamp = root / "gpu_check_data.json"
    want = {"version": DATA_VERSION, "profile": profile, "sizes": {k: v for k, v in p.items() if k.startswith(
        ("msd_", "source_", "target_", "isic_", "seg2d_images", "seg2d_size"))}}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return 0.0
    t0 = time.perf_counter()
    if root.exists() and any(root.iterdir()):
        if not stamp.is_file():
            raise FileExistsError(f"{root}: not empty and not data of this script ({stamp.name} missing); "
                                  "name an empty or new folder")
        shutil.rmtree(root)  # this script's data of other sizes
    paths = data_paths(root)
    grid = {"shape": tuple(p["msd_shape"]), "spacing": tuple(p["msd_spacing"])}
    generate_msd_task(root / "msd", "liver", num_training=p["source_cases"], num_test=p["source_test"], seed=0, **grid)
    generate_msd_task(root / "msd", "spleen", num_training=p["target_cases"], num_test=0, seed=0, **grid)
    for key in ("source", "target"):
        _write_plans(paths[key], p["msd_spacing"], p["patch"]["unet"])
    generate_isic(paths["isic"], year=2018, num_images=p["isic_images"], size=tuple(p["isic_size"]), seed=0)
    generate_seg2d(paths["seg2d"], num_images=p["seg2d_images"], size=(p["seg2d_size"],) * 2, num_classes=1, seed=1)
    stamp.write_text(json.dumps(want, indent=1) + "\n")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# run (the measurements)

def _short(err: BaseException) -> str:
    try:
        from medxfer.workflows.errors import root_cause

        err = root_cause(err)
    except Exception:  # medxfer not importable (install step): the error as it is
        pass
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}"[:600]


class Context:
    def __init__(self, profile: str, data: Path, work: Path, budget: float):
        self.profile = profile
        self.data = data
        self.paths = data_paths(data)
        self.work = work
        self.start = time.monotonic()
        self.budget = budget

    @property
    def p(self) -> dict:
        """The profile's sizes, a fresh copy each time (a workflow may keep or change the dicts it is given)."""
        return copy.deepcopy(PROFILES[self.profile])

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _steps(wf_out: Path) -> dict:
    timing = json.loads((wf_out / "step_times.json").read_text())
    return {"s_per_iteration": timing["seconds_per_iteration"], "iterations": timing["iterations"],
            "data_wait_fraction": timing["data_wait_fraction"]}


def _train_msd(ctx: Context, role: str, dev: str, arch: str) -> dict:
    from medxfer.workflows.bundle import run_bundle

    p, out = ctx.p, ctx.work / role / f"train_{arch}"
    epochs = p["epochs"][role]
    wf = run_bundle("msd_seg3d", ["train", "pretrain"], quiet=True, output_dir=str(out),
                    source_roots=[str(ctx.paths["source"])], bank_root=str(ctx.work / role / "bank"), arch=arch,
                    arch_kwargs=p["arch_kwargs"][arch], patch_size=p["patch"][arch], max_epochs=epochs,
                    val_interval=_val_interval(role, epochs), n_folds=p["n_folds"], batch_size=p["batch_size"],
                    num_samples=p["num_samples"],
                    device=dev, seed=0)
    return {**_steps(out), "epochs": epochs, "amp": bool(wf.parser.get_parsed_content("amp")),
            "patch_size": list(wf.parser.get_parsed_content("roi_size")),
            "num_workers": int(wf.parser.get_parsed_content("num_workers"))}


def train_unet(ctx, role, dev):
    return _train_msd(ctx, role, dev, "unet")


def train_swinunetr(ctx, role, dev):
    return _train_msd(ctx, role, dev, "swinunetr")


def inference(ctx: Context, role: str, dev: str) -> dict:
    """``inference.yaml`` with the device run's UNet on the source task's test images: a warm-up
    run, then a timed one (the workflow's parsing left out)."""
    from medxfer.workflows.bundle import run_bundle

    out = ctx.work / role / "inference"
    common = {"model_dir": str(ctx.work / "device" / "train_unet"), "dataset_dir": str(ctx.paths["source"]),
              "device": dev, "quiet": True}
    run_bundle("msd_seg3d", ["inference"], output_dir=str(out / "warmup"), **common)
    wf = run_bundle("msd_seg3d", ["inference"], run=False, output_dir=str(out / "timed"), **common)
    logging.disable(logging.INFO)
    try:
        t0 = time.perf_counter()
        wf.run()
        seconds = time.perf_counter() - t0
    finally:
        logging.disable(logging.NOTSET)
    volumes = len(list((out / "timed").glob("*.nii.gz")))
    if volumes == 0:
        raise RuntimeError(f"inference wrote no prediction into {out / 'timed'}")
    return {"s_per_volume": seconds / volumes, "volumes": volumes, "amp": bool(wf.parser.get_parsed_content("amp")),
            "roi_size": list(wf.parser.get_parsed_content("roi_size"))}


def ddp_torchrun(ctx: Context, role: str, dev: str) -> dict:
    """One-process ``torchrun`` DDP run of ``train.yaml`` + ``multi_gpu_train.yaml`` as the bundle
    README documents; the CPU role hides the GPUs (gloo on the CPU, as without a GPU)."""
    from medxfer.workflows.bundle import bundle_dir

    p, out = ctx.p, ctx.work / role / "ddp"
    epochs = p["ddp_epochs"][role]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "monai.bundle",
           "run", "--config_file", "['configs/train.yaml','configs/multi_gpu_train.yaml']", "--bundle_root", ".",
           "--data_root", str(ctx.paths["target"]), "--output_dir", str(out), "--max_epochs", str(epochs),
           "--val_interval", str(_val_interval(role, epochs)), "--n_folds", str(p["n_folds"]), "--patch_size", json.dumps(p["patch"]["unet"]),
           "--batch_size", str(p["batch_size"]), "--num_samples", str(p["num_samples"]), "--arch", "unet"]
    if p["arch_kwargs"]["unet"]:
        cmd += ["--arch_kwargs", json.dumps(p["arch_kwargs"]["unet"])]
    env = dict(os.environ)
    if not dev.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    timeout = max(30.0, ctx.budget + 60 - ctx.elapsed()) if math.isfinite(ctx.budget) else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=bundle_dir("msd_seg3d"), env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        lines = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        raise RuntimeError(f"torchrun exited {proc.returncode}: {(lines[-1] if lines else proc.stderr[-300:]).strip()}")
    return {**_steps(out), "epochs": epochs, "nproc": 1, "backend": "nccl" if dev.startswith("cuda") else "gloo",
            "wall_s": wall}


def score_bank(ctx: Context, role: str, dev: str) -> dict:
    """The transferability bundle's ``score.yaml``, every estimator, on the device run's bank."""
    from medxfer.transferability.score import DEFAULT_ESTIMATORS
    from medxfer.workflows.bundle import run_bundle

    p, out = ctx.p, ctx.work / role / "scores"
    estimators = list(DEFAULT_ESTIMATORS)
    overrides = {f"sampling#{k}": v for k, v in p["sampling"].items()}
    t0 = time.perf_counter()
    run_bundle("transferability", ["score"], quiet=True, bank_root=str(ctx.work / "device" / "bank"),
               data_root=str(ctx.paths["target"]), output_dir=str(out), device=dev, max_cases=p["score_cases"][role],
               estimators=estimators, **overrides)
    wall = time.perf_counter() - t0
    rows = json.loads((out / "scores.json").read_text())["rows"]
    if not rows:
        raise RuntimeError(f"no model scored ({out / 'scores.json'})")
    failed = [f"{r['model']}/{e}: {msg}" for r in rows for e, msg in (r.get("errors") or {}).items()]
    if failed:
        raise RuntimeError(f"{len(failed)} estimator(s) failed: " + "; ".join(failed)[:500])
    non_finite = sorted({e for r in rows for e in estimators
                         if not (isinstance(r.get(e), (int, float)) and math.isfinite(r[e]))})
    return {"s_per_model_case": wall / (len(rows) * p["score_cases"][role]), "models": len(rows),
            "cases": p["score_cases"][role],
            "estimators": estimators, "non_finite": non_finite,
            "forward_s": sum(float(r.get("seconds_forward", 0.0)) for r in rows),
            "estimators_s": sum(float(r.get("seconds_estimators", 0.0)) for r in rows)}


def _timed_training(bundle: str, configs: list[str], **override) -> tuple[dict, object]:
    """Run a bundle's training with :class:`medxfer.handlers.StepTimer` attached to ``train#trainer``."""
    from medxfer.handlers import StepTimer
    from medxfer.workflows.bundle import run_bundle

    wf = run_bundle(bundle, configs, run=False, quiet=True, **override)
    timer = StepTimer(output_file=None)
    timer.attach(wf.parser.get_parsed_content("train#trainer"))
    logging.disable(logging.INFO)
    try:
        wf.run()
        wf.finalize()
    finally:
        logging.disable(logging.NOTSET)
    s = timer.summary()
    return {"s_per_iteration": s["seconds_per_iteration"], "iterations": s["iterations"],
            "data_wait_fraction": s["data_wait_fraction"], "amp": bool(wf.parser.get_parsed_content("amp"))}, wf


def tatl_train(ctx: Context, role: str, dev: str) -> dict:
    p = ctx.p
    epochs = p["tatl_epochs"][role]
    res, _ = _timed_training("tatl_skin", ["train"], data_root=str(ctx.paths["isic"]),
                             output_dir=str(ctx.work / role / "tatl"), arch="unet_effb0", target="lesion",
                             working_size=p["tatl_working"], batch_size=p["tatl_batch"], max_epochs=epochs,
                             n_folds=p["tatl_folds"], tune_fraction=0.2, device=dev, seed=0, cache_progress=False,
                             val_interval=1 if role == "device" else epochs + 1)  # tuning every epoch: early stopping
    return {**res, "arch": "unet_effb0", "working_size": p["tatl_working"], "epochs": epochs}


def seg2d_train(ctx: Context, role: str, dev: str) -> dict:
    p = ctx.p
    epochs = p["seg2d_epochs"][role]
    res, _ = _timed_training("seg2d_transfer", ["train"], data_root=str(ctx.paths["seg2d"]),
                             output_dir=str(ctx.work / role / "seg2d"), arch=p["seg2d_arch"],
                             arch_kwargs=p["seg2d_kwargs"], image_size=p["seg2d_size"], batch_size=p["seg2d_batch"],
                             max_epochs=epochs, val_interval=_val_interval(role, epochs), n_folds=p["seg2d_folds"],
                             transfer_mode="scratch", device=dev, seed=0)
    return {**res, "arch": p["seg2d_arch"], "image_size": p["seg2d_size"], "epochs": epochs}


SECTIONS = {
    "msd_seg3d_train_unet": train_unet, "msd_seg3d_train_swinunetr": train_swinunetr,
    "msd_seg3d_inference": inference, "msd_seg3d_ddp_torchrun": ddp_torchrun, "score_bank": score_bank,
    "tatl_train": tatl_train, "seg2d_train": seg2d_train,
}
IN_PROCESS_GPU = set(SECTIONS) - {"msd_seg3d_ddp_torchrun"}  # their GPU memory is visible to this process
#: the CPU comparisons, cheapest first (SwinUNETR, 62 M parameters at [96, 96, 64], is the slowest on a
#: CPU): when time runs short the ones left out are the costly ones
CPU_ORDER = ("msd_seg3d_inference", "msd_seg3d_train_unet", "msd_seg3d_ddp_torchrun", "seg2d_train", "tatl_train",
             "score_bank", "msd_seg3d_train_swinunetr")
#: a CPU comparison starts only while this many seconds of the budget remain (the slowest takes about that)
CPU_RESERVE_S = 90.0


def _measure(ctx: Context, name: str, role: str, dev: str) -> dict:
    import torch

    cuda = dev.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = SECTIONS[name](ctx, role, dev)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        res["peak_gpu_mib"] = peak
        if name in IN_PROCESS_GPU and peak == 0:
            raise RuntimeError(f"{name} on {dev} allocated no GPU memory: it ran on the CPU")
    res.setdefault("wall_s", time.perf_counter() - t0)
    value = res[METRICS[name]]
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise RuntimeError(f"{name}: {METRICS[name]} = {value!r}, not a positive number")
    return res


def _env_report(dev: str) -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    for dist in ("monai", "nibabel", "pytorch-ignite", "nnunetv2", "numpy"):
        try:
            from importlib.metadata import version

            env[dist] = version(dist)
        except Exception:
            env[dist] = None
    if dev.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(dev))
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                   bf16=torch.cuda.is_bf16_supported())
    return env


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 sent to 2 while the workflows run (MONAI and ignite log to stdout, and so
    do subprocesses): stdout then carries the JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # and Python's own stdout, whatever file it is
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(args) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    profile = "tiny" if args.tiny else "gpu"
    out = Path(args.out).absolute()
    data = Path(args.data).absolute() if args.data else out / "data"
    report: dict = {"check": "gpu_check", "device": args.device, "profile": profile, "sizes": PROFILES[profile],
                    "results": {name: {role: None for role in ROLES} | {"cpu_over_device": None} for name in SECTIONS},
                    "errors": {}}
    budget = args.budget if args.budget is not None else math.inf
    ctx = Context(profile, data, out / "work", budget)
    with _stdout_to_stderr():
        _run_sections(args, ctx, report, Path(args.result) if args.result else None)
    print(json.dumps(report, indent=1), flush=True)
    return 0 if report["ok"] else 1


def _run_sections(args, ctx: Context, report: dict, result_file: Path | None) -> None:
    def save() -> None:
        if result_file is not None:
            tmp = result_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1) + "\n")
            tmp.replace(result_file)

    try:
        import torch

        report["env"] = _env_report(args.device)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
        if ctx.work.exists():
            shutil.rmtree(ctx.work)
        ctx.work.mkdir(parents=True)
        report["data_s"] = ensure_data(ctx.data, ctx.profile)
    except Exception as err:
        traceback.print_exc()
        report["errors"]["setup"] = _short(err)
        report["ok"] = False
        save()
        return
    save()
    for role in ROLES:  # every section on the device first: the CPU comparisons come last, within the budget
        dev = args.device if role == "device" else "cpu"
        for name in (SECTIONS if role == "device" else CPU_ORDER):
            if role == "cpu" and ctx.elapsed() + CPU_RESERVE_S > ctx.budget:
                report["results"][name]["cpu"] = {"skipped": f"time budget ({ctx.budget:.0f} s) nearly spent"}
                continue
            _log(f"{name} on {dev} ({role}) at {ctx.elapsed():.0f} s")
            try:
                report["results"][name][role] = _measure(ctx, name, role, dev)
            except Exception as err:
                traceback.print_exc()
                report["errors"][f"{name}/{role}"] = _short(err)
            entry, metric = report["results"][name], METRICS[name]
            if all(isinstance(entry[r], dict) and metric in entry[r] for r in ROLES):
                entry["cpu_over_device"] = entry["cpu"][metric] / entry["device"][metric]
            save()
    report["wall_s"] = ctx.elapsed()
    report["ok"] = not report["errors"]
    save()


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="here: download the device's wheels and generate the GPU-sized data")
    prep.add_argument("--dir", default=str(DEFAULT_DIR), help="folder to carry to the device (git-ignored)")
    prep.add_argument("--python-version", default="3.12", help="the device's Python (wheels are chosen for it)")
    prep.add_argument("--no-data", action="store_true", help="wheels only (the device then generates the data)")
    dev = sub.add_parser("device", help="there: install offline, run on CUDA within the time limit, print the JSON")
    dev.add_argument("--dir", default=str(DEFAULT_DIR))
    dev.add_argument("--device", default="cuda")
    dev.add_argument("--budget", type=float, default=DEVICE_LIMIT_S - 30,
                     help=f"seconds the measuring should take: a CPU comparison starts only with {CPU_RESERVE_S:.0f} s left")
    dev.add_argument("--limit", type=float, default=DEVICE_LIMIT_S, help="hard limit of the measuring run (s)")
    dev.add_argument("--tiny", action="store_true", help="the smallest sizes (a dry run of this command on a CPU)")
    dev.add_argument("--no-install-project", action="store_true",
                     help="put the working tree on PYTHONPATH instead of `pip install --no-deps -e .`")
    meas = sub.add_parser("run", help="measure on --device (then on the CPU) and print the JSON")
    meas.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    meas.add_argument("--tiny", action="store_true", help="the smallest sizes (a CPU run in about a minute)")
    meas.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="working folder (emptied)")
    meas.add_argument("--data", default=None, help="generated data folder (default OUT/data; kept if it matches)")
    meas.add_argument("--result", default=None, help="also write the JSON here after every section")
    meas.add_argument("--budget", type=float, default=None,
                      help=f"seconds the measuring should take: a CPU comparison starts only with {CPU_RESERVE_S:.0f} s left")
    args = parser.parse_args(argv)
    return {"prepare": prepare, "device": device, "run": run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
