"""A real nnU-Net v2 trained-model folder, made by nnU-Net itself, and a safe reader for its checkpoints.

:func:`train_nnunet_model` runs nnU-Net's own steps, unchanged, on a task folder:

1. ``nnUNetv2_convert_MSD_dataset`` (an MSD ``TaskNN_Name`` folder; an nnU-Net v2
   ``DatasetNNN_Name`` folder is linked into ``nnUNet_raw`` instead);
2. ``nnUNetv2_plan_and_preprocess -c <configuration>`` (fingerprint, plans, preprocessed cases);
3. nnU-Net's plain ``nnUNetTrainer`` on ``torch.device("cpu")`` for ``num_epochs`` epochs of
   ``iterations`` training and ``val_iterations`` validation batches, then (``validate``) nnU-Net's
   final validation of the fold (``fold_K/validation/summary.json``, as ``nnUNetv2_train`` writes).

The trainer runs in a subprocess (``python -m medxfer.planning.nnunet_model``) for three reasons:
nnU-Net up to 2.5 read ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` once at import
(2.8 reads them on use; a subprocess works with both), its data augmentation and validation start
worker processes of their own, and a crash stays out of the caller. We instantiate
``nnUNetTrainer`` directly rather than through ``nnUNetv2_train``: the command looks the trainer up by
name by importing every trainer module, and the variants' modules import ``timm``, which fails here
(``operator torchvision::nms does not exist``: torchvision is a CUDA-only build, SPEC section 11).
``nnUNet_n_proc_DA=0`` makes the augmentation single-process (set for the trainer only: nnU-Net's
planner passes the same variable to ``torch.set_num_threads``, which refuses 0). What nnU-Net writes
is untouched: the folder is the one ``nnUNetv2_train`` would have produced, with shorter training::

    out_dir/nnUNet_results/DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__3d_fullres/
        plans.json  dataset.json  dataset_fingerprint.json
        fold_0/checkpoint_final.pth  checkpoint_best.pth  training_log_*.txt  progress.png  debug.json
        fold_0/validation/summary.json ...            (validate=True)
    out_dir/nnUNet_raw/...  out_dir/nnUNet_preprocessed/...   (keep_preprocessed=True)
    out_dir/medxfer_nnunet_run.json                            (what ran, with timings)

With fewer than 5 training cases nnU-Net's default 5-fold split is impossible (scikit-learn's KFold
refuses), so we write ``splits_final.json`` with nnU-Net's own ``generate_crossval_split`` and as
many folds as cases (nnU-Net reads that file when it exists, as for any custom split).

*Checkpoints* (:func:`load_nnunet_checkpoint`, :func:`read_nnunet_checkpoint`): nnU-Net pickles a
dict whose ``network_weights`` / ``optimizer_state`` are tensors, but whose ``logging`` lists and
``_best_ema`` hold NumPy scalars (``np.float32`` Dice and losses). ``torch.load(weights_only=True)``
therefore refuses the file (measured with nnU-Net 2.8.1, NumPy 2.4, torch 2.13: the only globals
outside torch's own allow-list are ``numpy._core.multiarray.scalar`` and ``numpy.dtype``, and the
rebuilt dtype's class ``numpy.dtypes.Float32DType``). We load with exactly those allowed
(:data:`NNUNET_CHECKPOINT_GLOBALS`, plus the ``numpy.core`` spelling that NumPy 1.x writes and
``Float64DType``: under NumPy 1.x's promotion ``ema_fg_dice`` becomes float64 from the second epoch
on): still no code from the file runs, anything else is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from medxfer.atomic import atomic_directory, atomic_write_text
from medxfer.data.msd import load_task
from medxfer.data.synth.msd import generate_msd_task

__all__ = ["train_nnunet_model", "tiny_nnunet_model", "load_nnunet_checkpoint", "read_nnunet_checkpoint",
           "NnUNetCheckpointError", "NNUNET_CHECKPOINT_GLOBALS", "TRAINER_FOLDER_FILES", "TINY_TASK"]

_BIN = Path(sys.executable).parent

#: Files nnU-Net's trainer writes into ``<trainer>__<plans>__<configuration>/`` (the fold's own below).
TRAINER_FOLDER_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")

#: The generated task of :func:`tiny_nnunet_model`: 5 spleen cases (nnU-Net's 5-fold split works),
#: 32 x 32 x 12 voxels at about 9.6 x 9.6 x 24 mm (nnU-Net plans a 12 x 40 x 40 patch, 4 stages).
TINY_TASK = dict(profile="spleen", num_training=5, num_test=1, shape=(32, 32, 12), spacing=(9.6, 9.6, 24.0), seed=0)


def _numpy_globals() -> list:
    """The NumPy globals an nnU-Net checkpoint needs (see the module doc), each under the name(s) a
    pickle may spell it with: ``numpy._core`` (NumPy 2) and ``numpy.core`` (NumPy 1.x)."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    found = [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)  # NumPy >= 1.25: a dtype instance's class is e.g. Float32DType
    if dtypes is not None:
        found += [dtypes.Float32DType, dtypes.Float64DType]
    return found


