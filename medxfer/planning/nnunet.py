"""nnU-Net v2 dataset planning -> the small, editable plans JSON the medxfer bundles read.

nnU-Net's fingerprint extractor and default ``ExperimentPlanner`` decide target spacing, patch
size and intensity normalisation from the data (Isensee et al., 2021). We run them unchanged, as
subprocesses of nnU-Net's own command-line tools (nnU-Net reads ``nnUNet_raw`` etc. once at import,
so a subprocess is the only way to plan several datasets from one Python process), and keep what a
MONAI pipeline needs::

    {"task": "Task09_Spleen", "configuration": "3d_fullres",
     "target_spacing": [x, y, z] mm, "patch_size": [x, y, z] voxels, "batch_size": 2,
     "normalization": [{"channel": 0, "name": "CT", "scheme": "CT",
                        "clip": [p0.5, p99.5], "mean": m, "std": s}],      # CT: nnU-Net CTNormalization
     ...}                                                                   # MR: {"scheme": "zscore"}

Axis order: nnU-Net works on SimpleITK arrays, i.e. file axes reversed (z, y, x), possibly
transposed again by ``transpose_forward``. We undo both, so ``target_spacing`` and ``patch_size``
are in the file's (i, j, k) voxel order, which is (x, y, z) after ``Orientation("RAS")`` for the
usual axial RAS/LPS-stored scans.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from medxfer.atomic import atomic_write_text
from medxfer.data.msd import SegTask, image_files, load_task
from medxfer.data.problems import DatasetError, read_json

__all__ = ["plan_task", "plans_from_nnunet", "load_plans", "PLANS_VERSION"]

PLANS_VERSION = 1
_BIN = Path(sys.executable).parent


def _run(tool: str, args: list[str], env: dict, log: Path) -> None:
    exe = _BIN / tool
    if not exe.exists():
        exe = shutil.which(tool)
        if exe is None:
            raise RuntimeError(f"{tool} not found: install nnunetv2 in this environment")
    proc = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True)
    with log.open("a") as f:
        f.write(f"$ {tool} {' '.join(args)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{tool} failed (exit {proc.returncode}); last lines:\n  " + "\n  ".join(tail) + f"\nfull log: {log}")


def _link_nnunet_raw(task: SegTask, raw: Path, dataset_id: int) -> Path:
    """nnU-Net raw folder of a 3D task, made of symlinks (no copy of the images)."""
    target = raw / f"Dataset{dataset_id:03d}_{task.name.replace('_', '')}"
    (target / "imagesTr").mkdir(parents=True)
    (target / "labelsTr").mkdir()
    for record in task.training:
        for c, f in enumerate(image_files(record)):
            os.symlink(f, target / "imagesTr" / f"{record['id']}_{c:04d}.nii.gz")
        os.symlink(record["label"], target / "labelsTr" / f"{record['id']}.nii.gz")
    meta = {"channel_names": {str(k): v for k, v in task.channel_names.items()},
            "labels": {v: k for k, v in task.labels.items()},
            "numTraining": len(task.training), "file_ending": ".nii.gz", "name": task.name}
    (target / "dataset.json").write_text(json.dumps(meta, indent=2))
    return target


def _to_file_axes(values, transpose_forward) -> list:
    """nnU-Net (transposed SimpleITK) axis order -> file voxel order (i, j, k)."""
    sitk_order = [None] * len(values)
    for i, axis in enumerate(transpose_forward):
        sitk_order[axis] = values[i]
    return list(reversed(sitk_order))


def plans_from_nnunet(plans: dict, dataset_json: dict, configuration: str = "3d_fullres") -> dict:
    """medxfer plans from nnU-Net's ``nnUNetPlans.json`` and the task's dataset.json (both parsed)."""
    if configuration not in plans["configurations"]:
        raise ValueError(f"nnU-Net planned no {configuration!r} configuration (planned: {sorted(plans['configurations'])})")
    conf = plans["configurations"][configuration]
    transpose = plans.get("transpose_forward", [0, 1, 2])
    channels = dataset_json.get("channel_names") or dataset_json.get("modality")
    intensity = plans["foreground_intensity_properties_per_channel"]
    normalization = []
    for c, scheme in enumerate(conf["normalization_schemes"]):
        entry = {"channel": c, "name": channels[str(c)], "nnunet_scheme": scheme}
        if scheme == "CTNormalization":
            props = intensity[str(c)]
            entry.update(scheme="CT", clip=[props["percentile_00_5"], props["percentile_99_5"]],
                         mean=props["mean"], std=props["std"])
        elif scheme in ("ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization"):
            entry.update(scheme={"ZScoreNormalization": "zscore", "NoNormalization": "none",
                                 "RescaleTo01Normalization": "rescale01"}[scheme],
                         use_mask=bool(conf.get("use_mask_for_norm", [False] * (c + 1))[c]))
        else:
            raise ValueError(f"unsupported nnU-Net normalisation scheme {scheme!r} for channel {c}")
        normalization.append(entry)
    return {
        "plans_version": PLANS_VERSION,
        "configuration": configuration,
        "target_spacing": [float(s) for s in _to_file_axes(conf["spacing"], transpose)],
        "patch_size": [int(p) for p in _to_file_axes(conf["patch_size"], transpose)],
        "batch_size": int(conf["batch_size"]),
        "median_shape": [float(s) for s in _to_file_axes(conf["median_image_size_in_voxels"], transpose)],
        "normalization": normalization,
        "nnunet": {"plans_name": plans["plans_name"], "dataset_name": plans["dataset_name"],
                   "transpose_forward": list(transpose)},
    }


def _write_new(path: Path, text: str, overwrite: bool) -> None:
    """Write ``path`` atomically (:func:`medxfer.atomic.atomic_write_text`: a full disk or a kill
    leaves the previous plans or none, never half a file); without ``overwrite`` only if it does
    not exist yet (so two processes planning the same task at once, e.g. the ranks of a multi-GPU
    run, cannot both win)."""
    try:
        atomic_write_text(path, text, exclusive=not overwrite)
    except FileExistsError:
        raise FileExistsError(f"{path}: plans exist (written meanwhile); pass overwrite=True to replan") from None


def plan_task(task_dir, out=None, configuration: str = "3d_fullres", verify: bool = True,
              num_processes: int = 1, keep_work: bool = False, overwrite: bool = False) -> dict:
    """Plan an MSD or nnU-Net v2 task with nnU-Net and write the medxfer plans JSON.

    Args:
        task_dir: MSD ``TaskNN_Name`` or nnU-Net ``DatasetNNN_Name`` folder.
        out: plans JSON path (default ``<task_dir>/medxfer_plans.json``); an existing file is kept
            unless ``overwrite`` (the user may have edited it).
        configuration: nnU-Net configuration to read (``3d_fullres`` or ``2d``).
        verify: run nnU-Net's ``--verify_dataset_integrity``.
        keep_work: keep nnU-Net's raw/preprocessed work folder (beside ``out``) for inspection.

    Returns:
        the plans dict written to ``out``. nnU-Net's own plans and fingerprint are copied beside it.
    """
    task = load_task(task_dir)
    out = Path(out) if out is not None else task.root / "medxfer_plans.json"
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: plans exist (maybe edited by hand); pass overwrite=True (--overwrite) to replan")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nnunet_work_", dir=out.parent))
    log = out.with_suffix(".nnunet.log")
    log.write_text("")
    try:
        env = dict(os.environ, nnUNet_def_n_proc=str(num_processes))
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[var] = str(work / var)
            Path(env[var]).mkdir()
        dataset_id = 999
        if task.four_d:  # channels must be split into one file each: nnU-Net's converter does it
            _run("nnUNetv2_convert_MSD_dataset", ["-i", str(task.root), "-overwrite_id", str(dataset_id), "-np", str(num_processes)], env, log)
            raw = next((work / "nnUNet_raw").glob(f"Dataset{dataset_id}_*"))
        else:
            raw = _link_nnunet_raw(task, work / "nnUNet_raw", dataset_id)
        args = ["-d", str(dataset_id), "--no_pp", "-npfp", str(num_processes), "-c", configuration, "--no_pbar"]
        _run("nnUNetv2_plan_and_preprocess", args + (["--verify_dataset_integrity"] if verify else []), env, log)
        pre = work / "nnUNet_preprocessed" / raw.name
        nn_plans = json.loads((pre / "nnUNetPlans.json").read_text())
        plans = {"task": task.root.name, "source": str(task.root),
                 "channels": {str(k): v for k, v in task.channel_names.items()},
                 "labels": {str(k): v for k, v in task.labels.items()},
                 **plans_from_nnunet(nn_plans, json.loads((raw / "dataset.json").read_text()), configuration)}
        for name in ("nnUNetPlans.json", "dataset_fingerprint.json"):  # copies for the record, atomic too
            atomic_write_text(out.parent / f"{out.stem}.{name}", (pre / name).read_text())
        _write_new(out, json.dumps(plans, indent=2) + "\n", overwrite)
        return plans
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


def load_plans(path) -> dict:
    """Read a plans JSON written by :func:`plan_task` (possibly edited by hand) and check its keys."""
    path = Path(path)
    plans = read_json(path, "plans file not found; create it with `medxfer plan TASK`")
    for key in ("target_spacing", "patch_size", "normalization"):
        if key not in plans:
            raise DatasetError(path, f"plans lack required key '{key}'")
    if len(plans["target_spacing"]) != len(plans["patch_size"]):
        raise DatasetError(path, "target_spacing and patch_size must have the same length")
    if any(s <= 0 for s in plans["target_spacing"]) or any(int(p) < 1 for p in plans["patch_size"]):
        raise DatasetError(path, "target_spacing must be > 0 mm and patch_size >= 1 voxel")
    for entry in plans["normalization"]:
        if entry.get("scheme") == "CT" and not entry.get("std", 0) > 0:
            raise DatasetError(path, f"channel {entry.get('channel')}: CT normalisation needs std > 0")
    return plans
