"""Build the CC-FV experiment bank for one target task (leave-one-task-out; SPEC section 4).

For a target task ``T`` in a folder of MSD tasks, and every architecture ``a`` of the bank
definition (``configs/bank_ccfv.yaml``): pretrain ``a`` on each other task ``S != T`` with the
``msd_seg3d`` bundle's ``pretrain`` workflow (entries ``<a>_<S>_e<epoch>``), and add one untrained,
seeded ``<a>_scratch`` entry as the baseline. Source tasks whose channel count differs from the
target's are skipped (and listed) unless ``same_channels_only`` is false.

Writes the bank (``bank.yaml`` + ``checkpoints/``) and ``build_summary.json`` (entries, skipped
tasks, seconds per entry) into ``out``; pretraining runs go to ``out/runs/<a>_<S>``.

**Resumable.** A killed build, run again with the same command, continues where it stopped:

* ``out/bank_build.json`` records the build's settings (bank definition, sources, seed) when the
  build starts; a folder holding a bank built with other settings (or a bank not made by a build)
  is refused in one line unless ``overwrite`` (``medxfer bank build --overwrite``: rebuild
  everything);
* each pretraining run ``(a, S)`` is done when its marker ``out/pretraining/<a>_<S>.json``
  (:mod:`medxfer.handlers.bank_saver`) says ``done`` for the same settings and inputs (source
  ``dataset.json`` and plans) and its entries are in the manifest with the recorded sha256:
  then it is skipped and listed as already done. Otherwise it is half-finished (or was never
  started): its entries, stray checkpoint files and run folder are removed and it is redone from
  scratch, so the bank equals that of an uninterrupted build (the runs are seeded);
* scratch entries are rebuilt from their seed and kept when the bytes match;
* ``build_summary.json`` is written last.

**Parallel** (``workers > 1``, ``medxfer bank build --workers N``): the pretraining runs not done
yet go to a pool of ``N`` spawned processes, each with one torch thread and its own device (one GPU
each, round-robin, where several exist; else ``device``, e.g. ``N`` single-thread CPU processes).
A worker runs the bundle with a *staging* bank inside its run folder (``runs/<a>_<S>/staged_bank``)
and never touches ``bank.yaml``: only this (the parent) process adds entries to the manifest, one
job at a time as jobs return (the checkpoint files are moved in with ``os.replace``, then the
manifest is saved atomically, then the ``done`` marker), so no lock is needed. Sources without
plans are planned here before the pool starts (two archs on one source would otherwise plan it
concurrently). The runs are seeded as in one process, so the checkpoints have the same bytes as a
``workers=1`` build run with one torch thread (the thread count changes the last bits of CPU
convolutions); the manifest lists the entries in the same (job) order; markers, resume and
``build_summary.json`` are those of a serial build. A failing job raises :class:`PretrainingFailed`
(one line naming the job) after the running jobs have finished and been added; the failed job
leaves no entry (its ``running`` marker makes the next build redo it).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import yaml

from medxfer.atomic import atomic_write_text
from medxfer.data.msd import load_task
from medxfer.data.problems import DatasetError
from medxfer.handlers.bank_saver import (MARKER_DIR, changed_keys, finished_pretraining, marker_key,
                                         pretraining_entries, purge_pretraining, write_pretraining_marker)
from medxfer.jsonfile import write_json
from medxfer.networks.registry import build_network
from medxfer.resources import config_path
from medxfer.transfer.bank import MANIFEST, BankError, ModelBank, sha256_file
from medxfer.workflows.bundle import run_bundle
from medxfer.workflows.msd_seg3d import bank_entry_name, task_plans

__all__ = ["DEFAULT_BANK_CONFIG", "BUILD_FILE", "PretrainJob", "load_bank_config", "source_tasks", "build_ccfv_bank",
           "pretrain_bank", "pretrain_jobs", "job_done", "task_digest", "ccfv_entries", "PretrainingFailed",
           "STAGED_BANK"]

#: configs/ of the checkout, or the copy shipped in the wheel
DEFAULT_BANK_CONFIG = config_path("bank_ccfv.yaml")
#: The settings of the build that made a bank folder (written when the build starts).
BUILD_FILE = "bank_build.json"
#: Folder of a pretraining run (``runs/<a>_<S>/``) where a parallel worker's bundle writes its entries.
STAGED_BANK = "staged_bank"
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
                    source_names: Sequence[str] | None = None, quiet: bool = False, overwrite: bool = False,
                    workers: int = 1) -> dict:
    """Pretrain the leave-one-task-out bank for ``target``; returns the build summary (also saved).

    Args:
        data_dir: folder holding the MSD task folders (``TaskNN_Name``).
        target: the target task's folder name (never used for pretraining).
        out: bank folder (created). A killed build resumes (module docstring); a bank built
            with other settings is refused unless ``overwrite`` (everything rebuilt).
        config: the bank definition (:func:`load_bank_config`).
        device: ``"cpu"``, ``"cuda"``; ``None`` = the bundle default (cuda when available).
        source_names: source task folder names to use (default: every other task in ``data_dir``).
        workers: pretraining runs in parallel (:func:`pretrain_bank`).
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
                         summary_extra={"target": target_task.root.name, "skipped_sources": skipped},
                         overwrite=overwrite, workers=workers)