#: ``torch.serialization`` safe globals for nnU-Net checkpoints: NumPy scalars and their dtypes, nothing else.
NNUNET_CHECKPOINT_GLOBALS = _numpy_globals()


class NnUNetCheckpointError(ValueError):
    """An nnU-Net checkpoint is missing, unreadable, unsafe or not nnU-Net's. The message names the file."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def load_nnunet_checkpoint(path, map_location="cpu") -> dict:
    """nnU-Net's checkpoint dict, as its trainer saved it, read with ``torch.load(weights_only=True)``
    and only :data:`NNUNET_CHECKPOINT_GLOBALS` allowed: a file holding any other pickled object is
    refused, never executed.

    Raises:
        NnUNetCheckpointError: not found, not a PyTorch checkpoint, other pickled objects, not a dict
            with ``network_weights``.
    """
    path = Path(path)
    if not path.is_file():
        raise NnUNetCheckpointError(path, "nnU-Net checkpoint not found")
    try:
        with torch.serialization.safe_globals(NNUNET_CHECKPOINT_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL\s+([\w.]+)", text) or re.search(r"but got <class '([\w.]+)'>", text)
        if found is None:  # not a pickle torch's restricted unpickler understands at all
            raise NnUNetCheckpointError(path, f"not a readable PyTorch checkpoint (UnpicklingError: {_unpickler_detail(text)})") from None
        raise NnUNetCheckpointError(path, "refused: holds pickled Python objects beyond tensors and NumPy scalars "
                                          f"({found.group(1)}); nothing in it was executed") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise NnUNetCheckpointError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise NnUNetCheckpointError(path, "not an nnU-Net checkpoint: no 'network_weights' dict "
                                          f"(keys: {sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__})")
    return checkpoint


def _unpickler_detail(text: str) -> str:
    """The informative line of torch's weights-only error (its boilerplate lines skipped)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)]
    return lines[0] if lines else "unreadable"


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def read_nnunet_checkpoint(path, map_location="cpu") -> dict:
    """What an importer needs from an nnU-Net checkpoint (read by :func:`load_nnunet_checkpoint`)::

        {"network_weights": state dict (tensors; a DDP "module." prefix removed as nnU-Net does),
         "trainer_name": "nnUNetTrainer", "configuration": "3d_fullres", "fold": 0,
         "plans": {...}, "dataset_json": {...}, "inference_allowed_mirroring_axes": [0, 1, 2] | None,
         "epochs": number of epochs trained}

    ``configuration`` / ``fold`` / ``plans`` / ``dataset_json`` come from the checkpoint's
    ``init_args`` (``None`` when a foreign writer left them out).
    """
    checkpoint = load_nnunet_checkpoint(path, map_location)
    weights = checkpoint["network_weights"]
    bad = next((k for k, v in weights.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise NnUNetCheckpointError(path, f"network_weights entry {bad!r} holds a {type(weights[bad]).__name__}, not a tensor")
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    init = checkpoint.get("init_args") or {}
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return {"network_weights": dict(weights), "trainer_name": checkpoint.get("trainer_name"),
            "configuration": init.get("configuration"), "fold": init.get("fold"), "plans": init.get("plans"),
            "dataset_json": init.get("dataset_json"),
            "inference_allowed_mirroring_axes": list(axes) if axes is not None else None,
            "epochs": checkpoint.get("current_epoch")}


# --- training with nnU-Net --------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict, log: Path, what: str) -> float:
    """Run ``cmd``, append its output to ``log``; one-line RuntimeError naming the log on failure."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n# exit {proc.returncode} after {seconds:.1f} s\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        last = next((line.strip() for line in reversed((proc.stderr or proc.stdout).splitlines()) if line.strip()), "")
        raise RuntimeError(f"{what} failed (exit {proc.returncode}: {last[:200]}); full log: {log}")
    return seconds


def _tool(name: str) -> str:
    exe = _BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install nnunetv2 in this environment")
    return found


def _nnunet_version() -> str:
    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        return "unknown"


def train_nnunet_model(task_root, out_dir, dataset_id: int = 990, configuration: str = "3d_fullres",
                       fold: int | str = 0, num_epochs: int = 1, iterations: int = 2, val_iterations: int = 1,
                       validate: bool = True, verify: bool = True, num_processes: int = 1, seed: int = 0,
                       keep_preprocessed: bool = True, overwrite: bool = False) -> Path:
    """Make an nnU-Net v2 trained-model folder with nnU-Net itself (see the module doc).

    Args:
        task_root: MSD ``TaskNN_Name`` or nnU-Net v2 ``DatasetNNN_Name`` folder (at least 2 training cases).
        out_dir: folder to create; written beside it first and renamed when complete, so a failed
            run leaves nothing (only the log ``<out_dir>.nnunet.log``).
        dataset_id: nnU-Net dataset id (1..999) used inside ``out_dir``.
        configuration: ``3d_fullres`` or ``2d`` (what nnU-Net planned).
        fold: the fold to train (an int below the number of folds, or ``"all"``).
        num_epochs, iterations, val_iterations: nnU-Net's ``num_epochs``,
            ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` (nnU-Net's defaults
            are 1000, 250 and 50; 1 is the fewest it allows).
        validate: run nnU-Net's final validation of the fold (``fold_K/validation``), as
            ``nnUNetv2_train`` does after training (2.5 s on the tiny task).
        verify: ``--verify_dataset_integrity`` while planning.
        num_processes: nnU-Net's worker counts for conversion, fingerprint and preprocessing.
        seed: seeds torch, NumPy and ``random`` in the trainer's process (nnU-Net sets none).
        keep_preprocessed: keep ``nnUNet_raw`` and ``nnUNet_preprocessed`` (the preprocessed cases
            nnU-Net trained on); otherwise only ``nnUNet_results`` remains.
        overwrite: replace an existing ``out_dir`` (only after the new one is complete).

    Returns:
        the trainer folder ``out_dir/nnUNet_results/DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__<configuration>``.

    Raises:
        RuntimeError: an nnU-Net step failed (one line: the step, its last output line, the log).
        FileExistsError: ``out_dir`` exists and not ``overwrite``.
        ValueError: bad arguments or fewer than 2 training cases.
    """
    task = load_task(task_root)
    out_dir = Path(out_dir).resolve()
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}")
    if min(num_epochs, iterations, val_iterations) < 1:
        raise ValueError("num_epochs, iterations and val_iterations must be >= 1 (nnU-Net's fewest)")
    n_cases = len(task.training)
    if n_cases < 2:
        raise ValueError(f"{task.root}: nnU-Net's trainer needs at least 2 training cases (a train and a validation split), found {n_cases}")
    if fold != "all" and not 0 <= int(fold) < min(5, n_cases):
        raise ValueError(f"fold must be 'all' or in 0..{min(5, n_cases) - 1} for {n_cases} training cases, got {fold!r}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: exists; choose another folder or pass overwrite=True")
    log = out_dir.with_name(out_dir.name + ".nnunet.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    timings: dict[str, float] = {}
    with atomic_directory(out_dir, overwrite=overwrite) as work:
        env = dict(os.environ, nnUNet_def_n_proc=str(num_processes))
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[var] = str(work / var)
            (work / var).mkdir()
        if task.layout == "msd":
            timings["convert"] = _run([_tool("nnUNetv2_convert_MSD_dataset"), "-i", str(task.root), "-overwrite_id",
                                       str(dataset_id), "-np", str(num_processes)], env, log, "nnUNetv2_convert_MSD_dataset")
            raw = next((work / "nnUNet_raw").glob(f"Dataset{int(dataset_id):03d}_*"))
        else:  # nnU-Net layout already: link it under the id nnU-Net will look for
            raw = work / "nnUNet_raw" / f"Dataset{int(dataset_id):03d}_{task.root.name.split('_', 1)[-1]}"
            os.symlink(task.root, raw)
        args = ["-d", str(dataset_id), "-c", configuration, "-np", str(num_processes), "-npfp", str(num_processes), "--no_pbar"]
        timings["plan_and_preprocess"] = _run([_tool("nnUNetv2_plan_and_preprocess"), *args,
                                               *(["--verify_dataset_integrity"] if verify else [])],
                                              env, log, "nnUNetv2_plan_and_preprocess")
        job = {"dataset_name": raw.name, "configuration": configuration, "fold": fold, "num_epochs": num_epochs,
               "iterations": iterations, "val_iterations": val_iterations, "validate": validate, "seed": seed}
        # single-process augmentation; only here: the planner calls torch.set_num_threads(nnUNet_n_proc_DA)
        train_env = dict(env, nnUNet_n_proc_DA="0")
        timings["train"] = _run([sys.executable, "-m", "medxfer.planning.nnunet_model", json.dumps(job)], train_env, log,
                                "nnU-Net's nnUNetTrainer")
        trainer_rel = Path("nnUNet_results", raw.name, f"nnUNetTrainer__nnUNetPlans__{configuration}")
        fold_dir = work / trainer_rel / f"fold_{fold}"
        if not (fold_dir / "checkpoint_final.pth").is_file():
            raise RuntimeError(f"nnU-Net's nnUNetTrainer wrote no {fold_dir.name}/checkpoint_final.pth; full log: {log}")
        if not keep_preprocessed:
            shutil.rmtree(work / "nnUNet_raw")
            shutil.rmtree(work / "nnUNet_preprocessed")
        record = {"task": str(task.root), "nnunetv2": _nnunet_version(), "torch": torch.__version__,
                  "trainer_folder": trainer_rel.as_posix(), "job": job, "verify": verify,
                  "seconds": {k: round(v, 2) for k, v in timings.items()}, "log": str(log)}
        atomic_write_text(work / "medxfer_nnunet_run.json", json.dumps(record, indent=2) + "\n")
    return out_dir / trainer_rel


def tiny_nnunet_model(root, seed: int = 0, validate: bool = True) -> Path:
    """The smallest real nnU-Net model, for tests and demos: :data:`TINY_TASK` generated under
    ``root/msd`` and trained by :func:`train_nnunet_model` into ``root/nnunet`` (1 epoch of 2
    iterations; about 20-25 s on 2 CPU cores). Returns the trainer folder; ``root/nnunet`` also
    holds ``nnUNet_preprocessed`` (the cases nnU-Net trained on)."""
    root = Path(root)
    task = generate_msd_task(root / "msd", **dict(TINY_TASK, seed=seed))
    return train_nnunet_model(task, root / "nnunet", seed=seed, validate=validate)


# --- the trainer's process ----------------------------------------------------------------------------------

def _train_here(job: dict) -> None:
    """Body of the subprocess: nnU-Net's ``nnUNetTrainer`` built as ``nnUNetv2_train`` builds it
    (plans with ``continue_training`` False, the preprocessed dataset.json), shortened, run."""
    # nnU-Net's trainer stack: imported only in this process (its paths come from the environment)
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    pre = Path(os.environ["nnUNet_preprocessed"]) / job["dataset_name"]
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    seed = int(job["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    fold = job["fold"] if job["fold"] == "all" else int(job["fold"])
    trainer = nnUNetTrainer(plans=plans, configuration=job["configuration"], fold=fold, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.num_epochs = int(job["num_epochs"])
    trainer.num_iterations_per_epoch = int(job["iterations"])
    trainer.num_val_iterations_per_epoch = int(job["val_iterations"])
    splits = pre / "splits_final.json"
    data_folder = pre / trainer.configuration_manager.data_identifier
    ids = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    if fold != "all" and not splits.exists() and len(ids) < 5:  # KFold(5) needs 5 cases (module doc)
        splits.write_text(json.dumps(generate_crossval_split(ids, seed=12345, n_splits=len(ids)), indent=2))
    trainer.run_training()
    if job["validate"]:
        trainer.perform_actual_validation(False)


if __name__ == "__main__":  # python -m medxfer.planning.nnunet_model '<job JSON>' (see train_nnunet_model)
    _train_here(json.loads(sys.argv[1]))
