"""Build the CC-FV experiment bank for one target task (leave-one-task-out; SPEC section 4).

For a target task ``T`` in a folder of MSD tasks, and every architecture ``a`` of the bank
definition (``configs/bank_ccfv.yaml``): pretrain ``a`` on each other task ``S != T`` with the
``msd_seg3d`` bundle's ``pretrain`` workflow (entries ``<a>_<S>_e<epoch>``), and add one untrained,
seeded ``<a>_scratch`` entry as the baseline. Source tasks whose channel count differs from the
target's are skipped (and listed) unless ``same_channels_only`` is false.

Writes the bank (``bank.yaml`` + ``checkpoints/``) and ``build_summary.json`` (entries, skipped
tasks, seconds per entry) into ``out``; pretraining runs go to ``out/runs/<a>_<S>``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
import yaml

from medxfer.data.msd import load_task
from medxfer.data.problems import DatasetError
from medxfer.networks.registry import build_network
from medxfer.resources import config_path
from medxfer.transfer.bank import ModelBank
from medxfer.workflows.bundle import run_bundle

__all__ = ["DEFAULT_BANK_CONFIG", "load_bank_config", "source_tasks", "build_ccfv_bank", "pretrain_bank", "ccfv_entries"]

#: configs/ of the checkout, or the copy shipped in the wheel
DEFAULT_BANK_CONFIG = config_path("bank_ccfv.yaml")
logger = logging.getLogger("medxfer.bank")


def load_bank_config(path=None, **override) -> dict:
    """The bank definition YAML (default :data:`DEFAULT_BANK_CONFIG`) with non-``None`` overrides."""
    path = Path(path) if path else DEFAULT_BANK_CONFIG
    if not path.is_file():
        raise DatasetError(path, "bank definition not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DatasetError(path, f"invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(config.get("archs"), dict) or not config["archs"]:
        raise DatasetError(path, "needs 'archs': a mapping of arch name -> MONAI keyword arguments")
    config.update({k: v for k, v in override.items() if v is not None})
    return config


def source_tasks(data_dir, target: str) -> list[Path]:
    """MSD / nnU-Net task folders in ``data_dir`` other than ``target`` (folder name or path), sorted."""
    data_dir = Path(data_dir)
    tasks = sorted(p for p in data_dir.iterdir() if p.is_dir() and (p / "dataset.json").is_file())
    names = [p.name for p in tasks]
    target_name = Path(str(target)).name
    if target_name not in names:
        raise DatasetError(data_dir / target_name, f"target task not found in {data_dir} (tasks there: {names})")
    return [p for p in tasks if p.name != target_name]


def build_ccfv_bank(data_dir, target: str, out, config: dict | None = None, device: str | None = None,
                    num_workers: int = 0, seed: int = 0, progress: bool = True,
                    source_names: Sequence[str] | None = None, quiet: bool = False) -> dict:
    """Pretrain the leave-one-task-out bank for ``target``; returns the build summary (also saved).

    Args:
        data_dir: folder holding the MSD task folders (``TaskNN_Name``).
        target: the target task's folder name (never used for pretraining).
        out: bank folder (created; an existing bank with the same entry names is an error).
        config: the bank definition (:func:`load_bank_config`).
        device: ``"cpu"``, ``"cuda"``; ``None`` = the bundle default (cuda when available).
        source_names: source task folder names to use (default: every other task in ``data_dir``).
    """
    config = config or load_bank_config()
    target_task = load_task(Path(data_dir) / Path(str(target)).name)
    sources, skipped = [], []
    candidates = source_tasks(data_dir, target)
    if source_names is not None:
        unknown = sorted(set(source_names) - {p.name for p in candidates})
        if unknown:
            raise DatasetError(data_dir, f"source task(s) {unknown} not found (or equal to the target)")
        candidates = [p for p in candidates if p.name in set(source_names)]
    for path in candidates:
        task = load_task(path)
        if config.get("same_channels_only", True) and task.num_channels != target_task.num_channels:
            skipped.append({"task": path.name, "reason": f"{task.num_channels} channel(s), target has {target_task.num_channels}"})
        else:
            sources.append(path)
    if not sources:
        raise DatasetError(data_dir, f"no source task usable for target {target_task.root.name} (skipped: {skipped})")
    return pretrain_bank(data_dir, sources, out, config, (target_task.num_channels, len(target_task.labels)),
                         device=device, num_workers=num_workers, seed=seed, progress=progress, quiet=quiet,
                         description=f"CC-FV leave-one-task-out bank for target {target_task.root.name}",
                         summary_extra={"target": target_task.root.name, "skipped_sources": skipped})


def pretrain_bank(data_dir, sources: Sequence[Path], out, config: dict, scratch_channels: tuple[int, int],
                  device: str | None = None, num_workers: int = 0, seed: int = 0, progress: bool = True,
                  quiet: bool = False, description: str = "", summary_extra: dict | None = None) -> dict:
    """Pretrain every arch of ``config`` on every task of ``sources`` (one task each) into the bank
    ``out``, and add one seeded, untrained ``<arch>_scratch`` entry per arch with
    ``scratch_channels = (in, out)``. Writes ``build_summary.json`` (with ``summary_extra`` merged
    in); returns it.

    A bank pretrained on all tasks serves every leave-one-task-out target: see :func:`ccfv_entries`.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    bank = ModelBank.open(out, create=True, description=description)
    configs = ["train"] + (["adamw"] if config.get("optimizer", "adamw") == "adamw" else []) + ["pretrain"]
    overrides = {"num_workers": num_workers, "n_folds": int(config.get("n_folds", 5)), "seed": seed,
                 "patch_size": [int(p) for p in config["patch_size"]], "max_epochs": int(config["epochs"]),
                 "val_interval": int(config["epochs"]), "bank_epochs": list(config.get("bank_epochs") or []),
                 "bank_root": str(out)}
    if config.get("learning_rate") is not None:
        overrides["learning_rate"] = float(config["learning_rate"])
    if device is not None:
        overrides["device"] = device
    jobs = [(arch, Path(src)) for arch in config["archs"] for src in sources]
    summary = {"data_dir": str(Path(data_dir).resolve()), "bank": str(out.resolve()), "config": config,
               "sources": [Path(s).name for s in sources], **(summary_extra or {}), "entries": []}
    for arch, src in tqdm(jobs, desc="pretraining bank entries", disable=not progress):
        t0 = time.perf_counter()
        n_folds = max(2, min(overrides["n_folds"], len(load_task(src).training)))
        run_bundle("msd_seg3d", configs, output_dir=str(out / "runs" / f"{arch}_{src.name}"), source_roots=[str(src)],
                   arch=arch, arch_kwargs=dict(config["archs"][arch] or {}), resume=False, quiet=quiet,
                   **{**overrides, "n_folds": n_folds})
        added = [e.name for e in bank.open(out) if e.arch == arch and e.source == [src.name]]
        summary["entries"].append({"arch": arch, "source": src.name, "entries": added, "seconds": time.perf_counter() - t0})
    bank = ModelBank.open(out)
    in_ch, out_ch = scratch_channels
    for arch, kwargs in config["archs"].items():  # scratch baseline: the architecture's seeded initialisation
        torch.manual_seed(seed)
        net = build_network(arch, in_ch, out_ch, config["patch_size"], **(kwargs or {}))
        name = f"{arch}_scratch"
        bank.add(name, net, arch=arch, arch_kwargs=kwargs or {}, in_channels=in_ch, out_channels=out_ch,
                 patch_size=config["patch_size"], source=[], epoch=0, iterations=0,
                 notes=f"untrained initialisation (torch seed {seed}): the no-transfer baseline")
        summary["entries"].append({"arch": arch, "source": None, "entries": [name], "seconds": 0.0})
    (out / "build_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    logger.info("bank %s: %d entries", out, len(bank))
    return summary


def ccfv_entries(bank, target: str) -> list[str]:
    """The leave-one-task-out view of a bank for ``target``: every entry not pretrained on it
    (scratch entries included)."""
    name = Path(str(target)).name
    return [e.name for e in bank if name not in e.source]