def _sha256_of(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def task_digest(task_dir) -> dict:
    """What a pretraining or scoring marker records about a task's data: the sha256 of its
    ``dataset.json`` (the case list) and of its plans ``medxfer_plans.json`` (spacing, patch,
    normalisation; ``None`` before planning). Cheap (two small files), unlike hashing the volumes."""
    task_dir = Path(task_dir)
    return {"task": task_dir.name, "dataset_json": _sha256_of(task_dir / "dataset.json"),
            "plans": _sha256_of(task_dir / "medxfer_plans.json")}


@dataclass(frozen=True)
class PretrainJob:
    """One pretraining run of a bank build: ``arch`` on the task ``source``."""

    arch: str
    source: Path
    name: str                     # entry prefix <arch>_<Task>
    entries: tuple[str, ...]      # the bank entries it adds: <name>_e<epoch>

    def settings(self, config: dict, seed: int) -> dict:
        """What the run is for (its marker's key): arch, kwargs, the bundle overrides that shape
        the result and the source's :func:`task_digest`. Device and worker count are left out."""
        n_folds = max(2, min(int(config.get("n_folds", 5)), len(load_task(self.source).training)))
        return {"arch": self.arch, "arch_kwargs": dict(config["archs"][self.arch] or {}), "source": self.source.name,
                "data": task_digest(self.source), "configs": _bundle_configs(config), "n_folds": n_folds,
                "seed": int(seed), "patch_size": [int(p) for p in config["patch_size"]],
                "max_epochs": int(config["epochs"]), "bank_epochs": sorted(int(e) for e in config.get("bank_epochs") or []),
                "learning_rate": None if config.get("learning_rate") is None else float(config["learning_rate"])}


def _bundle_configs(config: dict) -> list[str]:
    return ["train"] + (["adamw"] if config.get("optimizer", "adamw") == "adamw" else []) + ["pretrain"]


def pretrain_jobs(sources: Sequence[Path], config: dict) -> list[PretrainJob]:
    """The pretraining runs of a bank: every arch of ``config`` on every task of ``sources``."""
    epochs = sorted({int(e) for e in config.get("bank_epochs") or []} | {int(config["epochs"])})
    jobs = []
    for arch in config["archs"]:
        for src in sources:
            name = bank_entry_name(arch, [src])
            jobs.append(PretrainJob(arch, Path(src), name, tuple(f"{name}_e{e}" for e in epochs)))
    return jobs


def job_done(bank_root, job: PretrainJob, config: dict, seed: int) -> dict | None:
    """The trusted ``done`` marker of ``job`` in the bank (:func:`medxfer.handlers.bank_saver.finished_pretraining`)."""
    return finished_pretraining(bank_root, job.name, job.settings(config, seed))


def _build_settings(sources, config: dict, scratch_channels, seed: int) -> dict:
    return marker_key({"config": config, "sources": [Path(s).name for s in sources],
                       "scratch_channels": [int(c) for c in scratch_channels], "seed": int(seed)})


def _clear_bank(out: Path) -> None:
    """Remove what a build writes (the manifest, checkpoints, runs, markers, summaries), nothing else."""
    for name in (MANIFEST, BUILD_FILE, "build_summary.json"):
        (out / name).unlink(missing_ok=True)
    for folder in ("checkpoints", "runs", MARKER_DIR):
        shutil.rmtree(out / folder, ignore_errors=True)


def _claim_bank(out: Path, settings: dict, overwrite: bool) -> None:
    """Resume a build of the same settings; refuse (one line) a bank of other settings or origin."""
    claim = out / BUILD_FILE
    if overwrite:
        _clear_bank(out)
    else:
        try:
            existing = json.loads(claim.read_text()) if claim.exists() else None
        except (OSError, ValueError):
            existing = {}
        if existing is not None and (not isinstance(existing, dict) or existing.get("for") != settings):
            names = {"config": "bank definition", "sources": "source tasks"}
            changed = [names.get(k, k) for k in changed_keys(existing.get("for") if isinstance(existing, dict) else None, settings)]
            raise FileExistsError(f"{claim}: this bank was built with other settings ({', '.join(changed)}); rebuild "
                                  "it with overwrite (medxfer bank build --overwrite) or choose another output folder")
        if existing is None and (out / MANIFEST).exists():
            try:
                entries = ModelBank.open(out).names()
            except BankError:
                entries = ["(unreadable manifest)"]
            if entries:
                raise FileExistsError(f"{out / MANIFEST}: holds a bank not made by this build ({len(entries)} entries, "
                                      "no bank_build.json); rebuild it with overwrite (medxfer bank build --overwrite) "
                                      "or choose another output folder")
    atomic_write_text(claim, json.dumps({"made_by": "medxfer bank build", "for": settings}, indent=1) + "\n")


def _kept_or_purged(out: Path, job: PretrainJob, settings: dict) -> dict | None:
    """A finished job's summary item (its trusted marker), or ``None`` after removing what a
    half-finished run left (entries, checkpoints, run folder): it is then redone from scratch."""
    marker = finished_pretraining(out, job.name, settings)
    if marker is not None:
        logger.info("%s: pretraining finished before (marker %s/%s.json), kept", job.name, MARKER_DIR, job.name)
        return {"arch": job.arch, "source": job.source.name, "entries": list(marker["entries"]),
                "seconds": marker.get("seconds"), "already_done": True}
    removed = purge_pretraining(out, job.name)
    run_dir = out / "runs" / job.name
    if removed or run_dir.exists():
        logger.warning("%s: unfinished pretraining (killed?) redone from scratch%s", job.name,
                       f"; removed its entries {removed}" if removed else "")
    shutil.rmtree(run_dir, ignore_errors=True)
    return None


def pretrain_bank(data_dir, sources: Sequence[Path], out, config: dict, scratch_channels: tuple[int, int],
                  device: str | None = None, num_workers: int = 0, seed: int = 0, progress: bool = True,
                  quiet: bool = False, description: str = "", summary_extra: dict | None = None,
                  overwrite: bool = False, workers: int = 1) -> dict:
    """Pretrain every arch of ``config`` on every task of ``sources`` (one task each) into the bank
    ``out``, and add one seeded, untrained ``<arch>_scratch`` entry per arch with
    ``scratch_channels = (in, out)``. Writes ``build_summary.json`` (with ``summary_extra`` merged
    in) last; returns it. Resumable (module docstring): finished runs are skipped and listed with
    ``already_done: true`` (and in ``summary["already_done"]``), half-finished ones redone.

    ``workers > 1``: the runs not done yet go to that many spawned single-thread processes (one GPU
    each where several exist); the bank, markers and summary are those of ``workers=1`` (module
    docstring, **Parallel**); a failing run raises :class:`PretrainingFailed`.

    A bank pretrained on all tasks serves every leave-one-task-out target: see :func:`ccfv_entries`.
    """
    from tqdm.auto import tqdm

    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1 (got {workers})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _claim_bank(out, _build_settings(sources, config, scratch_channels, seed), overwrite)
    bank = ModelBank.open(out, create=True, description=description)
    configs = _bundle_configs(config)
    overrides = {"num_workers": num_workers, "seed": seed,
                 "patch_size": [int(p) for p in config["patch_size"]], "max_epochs": int(config["epochs"]),
                 "val_interval": int(config["epochs"]), "bank_epochs": list(config.get("bank_epochs") or []),
                 "bank_root": str(out)}
    if config.get("learning_rate") is not None:
        overrides["learning_rate"] = float(config["learning_rate"])
    if device is not None:
        overrides["device"] = device
    summary = {"data_dir": str(Path(data_dir).resolve()), "bank": str(out.resolve()), "config": config,
               "sources": [Path(s).name for s in sources], **(summary_extra or {}), "entries": [], "already_done": []}
    serial = pretrain_jobs(sources, config)
    if int(workers) > 1:  # the same jobs in a process pool; the loop below then has none left
        _pretrain_parallel(out, serial, config, seed, configs, overrides, device, int(workers), quiet, progress, summary)
        serial = []
    for job in tqdm(serial, desc="pretraining bank entries", disable=not progress or not serial):
        settings = job.settings(config, seed)
        done = _kept_or_purged(out, job, settings)
        if done is not None:
            summary["entries"].append(done)
            summary["already_done"].append(job.name)
            continue
        run_dir = out / "runs" / job.name
        write_pretraining_marker(out, job.name, settings, "running")
        t0 = time.perf_counter()
        run_bundle("msd_seg3d", configs, output_dir=str(run_dir), source_roots=[str(job.source)],
                   arch=job.arch, arch_kwargs=dict(config["archs"][job.arch] or {}), resume=False, quiet=quiet,
                   **{**overrides, "n_folds": settings["n_folds"]})
        seconds = time.perf_counter() - t0
        bank = ModelBank.open(out)
        added = {n: bank.get(n).sha256 for n in pretraining_entries(bank, job.name)}
        if not added:
            raise RuntimeError(f"{run_dir}: pretraining finished without adding a bank entry {job.name}_e*")
        # the marker last, with the settings recomputed: the run planned the source on first use
        write_pretraining_marker(out, job.name, job.settings(config, seed), "done", added, seconds)
        summary["entries"].append({"arch": job.arch, "source": job.source.name, "entries": list(added),
                                   "seconds": seconds, "already_done": False})
    bank = ModelBank.open(out)
    in_ch, out_ch = scratch_channels
    for arch, kwargs in config["archs"].items():  # scratch baseline: the architecture's seeded initialisation
        torch.manual_seed(seed)
        net = build_network(arch, in_ch, out_ch, config["patch_size"], **(kwargs or {}))
        name = f"{arch}_scratch"
        meta = dict(arch=arch, arch_kwargs=kwargs or {}, in_channels=in_ch, out_channels=out_ch,
                    patch_size=config["patch_size"], source=[], epoch=0, iterations=0,
                    notes=f"untrained initialisation (torch seed {seed}): the no-transfer baseline")
        done = name in bank and _same_weights(bank, name, net)
        if not done:
            bank.add(name, net, overwrite=True, **meta)
        summary["entries"].append({"arch": arch, "source": None, "entries": [name], "seconds": 0.0, "already_done": done})
    write_json(out / "build_summary.json", summary, default=str)
    logger.info("bank %s: %d entries (%d pretraining run(s) already done before)", out, len(bank),
                len(summary["already_done"]))
    return summary


class PretrainingFailed(RuntimeError):
    """A pretraining run of a parallel bank build failed in its worker process (one-line message
    naming the run folder, the job and the cause)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else '(no message)'}"


_WORKER: dict = {}


def _init_worker(devices, threads: int, parent: int) -> None:
    """A pretraining worker process: its own device (one GPU each where several exist), ``threads``
    torch threads, and a watchdog that ends it when the build process is gone (killed): an orphaned
    worker would otherwise go on writing into the run folder the next build redoes. ``parent`` is
    the build's pid, passed in: a worker still importing when the build was killed has another
    parent already."""
    _WORKER["device"] = devices.get()
    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="medxfer-orphan-watchdog", daemon=True).start()


def _worker_devices(device: str | None, workers: int) -> list[str | None]:
    """The device of each worker: ``cuda:i`` round-robin when the run is on CUDA and several GPUs
    exist, else ``device`` (``None``: the bundle's default)."""
    resolved = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if resolved == "cuda" and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [device] * workers


def _pretrain_in_worker(job: PretrainJob, configs: list[str], overrides: dict, run_dir: str, quiet: bool) -> float:
    """One pretraining run in a worker process, its entries written into the run's staging bank;
    returns its seconds. Any failure comes back as a plain one-line :class:`RuntimeError` (the
    original may not pickle, and its traceback would be the worker's)."""
    device = _WORKER.get("device")
    overrides = {**overrides, "bank_root": str(Path(run_dir) / STAGED_BANK), **({"device": device} if device else {})}
    t0 = time.perf_counter()
    try:
        run_bundle("msd_seg3d", configs, output_dir=run_dir, source_roots=[str(job.source)], arch=job.arch,
                   resume=False, quiet=quiet, **overrides)
    except Exception as e:  # noqa: BLE001 -- reported by the parent, naming the job
        raise RuntimeError(_first_line(e)) from None
    return time.perf_counter() - t0


def _add_staged(out: Path, job: PretrainJob, run_dir: Path) -> dict[str, str]:
    """Move a finished worker's entries from its staging bank into the bank ``out`` (checkpoint
    files first, then the manifest, saved atomically; this process is the manifest's only writer)
    and remove the staging bank. Returns ``{entry: sha256}``."""
    staging = run_dir / STAGED_BANK
    try:
        staged = ModelBank.open(staging)
    except BankError:
        staged = None
    names = pretraining_entries(staged, job.name) if staged is not None else []
    if not names:
        raise RuntimeError(f"{run_dir}: pretraining finished without adding a bank entry {job.name}_e*")
    bank = ModelBank.open(out)
    clash = [n for n in names if n in bank]
    if clash:
        raise FileExistsError(f"{bank.manifest}: entries {clash} exist already (written by another process?)")
    entries = []
    for name in names:
        entry = staged.get(name)
        path = staged.verify(name, read_weights=False)  # the bytes the worker recorded
        target = out / entry.checkpoint
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)  # same file system (inside out/): atomic
        entries.append(entry)
    ModelBank(out, [*bank, *entries], bank.description).save()
    shutil.rmtree(staging, ignore_errors=True)
    return {e.name: e.sha256 for e in entries}


def _pretrain_parallel(out: Path, jobs: list[PretrainJob], config: dict, seed: int, configs: list[str],
                       overrides: dict, device: str | None, workers: int, quiet: bool, progress: bool,
                       summary: dict) -> None:
    """The pretraining runs of :func:`pretrain_bank` in a pool of ``workers`` spawned processes
    (module docstring, **Parallel**); fills ``summary`` as the serial loop does, in job order."""
    from tqdm.auto import tqdm

    items: dict[str, dict] = {}
    todo: list[PretrainJob] = []
    for job in jobs:
        done = _kept_or_purged(out, job, job.settings(config, seed))
        if done is not None:
            items[job.name] = done
            continue
        todo.append(job)
    for src in dict.fromkeys(job.source for job in todo):  # planned once, here, not by two workers at a time
        if not (src / "medxfer_plans.json").is_file():
            task_plans(src)
    for job in todo:
        write_pretraining_marker(out, job.name, job.settings(config, seed), "running")
    failures: dict[str, str] = {}
    if todo:
        ctx = multiprocessing.get_context("spawn")
        devices = ctx.Queue()
        n = min(workers, len(todo))
        for d in _worker_devices(device, n):
            devices.put(d)
        bar = tqdm(total=len(todo), desc=f"pretraining bank entries ({n} workers)", disable=not progress)
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                                 initargs=(devices, 1, os.getpid())) as pool:
            running = {}
            for job in todo:
                job_overrides = {**overrides, "n_folds": job.settings(config, seed)["n_folds"],
                                 "arch_kwargs": dict(config["archs"][job.arch] or {})}
                running[pool.submit(_pretrain_in_worker, job, configs, job_overrides, str(out / "runs" / job.name),
                                    quiet)] = job
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = running.pop(fut)
                        try:
                            error = fut.exception()  # the worker's one line, or the pool's (a worker died)
                            if error is None:
                                seconds = fut.result()
                                added = _add_staged(out, job, out / "runs" / job.name)
                        except Exception as e:  # noqa: BLE001 -- adding its entries failed
                            error = RuntimeError(_first_line(e))
                        if error is not None:  # the running jobs finish and are kept; the rest is left
                            failures[job.name] = (str(error).strip().splitlines() or [type(error).__name__])[0]
                            for other in [f for f in running if f.cancel()]:  # not started: left for the next build
                                running.pop(other)
                            continue
                        write_pretraining_marker(out, job.name, job.settings(config, seed), "done", added, seconds)
                        items[job.name] = {"arch": job.arch, "source": job.source.name, "entries": list(added),
                                           "seconds": seconds, "already_done": False}
                        bar.update()
            except BaseException:
                for fut in running:
                    fut.cancel()
                raise
            finally:
                bar.close()
    if failures:
        first = next(job for job in todo if job.name in failures)
        more = [name for name in failures if name != first.name]
        raise PretrainingFailed(f"{out / 'runs' / first.name}: pretraining {first.name} ({first.arch} on "
                                f"{first.source.name}) failed: {failures[first.name]}"
                                + (f" (also failed: {', '.join(more)})" if more else ""))
    # the manifest in job order, as a serial build writes it (entries were added as jobs returned)
    bank = ModelBank.open(out)
    order = [n for job in jobs for n in items[job.name]["entries"] if n in bank]
    ordered = [bank.get(n) for n in order] + [e for e in bank if e.name not in set(order)]
    if [e.name for e in ordered] != bank.names():
        ModelBank(out, ordered, bank.description).save()
    for job in jobs:
        summary["entries"].append(items[job.name])
        if items[job.name]["already_done"]:
            summary["already_done"].append(job.name)


def _same_weights(bank: ModelBank, name: str, net: torch.nn.Module) -> bool:
    """Whether entry ``name`` holds exactly ``net``'s tensors (file present, sha256 as recorded)."""
    try:
        state = bank.load_state_dict(name)
    except BankError:
        return False
    mine = net.state_dict()
    return set(state) == set(mine) and all(torch.equal(state[k], mine[k].cpu()) for k in mine)


def ccfv_entries(bank, target: str) -> list[str]:
    """The leave-one-task-out view of a bank for ``target``: every entry not pretrained on it
    (scratch entries included)."""
    name = Path(str(target)).name
    return [e.name for e in bank if name not in e.source]
