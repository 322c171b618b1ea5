"""The CC-FV study: which transferability estimator predicts fine-tuning best?

The experiment of Yang et al. (MICCAI 2023, section 3.1) as a list of resumable jobs, on generated
data small enough for 2 CPU cores (``medxfer demo``: the designed benchmark, ``--preset designed``,
whose models are pretraining checkpoints of graded length) or at the paper's scale on real MSD
(``medxfer study --preset ccfv_msd --data /data/msd``, ``configs/study_ccfv_msd.yaml``):

1. **plan**: nnU-Net planning of every task once (``<task>/medxfer_plans.json``; spacing and
   normalisation; one shared patch for the whole bank, ``patch_size``);
2. **bank**: pretrain every architecture once on every task with the targets' number of
   channels, plus an untrained baseline per architecture; for each target the leave-one-task-out
   bank is every model *not* pretrained on it
   (:func:`medxfer.workflows.bank_build.pretrain_bank`, :func:`~medxfer.workflows.bank_build.ccfv_entries`);
3. **score**: every model of a target's bank on its labelled fine-tuning cases with every
   estimator, without fine-tuning (:func:`medxfer.transferability.score.score_bank`);
4. **fine-tune**: every model on the target, ``all_but_head`` (load everything but the last
   block, train all), same budget for all, **repeated with ``seeds`` seeds** (``seed``,
   ``seed + 1``, ...; the split, the bank and the scores stay those of ``seed``); Dice of the final
   model on the validation fold, per case;
5. **evaluate**: the ground truth is the mean Dice over seeds; per target the noise ceiling (how
   well one seed's ranking predicts another's), each estimator's weighted Kendall tau / Pearson /
   Spearman / TIS with a bootstrap 95% interval over seeds and validation cases, and every
   estimator paired against CC-FV (:mod:`medxfer.transferability.repeats`,
   :mod:`medxfer.transferability.evaluate`); JSON + CSV + PNG.

Nothing is tuned to favour an estimator: the data generator, the budgets and the estimators'
settings are fixed before the evaluation and reported with it.

**Seeds.** One fine-tuning run per model measures the seed as much as the model (issue 18: on the
demo's targets the seed-to-seed weighted tau was 0.17 with one seed). The demo's default is 3
seeds, the fewest that give a ceiling over 3 seed pairs and an interval that resamples seeds;
the fine-tuning jobs then run as parallel single-thread processes (``workers``: 2 on 2 cores;
the issue measured a 2-thread step 25x slower than a 1-thread one under load), so the three
seeds cost about 1.5x the wall time of one. The quick preset (tests, ``medxfer demo --study
quick``) keeps 1 seed in one process: its numbers mean nothing and its job count is what the
fault tests count.

**Resumable** (:func:`run_study`): killed and run again with the same command, it skips every
finished job (each leaves a marker written last, recording what it was for) and redoes the
half-finished one from scratch, ending with the reports of an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import spearmanr

from medxfer.atomic import atomic_path, atomic_write_text
from medxfer.data.msd import load_task
from medxfer.data.splits import apply_split, make_kfold_splits, save_splits
from medxfer.handlers.bank_saver import marker_key
from medxfer.jsonfile import write_json
from medxfer.resources import config_path
from medxfer.transfer.bank import BankError, ModelBank
from medxfer.transfer.weights import TRANSFER_MODES
from medxfer.transferability.evaluate import METRICS, evaluate_estimators, plot_scores, write_report
from medxfer.transferability.features import SamplingConfig
from medxfer.transferability.repeats import REFERENCE, bootstrap_evaluation
from medxfer.transferability.score import STATE_FILE, finished_scores, score_bank_into, scoring_key, task_key
from medxfer.workflows.bank_build import job_done, pretrain_bank, pretrain_jobs, task_digest
from medxfer.workflows.bundle import run_bundle
from medxfer.workflows.msd_seg3d import task_plans

__all__ = ["StudyConfig", "Job", "StudyPlan", "load_preset", "parse_overrides", "plan_study", "estimate_seconds", "run_study",
           "format_dry_run", "design_check", "SECONDS_PER_ITERATION", "RESULT_FILE"]

#: Training seconds per iteration (batch 2 volumes x 2 patches of 48x48x16, AdamW) measured on the
#: 2-core CPU machines of this project (2026-11); scaled linearly with the patch's voxel count.
#: A preset may give its own (``seconds_per_iteration``, at its patch: e.g. a GPU's).
SECONDS_PER_ITERATION = {"unet": 0.07, "unetr": 0.20, "swinunetr": 1.0}
_REFERENCE_VOXELS = 48 * 48 * 16
_RUN_OVERHEAD_S = 4.0      # config parsing, caching the cases, validation of one bundle run
_PLAN_S = 12.0             # nnU-Net planning of one generated task
_SCORE_S_PER_CASE = 0.6    # feature sampling + estimators per target case and model (UNet/UNETR, CPU)
_FINETUNE_CONFIGS = ["train", "adamw", "finetune"]
_PRETRAIN_FOLDS = 5        # bank_build: the source's fold 0 validation cases are held out of pretraining
#: A fine-tuning run's marker, written after the run:
#: ``{"for": key, "dice": ..., "cases": [ids], "case_dice": [...], "seconds": ...}``.
RESULT_FILE = "result.json"
#: MSD tasks as published (case counts for a dry run without the data)
MSD_TABLE = "msd_tasks.yaml"


@dataclass
class StudyConfig:
    """Budgets and settings of the study (defaults: the study on the generated MSD profiles, ``--preset
    demo``, the README's main job before issue 18; the main job now runs ``configs/study_designed.yaml``,
    whose ``generated`` family is made by ``medxfer demo`` / ``scripts/bench/designed_benchmark.py``).

    Budgets are epochs unless ``pretrain_iterations`` / ``finetune_iterations`` are set (the
    paper's protocol counts iterations): then the epochs are derived per run from its training
    cases and ``batch_size`` (fine-tuning: per target, exact to one epoch; pretraining: one number
    for the whole pool, as the bank shares one schedule, from the mean iterations per epoch over
    the sources; :func:`plan_study` reports what each task gets). ``batch_size`` is the
    fine-tuning's (pretraining uses the bundle's, also 2).
    """

    targets: list = field(default_factory=lambda: ["Task09_Spleen", "Task03_Liver"])
    archs: dict = field(default_factory=lambda: {
        "unet": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
        "unetr": {"feature_size": 8, "hidden_size": 192, "mlp_dim": 384, "num_heads": 4}})
    patch_size: list = field(default_factory=lambda: [48, 48, 16])
    pretrain_epochs: int = 60
    bank_epochs: list = field(default_factory=list)  # also bank the pretraining checkpoints of these epochs (<model>_e<k>)
    finetune_epochs: int = 40
    finetune_folds: int = 3          # fold 0: (1 - 1/folds) of the target cases fine-tune, the rest validate
    learning_rate: float = 3e-3      # AdamW, poly decay (configs/adamw.yaml)
    pretrain_learning_rate: float | None = None  # None: learning_rate
    transfer_mode: str = "all_but_head"  # what fine-tuning loads (medxfer.transfer.weights.TRANSFER_MODES); CC-FV's
    estimators: tuple = ("ccfv", "ccfv_official", "logme", "gbc", "transrate", "transrate_official", "leep", "nce",
                         "robustness")
    seed: int = 0
    device: str | None = None        # None: cuda when available, else cpu
    sources: list | None = None      # pretraining tasks; None: every task with the targets' channel count
    seeds: int = 3                   # fine-tuning repeats per (model, target): seed, seed + 1, ...
    bootstrap: int = 1000            # resamples of the intervals
    workers: int | None = None       # parallel fine-tuning processes; None: one per GPU, or CPU cores (<= 8) x 1 thread
    batch_size: int = 2
    pretrain_iterations: int | None = None
    finetune_iterations: int | None = None
    seconds_per_iteration: dict | None = None  # per arch at patch_size; None: SECONDS_PER_ITERATION scaled
    description: str = ""
    generated: dict | None = None    # the generated data this preset is made for (graded family parameters;
                                     # medxfer.data.synth.graded.generate_graded_family keywords); None: given data

    @classmethod
    def quick(cls) -> "StudyConfig":
        """Smoke-test budgets (tests): one arch, one epoch each, one seed, one process; the numbers mean nothing."""
        return cls(archs={"unet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
                   pretrain_epochs=1, finetune_epochs=1, patch_size=[32, 32, 16], targets=["Task09_Spleen"],
                   sources=["Task09_Spleen", "Task03_Liver", "Task06_Lung"], seeds=1, bootstrap=200, workers=1)


def load_preset(preset: str | None = None, overrides: dict | None = None) -> StudyConfig:
    """A study configuration: ``None`` / ``"demo"`` (the defaults), ``"quick"``, a preset file
    ``configs/study_<name>.yaml`` (``ccfv_msd``) or a YAML file path; then ``overrides``
    (``{field: value}``). Unknown keys are an error naming the file and the key."""
    if preset in (None, "demo"):
        config, where = StudyConfig(), "StudyConfig"
    elif preset == "quick":
        config, where = StudyConfig.quick(), "StudyConfig.quick"
    else:
        path = Path(preset) if Path(preset).suffix in (".yaml", ".yml") else config_path(f"study_{preset}.yaml")
        if not path.is_file():
            known = sorted(p.stem.removeprefix("study_") for p in path.parent.glob("study_*.yaml"))
            raise ValueError(f"{path}: no such study preset (presets: demo, quick, {', '.join(known)})")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a study preset is a mapping of StudyConfig fields")
        config, where = _with(StudyConfig(), data, str(path)), str(path)
    return _with(config, overrides or {}, f"{where} overrides")


def parse_overrides(items) -> dict:
    """``["seeds=5", "archs={unet: {channels: [8, 16]}}"]`` -> ``{"seeds": 5, "archs": {...}}``
    (``medxfer study --set KEY=VALUE``; the value is YAML)."""
    overrides = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item}: expected KEY=VALUE (a StudyConfig field and a YAML value)")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item}: the value is not YAML ({str(e).splitlines()[0]})") from None
    return overrides


def _with(config: StudyConfig, values: dict, where: str) -> StudyConfig:
    names = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown study setting(s) {unknown} (known: {', '.join(sorted(names))})")
    values = dict(values)
    if "estimators" in values:
        values["estimators"] = tuple(values["estimators"])
    config = replace(config, **values)
    if config.transfer_mode not in TRANSFER_MODES and not str(config.transfer_mode).startswith("truncated:"):
        raise ValueError(f"{where}: transfer_mode {config.transfer_mode!r} is not one of {', '.join(TRANSFER_MODES)}")
    if config.seeds < 1 or config.bootstrap < 1 or config.batch_size < 1 or (config.workers or 1) < 1:
        raise ValueError(f"{where}: seeds, bootstrap, batch_size and workers must be >= 1")
    return config


# --- the job list ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One unit of the study with its estimated seconds; finished ones leave a marker."""

    kind: str                # plan | pretrain | score | finetune
    name: str                # unique: "<kind> <task or target> [<model> seed <s>]"
    seconds: float
    target: str | None = None
    model: str | None = None
    seed: int | None = None
    detail: str = ""         # e.g. the iterations


@dataclass
class _TaskInfo:
    name: str
    n_cases: int
    n_channels: int
    root: Path | None = None


@dataclass
class StudyPlan:
    """What :func:`run_study` will do: tasks, per-target models, budgets and the job list."""

    config: StudyConfig
    tasks: list                  # pretraining tasks (_TaskInfo)
    targets: list                # target tasks (_TaskInfo)
    skipped: list                # tasks of another channel count or not among the sources
    models: dict                 # target -> leave-one-task-out models (+ scratch)
    pretrain_epochs: int
    finetune_epochs: dict        # target -> epochs
    jobs: list
    workers: int
    from_data: bool              # False: case counts from the published MSD table (dry run)

    def estimate(self) -> dict:
        """Seconds per step (serial) and ``total`` (wall: fine-tuning divided over the workers)."""
        est = {k: sum(j.seconds for j in self.jobs if j.kind == kind)
               for k, kind in (("planning", "plan"), ("pretraining", "pretrain"), ("scoring", "score"),
                               ("fine_tuning", "finetune"))}
        est["total"] = est["planning"] + est["pretraining"] + est["scoring"] + est["fine_tuning"] / self.workers
        return est


def _n_train(n_cases: int, folds: int) -> int:
    return n_cases - math.ceil(n_cases / folds) if folds > 1 else n_cases


def _per_epoch(n_cases: int, folds: int, batch: int) -> int:
    return max(1, math.ceil(_n_train(n_cases, folds) / batch))


def _seconds_per_iteration(config: StudyConfig, arch: str) -> float:
    if config.seconds_per_iteration:
        return float(config.seconds_per_iteration.get(arch, max(config.seconds_per_iteration.values())))
    return SECONDS_PER_ITERATION.get(arch, 1.0) * math.prod(config.patch_size) / _REFERENCE_VOXELS


def _bank_epochs(config: StudyConfig, pre_epochs: int) -> list[int]:
    """The intermediate checkpoints banked besides the last epoch (``bank_epochs`` below ``pre_epochs``)."""
    epochs = sorted({int(e) for e in config.bank_epochs or []})
    if any(e < 1 or e > pre_epochs for e in epochs):
        raise ValueError(f"bank_epochs {epochs}: every epoch must be in 1..pretrain_epochs ({pre_epochs})")
    return [e for e in epochs if e != pre_epochs]


def _pretrain_folds(n_cases: int) -> int:
    return max(2, min(_PRETRAIN_FOLDS, n_cases))  # as bank_build.PretrainJob.settings


def _pretrain_epochs(config: StudyConfig, tasks: list) -> int:
    if config.pretrain_iterations is None:
        return int(config.pretrain_epochs)
    per_epoch = np.mean([_per_epoch(t.n_cases, _pretrain_folds(t.n_cases), 2) for t in tasks])
    return max(1, round(config.pretrain_iterations / per_epoch))


def _finetune_epochs(config: StudyConfig, target: _TaskInfo) -> int:
    if config.finetune_iterations is None:
        return int(config.finetune_epochs)
    return max(1, math.ceil(config.finetune_iterations / _per_epoch(target.n_cases, config.finetune_folds,
                                                                    config.batch_size)))


def _workers(config: StudyConfig) -> int:
    if config.workers is not None:
        return int(config.workers)
    import torch

    if (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return max(1, torch.cuda.device_count())
    return max(1, min(8, os.cpu_count() or 1))


def _tasks_from_data(data_dir: Path) -> list[_TaskInfo]:
    found = []
    for p in sorted(p for p in data_dir.iterdir() if (p / "dataset.json").is_file()):
        task = load_task(p)
        found.append(_TaskInfo(p.name, len(task.training), task.num_channels, p))
    return found


def _tasks_from_table(config: StudyConfig) -> list[_TaskInfo]:
    table = yaml.safe_load(config_path(MSD_TABLE).read_text())
    names = list(dict.fromkeys(list(config.sources or []) + list(config.targets)))
    unknown = [n for n in names if n not in table]
    if unknown or config.sources is None:
        raise ValueError(f"{config_path(MSD_TABLE)}: a dry run without data needs the sources listed and known MSD "
                         f"task names (unknown: {unknown or 'sources not listed'})")
    return [_TaskInfo(n, int(table[n]["numTraining"]), len(table[n]["modality"])) for n in names]


def plan_study(data_dir, config: StudyConfig) -> StudyPlan:
    """The study's tasks, models, budgets and jobs; reads only ``dataset.json`` files (no planning).
    Without ``data_dir`` (or when it is not a folder) the case counts come from the published
    MSD table (``configs/msd_tasks.yaml``): what a dry run prints before the data is there."""
    data_dir = Path(data_dir) if data_dir is not None else None
    from_data = data_dir is not None and data_dir.is_dir()
    return _plan(config, _tasks_from_data(data_dir) if from_data else _tasks_from_table(config), from_data, data_dir)


def _plan(config: StudyConfig, all_tasks: list, from_data: bool, data_dir=None) -> StudyPlan:
    by_name = {t.name: t for t in all_tasks}
    missing = [t for t in config.targets if t not in by_name]
    if missing:
        raise ValueError(f"{data_dir}: target task(s) {missing} not found (tasks there: {sorted(by_name)})")
    targets = [by_name[t] for t in config.targets]
    channels = {t.n_channels for t in targets}
    if len(channels) != 1:
        raise ValueError(f"the study's targets must have the same number of channels, got {channels}")
    n_channels = channels.pop()
    tasks = [t for t in all_tasks if t.n_channels == n_channels and (config.sources is None or t.name in config.sources)]
    skipped = [t.name for t in all_tasks if t not in tasks]
    pre_epochs = _pretrain_epochs(config, tasks)
    ft_epochs = {t.name: _finetune_epochs(config, t) for t in targets}
    pool = pretrain_jobs([t.root or Path(t.name) for t in tasks],
                         {"archs": config.archs, "epochs": pre_epochs, "bank_epochs": _bank_epochs(config, pre_epochs)})
    models = {t.name: [e for j in pool if j.source.name != t.name for e in j.entries]
              + [f"{a}_scratch" for a in config.archs] for t in targets}
    planned = lambda t: t.root is not None and (t.root / "medxfer_plans.json").is_file()  # noqa: E731
    jobs = [Job("plan", f"plan {t.name}", 0.0 if planned(t) else _PLAN_S, target=t.name, detail="nnU-Net planning")
            for t in {t.name: t for t in [*tasks, *targets]}.values()]
    for j, s in zip(pool, [s for _ in config.archs for s in tasks]):
        its = pre_epochs * _per_epoch(s.n_cases, _pretrain_folds(s.n_cases), 2)
        jobs.append(Job("pretrain", f"pretrain {j.name}", _RUN_OVERHEAD_S + _seconds_per_iteration(config, j.arch) * its,
                        target=s.name, model=j.name, detail=f"{its} it"))
    for t in targets:
        n_fit = _n_train(t.n_cases, config.finetune_folds)
        jobs.append(Job("score", f"score {t.name}", len(models[t.name]) * n_fit * _SCORE_S_PER_CASE, target=t.name,
                        detail=f"{len(models[t.name])} models x {n_fit} cases"))
    for k in range(config.seeds):
        for t in targets:
            its = ft_epochs[t.name] * _per_epoch(t.n_cases, config.finetune_folds, config.batch_size)
            for m in models[t.name]:
                arch = next((a for a in config.archs if m.startswith(f"{a}_")), m)
                jobs.append(Job("finetune", f"finetune {t.name} {m} seed {config.seed + k}",
                                _RUN_OVERHEAD_S + _seconds_per_iteration(config, arch) * its,
                                target=t.name, model=m, seed=config.seed + k, detail=f"{its} it"))
    return StudyPlan(config, tasks, targets, skipped, models, pre_epochs, ft_epochs, jobs,
                     min(_workers(config), max(1, sum(j.kind == "finetune" for j in jobs))), from_data)


def estimate_seconds(config: StudyConfig, n_tasks: int, n_source_cases: int, n_target_cases: int) -> dict:
    """Rough wall-clock seconds of each step for ``n_tasks`` generated tasks of equal size (targets
    among them) from :data:`SECONDS_PER_ITERATION`; ``total`` divides the fine-tuning over the workers."""
    names = list(dict.fromkeys(list(config.targets) + [f"Task{90 + i}_Source" for i in range(n_tasks)]))[:n_tasks]
    infos = [_TaskInfo(n, n_target_cases if n in config.targets else n_source_cases, 1) for n in names]
    return _plan(replace(config, sources=None), infos, False).estimate()


def format_dry_run(plan: StudyPlan, data_dir=None) -> str:
    """The configuration (YAML), the budgets per task, the job list and the time estimate."""
    cfg = plan.config
    est = plan.estimate()
    where = f"{data_dir}" if plan.from_data else f"{config_path(MSD_TABLE)} (published case counts; no data read)"
    lines = ["# study configuration", yaml.safe_dump(json.loads(json.dumps(asdict(cfg))), sort_keys=False, default_flow_style=None, width=110).rstrip(),
             "", f"# tasks from {where}"]
    for t in plan.tasks:
        its = plan.pretrain_epochs * _per_epoch(t.n_cases, _pretrain_folds(t.n_cases), 2)
        lines.append(f"  {t.name}: {t.n_cases} training cases; pretraining {plan.pretrain_epochs} epochs = {its} iterations")
    for t in plan.targets:
        n_fit = _n_train(t.n_cases, cfg.finetune_folds)
        its = plan.finetune_epochs[t.name] * _per_epoch(t.n_cases, cfg.finetune_folds, cfg.batch_size)
        lines.append(f"  target {t.name}: {n_fit} fine-tuning / scored cases, {t.n_cases - n_fit} test cases; "
                     f"fine-tuning {plan.finetune_epochs[t.name]} epochs = {its} iterations x {cfg.seeds} seed(s), "
                     f"{len(plan.models[t.name])} models")
    if plan.skipped:
        lines.append(f"  skipped: {', '.join(plan.skipped)}")
    lines += ["", f"# jobs ({len(plan.jobs)}; estimated seconds each)"]
    lines += [f"  {i:4d}  {j.name:60s} {j.detail:28s} {j.seconds:12.0f}" for i, j in enumerate(plan.jobs, start=1)]
    lines += ["", f"# estimate: planning {est['planning']:.0f} s, pretraining {est['pretraining']:.0f} s, scoring "
              f"{est['scoring']:.0f} s, fine-tuning {est['fine_tuning']:.0f} s over {plan.workers} worker(s); "
              f"total {_duration(est['total'])}"]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h ({seconds / 86400:.1f} days)"


# --- progress -------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar over the jobs with the remaining time: the estimates of the jobs left, scaled by
    measured / estimated seconds of the jobs run so far (fine-tuning divided over the workers).
    Without a bar (``progress=False``) each finished job is logged with the same estimate."""

    def __init__(self, jobs: list[Job], workers: int, enabled: bool, log):
        from tqdm.auto import tqdm

        self.left = {j.name: j for j in jobs}
        self.workers, self.log, self.enabled = workers, log, enabled
        self.measured = self.estimated = 0.0
        self.ran, self.total = 0, len(jobs)
        self.bar = tqdm(total=len(jobs), desc="study jobs", unit="job", disable=not enabled)

    def remaining_s(self) -> float:
        ratio = self.measured / self.estimated if self.estimated > 0 else 1.0
        serial = sum(j.seconds for j in self.left.values() if j.kind != "finetune")
        parallel = sum(j.seconds for j in self.left.values() if j.kind == "finetune") / self.workers
        return ratio * (serial + parallel)

    def skip(self, job: Job) -> None:
        if self.left.pop(job.name, None) is not None:
            self.bar.update(1)

    def done(self, job: Job, seconds: float) -> None:
        if self.left.pop(job.name, None) is None:
            return
        self.ran += 1
        self.measured += seconds
        self.estimated += job.seconds
        left = f"~{_duration(self.remaining_s())} left"
        self.bar.set_postfix_str(left, refresh=False)
        self.bar.update(1)
        if not self.enabled:
            self.log(f"  [{self.total - len(self.left)}/{self.total}] {job.name}: {seconds:.1f} s; {left}")

    def close(self) -> None:
        self.bar.close()


class _Stop(Exception):
    """``max_jobs`` jobs ran: the study stops between jobs (a run again continues)."""


# --- markers --------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class _Target:
    """One target of the study: its task, fine-tuning cases, plans, split file and models."""

    task: object
    fit_ids: list
    plans: dict
    models: list
    splits_file: Path
    epochs: int

    @property
    def name(self) -> str:
        return self.task.root.name


def _score_key(bank_root, target: _Target, config: StudyConfig) -> dict | None:
    """The scoring key of ``target`` (:func:`medxfer.transferability.score.scoring_key`), ``None``
    while a model of it is not in the bank."""
    try:
        return scoring_key(bank_root, target.models, config.estimators, SamplingConfig(seed=config.seed), config.seed,
                           task_key(target.task.root, target.plans, None, target.fit_ids))
    except BankError:
        return None


def _run_dir(out: Path, target: str, model: str, k: int, seed: int) -> Path:
    """``finetune/<target>/<model>`` for the first seed (the one-seed layout, so a study made with
    one seed resumes unchanged), ``finetune/<target>/<model>@seed<s>`` for the others."""
    return out / "finetune" / target / (model if k == 0 else f"{model}@seed{seed}")


def _finetune_key(bank, target: _Target, model: str, config: StudyConfig, seed: int) -> dict | None:
    """What a fine-tuning result is for: the target's data and plans, the bank entry's bytes, the
    budget and the seed; ``None`` while the entry is not in the bank."""
    if bank is None or model not in bank:
        return None
    return marker_key({"target": target.name, "data": task_digest(target.task.root), "entry": model,
                       "entry_sha256": bank.get(model).sha256, "configs": _FINETUNE_CONFIGS,
                       "transfer_mode": config.transfer_mode, "max_epochs": target.epochs,
                       "val_interval": target.epochs, "patch_size": list(config.patch_size),
                       "n_folds": config.finetune_folds, "seed": seed, "learning_rate": config.learning_rate,
                       "batch_size": config.batch_size, "split_seed": config.seed})


def _finetune_result(run_dir: Path, key: dict | None) -> dict | None:
    """``result.json`` of a fine-tuning run when it was written for ``key`` (Dice NaN restored)."""
    data = _read_json(run_dir / RESULT_FILE)
    if key is None or not isinstance(data, dict) or data.get("for") != key:
        return None
    nan = lambda v: math.nan if v is None else float(v)  # noqa: E731
    return {**data, "dice": nan(data.get("dice")), "case_dice": [nan(v) for v in data.get("case_dice") or []]}


def _open_bank(root: Path) -> ModelBank | None:
    try:
        return ModelBank.open(root)
    except BankError:
        return None


def _run_finetune(spec: dict) -> dict:
    """One fine-tuning run (in this process or a worker): train, validate the final model, write
    ``result.json`` last. ``spec``: run_dir, key and the bundle overrides."""
    import torch

    run_dir = Path(spec["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-written run: redone from scratch
    device = _WORKER.get("device") or spec["overrides"].get("device")
    overrides = {**spec["overrides"], **({"device": device} if device else {})}
    t0 = time.perf_counter()
    wf = run_bundle("msd_seg3d", _FINETUNE_CONFIGS, output_dir=str(run_dir), resume=False, quiet=True,
                    cache_progress=False,  # per-iteration logs and caching bars would bury the study's own progress
                    **overrides)
    state = wf.parser.get_parsed_content("validate#evaluator").state
    dice = float(state.metrics.get("val_mean_dice", math.nan))
    details = getattr(state, "metric_details", {}).get("val_mean_dice")
    case_dice = []
    if details is not None:  # MONAI MeanDice (save_details): cases x foreground classes; a case's Dice = class mean
        details = torch.as_tensor(details, dtype=torch.float64).cpu()
        per_case = details.reshape(details.shape[0], -1)
        case_dice = [float(v) for v in torch.nanmean(per_case, dim=1)]
    write_json(run_dir / RESULT_FILE, {"for": spec["key"], "dice": dice, "cases": spec["cases"], "case_dice": case_dice,
                                       "seconds": time.perf_counter() - t0})  # last
    return {"seconds": time.perf_counter() - t0}


_WORKER: dict = {}


def _init_worker(devices, threads: int) -> None:
    """A fine-tuning worker process: its own device (one GPU each) and thread count."""
    import torch

    _WORKER["device"] = devices.get()
    torch.set_num_threads(threads)


def _devices(config: StudyConfig, workers: int) -> list[str | None]:
    import torch

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.cuda.device_count() > 1:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(workers)]
    return [config.device] * workers


# --- the study ------------------------------------------------------------------------------------

def run_study(data_dir, out, config: StudyConfig | None = None, progress: bool = True, log=print,
              max_jobs: int | None = None) -> dict:
    """Run the jobs of :func:`plan_study` on the MSD task folders in ``data_dir``.

    Writes under ``out``: ``bank/`` (manifest, checkpoints, pretraining runs), ``splits/<target>.json``
    (the fine-tuning split, the same for every seed), ``scores/<target>/scores.csv|json``,
    ``finetune/<target>/<model>[@seed<s>]/`` (runs, ``result.json``), ``finetune_dice.csv`` (target,
    model, mean Dice over seeds, its std, seeds), ``finetune_dice_seeds.csv`` (per seed and case),
    ``table.csv`` (every score next to the mean Dice), ``te_evaluation.json|csv`` (the estimators
    against the mean Dice, and in the JSON ``statistics``: per target the noise ceiling, intervals and
    paired comparisons), ``te_statistics.csv`` (the same as rows), ``scores_vs_dice.png``,
    ``tau_vs_ceiling.png`` (each estimator's weighted tau with its interval beside the ceiling) and
    ``study.json`` (config, estimate, timings, results). Returns the ``study.json`` content; with
    ``max_jobs``, stops after that many jobs ran (the pretraining pool runs as one block and counts
    as its jobs) and returns ``{"stopped": True, "jobs_run": n, ...}``.

    Resumable: run again after a kill, the study skips every finished job (planning: the task's
    ``medxfer_plans.json``; pretraining via the bank's markers, :mod:`medxfer.workflows.bank_build`;
    scoring per target via ``scores.state.json``, :func:`~medxfer.transferability.score.score_into`;
    fine-tuning per (target, model, seed) via ``result.json``, written after the run with what it is
    for) and redoes half-finished ones from scratch; every job is seeded and the reports are
    computed from the jobs' files, so they equal those of an uninterrupted run (timings aside:
    ``seconds`` are each job's own, recorded when it ran).
    """
    config = config or StudyConfig()
    out, data_dir = Path(out), Path(data_dir)
    plan = plan_study(data_dir, config)
    est = plan.estimate()
    tasks = [t.root for t in plan.tasks]
    log(f"CC-FV study: targets {config.targets}; {len(tasks)} pretraining task(s) x {list(config.archs)}"
        f" (+ scratch), leave-one-task-out per target (skipped: {plan.skipped or 'none'}); {config.seeds} fine-tuning "
        f"seed(s) over {plan.workers} worker(s); estimated {est['total'] / 60:.1f} min (planning {est['planning']:.0f} s, "
        f"pretraining {est['pretraining']:.0f} s, scoring {est['scoring']:.0f} s, fine-tuning {est['fine_tuning']:.0f} s)")
    device = config.device
    bank_root = out / "bank"
    bank_config = {"archs": config.archs, "patch_size": config.patch_size, "epochs": plan.pretrain_epochs,
                   "bank_epochs": _bank_epochs(config, plan.pretrain_epochs), "optimizer": "adamw",
                   "learning_rate": config.learning_rate if config.pretrain_learning_rate is None else config.pretrain_learning_rate,
                   "n_folds": _PRETRAIN_FOLDS}
    pre_jobs = pretrain_jobs(tasks, bank_config)
    seeds = [config.seed + k for k in range(config.seeds)]

    def target_of(info) -> _Target:
        task = load_task(info.root)
        splits = make_kfold_splits(task.training, n_folds=config.finetune_folds, seed=config.seed)
        return _Target(task, [r["id"] for r in apply_split(task.training, splits, 0)[0]], None,
                       plan.models[info.name], out / "splits" / f"{info.name}.json", plan.finetune_epochs[info.name])

    targets = [target_of(t) for t in plan.targets]
    planned = {t.name: t.root / "medxfer_plans.json" for t in [*plan.tasks, *plan.targets]}
    for target in targets:  # the scoring and fine-tuning keys read the plans: known when planned before
        if planned[target.name].is_file():
            target.plans = dict(task_plans(target.task.root), patch_size=list(config.patch_size))

    bank = _open_bank(bank_root)  # what is done already (a rerun after a kill)
    done_pre = sum(job_done(bank_root, j, bank_config, config.seed) is not None for j in pre_jobs)
    done_score = sum(t.plans is not None and (key := _score_key(bank_root, t, config)) is not None
                     and finished_scores(out / "scores" / t.name, key) is not None for t in targets)
    ft_done = {(t.name, m, s) for t in targets for m in t.models for k, s in enumerate(seeds)
               if _finetune_result(_run_dir(out, t.name, m, k, s), _finetune_key(bank, t, m, config, s)) is not None}
    n_ft = sum(len(t.models) for t in targets) * len(seeds)
    n_done, n_steps = done_pre + done_score + len(ft_done), len(pre_jobs) + len(targets) + n_ft
    if n_done:
        log(f"resuming: {n_done} of {n_steps} steps already done (pretraining {done_pre}/{len(pre_jobs)}, scoring "
            f"{done_score}/{len(targets)}, fine-tuning {len(ft_done)}/{n_ft}); they are not redone")

    bar = _Progress(plan.jobs, plan.workers, progress, log)
    jobs = {j.name: j for j in plan.jobs}

    def ran(job: Job, seconds: float) -> None:
        bar.done(job, seconds)
        if max_jobs is not None and bar.ran >= max_jobs:
            raise _Stop

    timings: dict[str, float] = {"planning": 0.0, "bank": 0.0, "scoring": 0.0, "fine_tuning": 0.0}
    try:
        log(f"[study 1/5] planning {len(planned)} task(s) with nnU-Net (kept where planned before)")
        for name, path in planned.items():
            job = jobs[f"plan {name}"]
            if path.is_file():
                bar.skip(job)
                continue
            t0 = time.perf_counter()
            task_plans(path.parent)
            timings["planning"] += time.perf_counter() - t0
            ran(job, time.perf_counter() - t0)
        for target in targets:
            target.plans = dict(task_plans(target.task.root), patch_size=list(config.patch_size))

        log("[study 2/5] pretraining every architecture on every task (one pool, leave-one-task-out per target)")
        finished = {j.name for j in pre_jobs if job_done(bank_root, j, bank_config, config.seed) is not None}
        for j in pre_jobs:
            if j.name in finished:
                bar.skip(jobs[f"pretrain {j.name}"])
        build = pretrain_bank(data_dir, tasks, bank_root, bank_config, (plan.targets[0].n_channels, 2), device=device,
                              seed=config.seed, progress=progress, quiet=True, workers=plan.workers,
                              description="CC-FV study pool: one model per task x arch")
        timings["bank"] = sum(e["seconds"] or 0.0 for e in build["entries"])
        for e in build["entries"]:  # the pool runs as one block; its runs count as jobs when it returns
            name = f"{e['arch']}_{e['source']}"
            if e["source"] is not None and not e["already_done"] and name not in finished:
                ran(jobs[f"pretrain {name}"], float(e["seconds"] or 0.0))
        bank = ModelBank.open(bank_root)

        score_rows = {}
        for n, target in enumerate(targets, start=1):
            name = target.name
            missing = [m for m in target.models if m not in bank]
            if missing:
                raise BankError(bank.manifest, f"the study's bank lacks {missing} (built by another study?)")
            job = jobs[f"score {name}"]
            key = _score_key(bank_root, target, config)
            was_done = key is not None and finished_scores(out / "scores" / name, key) is not None
            log(f"[study 3/5] target {n}/{len(targets)} {name}: scoring {len(target.models)} models with every estimator")
            score_dir = out / "scores" / name
            rows, _ = score_bank_into(score_dir, bank_root, target.task.root, target.plans, config.estimators,
                                      SamplingConfig(seed=config.seed), entries=target.models, device=device,
                                      split_ids=target.fit_ids, progress=progress, seed=config.seed, overwrite=True,
                                      meta={"bank": str(bank_root), "target": name,
                                            "estimators": list(config.estimators), "cases": target.fit_ids})
            score_rows[name] = rows
            took = float((_read_json(score_dir / STATE_FILE) or {}).get("seconds") or 0.0)
            timings["scoring"] += took
            if was_done:
                bar.skip(job)
            else:
                ran(job, took)

        log(f"[study 4/5] fine-tuning {n_ft} runs ({sum(len(t.models) for t in targets)} models x {len(seeds)} seed(s); "
            f"{config.transfer_mode}, same budget) over {plan.workers} worker(s)")
        val_ids = {}
        for target in targets:  # one split per target for every seed (the runs' own default is seeded by the run)
            splits = make_kfold_splits(target.task.training, n_folds=config.finetune_folds, seed=config.seed)
            save_splits(splits, target.splits_file, overwrite=True)
            val_ids[target.name] = [r["id"] for r in apply_split(target.task.training, splits, 0)[1]]
        specs = []
        for k, seed in enumerate(seeds):
            for target in targets:
                for model in target.models:
                    job = jobs[f"finetune {target.name} {model} seed {seed}"]
                    run_dir = _run_dir(out, target.name, model, k, seed)
                    key = _finetune_key(bank, target, model, config, seed)
                    if _finetune_result(run_dir, key) is not None:
                        bar.skip(job)
                        continue
                    overrides = {"data_root": str(target.task.root), "bank_root": str(bank_root), "bank_entry": model,
                                 "transfer_mode": config.transfer_mode, "max_epochs": target.epochs,
                                 "val_interval": target.epochs, "patch_size": list(config.patch_size),
                                 "n_folds": config.finetune_folds, "seed": seed, "learning_rate": config.learning_rate,
                                 "batch_size": config.batch_size, "splits_file": str(target.splits_file),
                                 **({"device": config.device} if config.device else {})}
                    specs.append((job, {"run_dir": str(run_dir), "key": key, "cases": val_ids[target.name],
                                        "overrides": overrides}))
        timings["fine_tuning"] = _run_specs(specs, plan.workers, config, ran)
    except _Stop:
        bar.close()
        log(f"stopped after {bar.ran} job(s) (max_jobs={max_jobs}); {len(bar.left)} left, about "
            f"{_duration(bar.remaining_s())}; run the same command again to continue")
        return {"stopped": True, "jobs_run": bar.ran, "jobs_left": len(bar.left), "estimate_s": est}
    bar.close()
    return _report(out, config, plan, targets, score_rows, seeds, est, timings, log)


def _run_specs(specs: list, workers: int, config: StudyConfig, ran) -> float:
    """Run the fine-tuning specs in this process (``workers == 1``) or in ``workers`` spawned
    single-thread processes (one GPU each where several exist); returns the runs' seconds."""
    total = 0.0
    if workers <= 1 or len(specs) <= 1:
        for job, spec in specs:
            took = _run_finetune(spec)["seconds"]
            total += took
            ran(job, took)
        return total
    ctx = multiprocessing.get_context("spawn")
    devices = ctx.Queue()
    for d in _devices(config, workers):
        devices.put(d)
    with ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(devices, 1)) as pool:
        running = {pool.submit(_run_finetune, spec): job for job, spec in specs}
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = running.pop(fut)
                    took = fut.result()["seconds"]
                    total += took
                    ran(job, took)
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
    return total


def _report(out: Path, config: StudyConfig, plan: StudyPlan, targets: list, score_rows: dict, seeds: list,
            est: dict, timings: dict, log) -> dict:
    """Read every fine-tuning result back, evaluate, write the reports and print the summary."""
    bank = ModelBank.open(out / "bank")
    table, dice_rows, seed_rows, statistics = [], [], [], {}
    for target in targets:
        rows = {r["model"]: r for r in score_rows[target.name]}
        per_case, per_seed = [], []  # seeds x models x cases; seeds x models (each run's MeanDice)
        for k, seed in enumerate(seeds):
            runs = []
            for model in target.models:
                result = _finetune_result(_run_dir(out, target.name, model, k, seed),
                                          _finetune_key(bank, target, model, config, seed))
                runs.append(result["case_dice"] or [result["dice"]])
                seed_rows += [{"target": target.name, "model": model, "seed": seed, "case": c, "dice": d}
                              for c, d in zip(result.get("cases") or [], result["case_dice"])]
                seed_rows.append({"target": target.name, "model": model, "seed": seed, "case": "mean", "dice": result["dice"]})
            width = max(len(r) for r in runs)
            per_case.append([r + [math.nan] * (width - len(r)) for r in runs])
            per_seed.append([r["dice"] for r in seed_rows if r["case"] == "mean" and r["target"] == target.name
                             and r["seed"] == seed])
        dice, by_model = np.asarray(per_case, dtype=np.float64), np.asarray(per_seed, dtype=np.float64).T
        for model, values in zip(target.models, by_model):  # the table's Dice: the runs' own MeanDice, mean over seeds
            finite = values[np.isfinite(values)]
            mean = float(finite.mean()) if finite.size else math.nan
            dice_rows.append({"target": target.name, "model": model, "dice": mean,
                              "dice_std": float(finite.std()) if finite.size > 1 else math.nan, "seeds": int(finite.size)})
            table.append({"target": target.name, "model": model, "dice": mean,
                          **{e: rows[model][e] for e in config.estimators}})
        statistics[target.name] = bootstrap_evaluation(
            dice, {e: [rows[m][e] for m in target.models] for e in config.estimators}, n_boot=config.bootstrap,
            seed=config.seed, reference=REFERENCE if REFERENCE in config.estimators else None)
        statistics[target.name]["models"] = list(target.models)

    log("[study 5/5] evaluating the estimators against the mean Dice over seeds (bootstrap intervals)")
    atomic_write_text(out / "finetune_dice.csv", "target,model,dice,dice_std,seeds\n" + "".join(
        f"{r['target']},{r['model']},{r['dice']},{r['dice_std']},{r['seeds']}\n" for r in dice_rows))
    atomic_write_text(out / "finetune_dice_seeds.csv", "target,model,seed,case,dice\n" + "".join(
        f"{r['target']},{r['model']},{r['seed']},{r['case']},{r['dice']}\n" for r in seed_rows))
    atomic_write_text(out / "table.csv", ",".join(table[0]) + "\n" + "".join(
        ",".join(str(v) for v in r.values()) + "\n" for r in table))
    result = evaluate_estimators(table, list(config.estimators))
    write_report({**result, "statistics": statistics}, out)
    _write_statistics_csv(out / "te_statistics.csv", statistics)
    plot_scores(table, out / "scores_vs_dice.png", result=result)
    _plot_ceiling(out / "tau_vs_ceiling.png", statistics, list(config.estimators))
    ranking = sorted(result["estimators"], key=lambda e: (-_finite(result["mean"][e]["weighted_tau"]),
                                                          -_finite(result["mean"][e]["pearson"])))
    summary = {"config": asdict(config), "targets": [t.name for t in targets], "tasks": [t.name for t in plan.tasks],
               "skipped_tasks": plan.skipped, "seeds": seeds, "estimate_s": est, "seconds": timings,
               "finetune_dice": dice_rows,
               "scores": {t: [{k: v for k, v in r.items() if not k.startswith("seconds_") and k != "errors"} for r in rows]
                          for t, rows in score_rows.items()},
               "evaluation": {"mean": result["mean"], "per_target": result["per_target"]},
               "statistics": statistics,
               "noise_ceiling": {t: s["noise_ceiling"]["value"] for t, s in statistics.items()},
               "best_estimator": ranking[0] if ranking else None, "ranking_by_weighted_tau": ranking,
               "scoring_over_finetuning_time": timings["scoring"] / timings["fine_tuning"] if timings["fine_tuning"] else None}
    write_json(out / "study.json", summary, default=str)

    for target in targets:
        name, stats = target.name, statistics[target.name]
        log(f"\nfine-tuned Dice on {name} (validation fold, final model; mean over {len(seeds)} seed(s)):")
        for r in sorted((r for r in dice_rows if r["target"] == name), key=lambda r: -_finite(r["dice"])):
            spread = f" +- {r['dice_std']:.3f}" if math.isfinite(r["dice_std"]) else ""
            log(f"  {r['model']:32s} {r['dice']:.3f}{spread}")
        c = stats["noise_ceiling"]
        log(f"{name}: noise ceiling (weighted tau between two seeds' rankings) {_ci(c['value'], c['low'], c['high'])}")
        log(f"  {'estimator':15s} {'w. tau [95% interval]':>24s} {'pearson':>24s} {'spearman':>24s} {'TIS':>24s}"
            f"   w. tau - {REFERENCE} [95%], share ahead")
        for e in ranking:
            s = stats["estimators"][e]
            cells = " ".join(f"{_ci(s[m]['value'], s[m]['low'], s[m]['high']):>24s}" for m in METRICS)
            p = stats["paired"].get(e, {}).get("weighted_tau")
            vs = f"   {_ci(p['difference'], p['low'], p['high'])}, {p['share_ahead']:.2f}" if p else ""
            log(f"  {e:15s} {cells}{vs}")
    log(f"\nmean over {len(targets)} target(s):")
    log(f"{'estimator':15s} {'w. tau':>7s} {'pearson':>8s} {'spearman':>9s} {'TIS':>6s}   per-target w. tau")
    for e in ranking:
        m = result["mean"][e]
        per = "  ".join(f"{result['per_target'][t.name][e]['weighted_tau']:+.2f}" for t in targets)
        log(f"{e:15s} {m['weighted_tau']:7.3f} {m['pearson']:8.3f} {m['spearman']:9.3f} {m['tis']:6.3f}   {per}")
    ceilings = ", ".join(f"{t} {v:+.2f}" for t, v in summary["noise_ceiling"].items())
    log(f"\nbest estimator on these targets (mean weighted tau): {summary['best_estimator']} — {len(targets)} target(s), "
        f"{len(dice_rows)} models x {len(seeds)} seed(s); noise ceiling {ceilings}: an estimator's lead inside the "
        "intervals, or a ceiling near 0, decides nothing")
    return summary


def _source_of(model: str, tasks) -> str | None:
    """The task of ``tasks`` a bank entry was pretrained on (``None``: the untrained one)."""
    return next((t for t in tasks if t in model), None)


def _epochs_of(model: str) -> int:
    """Pretraining epochs of a bank entry ``<arch>_<Task>_e<epoch>`` (0: the untrained one)."""
    head, sep, tail = model.rpartition("_e")
    return int(tail) if sep and tail.isdigit() and not model.endswith("_scratch") else 0


def design_check(design: dict, summary: dict, seed_csv) -> dict:
    """Does the fine-tuning of a designed benchmark follow its design? (issue 18's bar, per target)

    ``design``: the ``graded_family.json`` of :func:`medxfer.data.synth.graded.generate_graded_family`;
    ``summary``: :func:`run_study`'s result on it; ``seed_csv``: its ``finetune_dice_seeds.csv``.
    The designed order of a target's models: nearer source (contrast grades) first, then longer
    pretraining (the ``_e<epoch>`` of the entry), the untrained model last. Per target:
    ``noise_ceiling`` (bar >= 0.8), ``spearman_vs_design`` (mean Dice against the designed order,
    ties stay ties; bar >= 0.8), ``closest_vs_scratch`` (the first model of the designed order minus
    the untrained one; ``beyond_seed_spread`` when the margin exceeds the sum of both seed stds:
    the mean +- std bands do not overlap, our reading of "beyond the seed spread"), every model's
    mean Dice and seed std, and ``accepted`` (all three bars)."""
    per_seed: dict = {}
    with open(seed_csv) as f:
        for r in csv.DictReader(f):
            if r["case"] == "mean":
                per_seed.setdefault(r["target"], {}).setdefault(r["model"], []).append(float(r["dice"]))
    far = design["n_grades"]  # the untrained model: beyond the farthest source
    out = {}
    for target in summary["targets"]:
        rows = [r for r in summary["finetune_dice"] if r["target"] == target]
        dist = {r["model"]: design["distance"][target].get(_source_of(r["model"], design["tasks"]), far) for r in rows}
        length = {r["model"]: _epochs_of(r["model"]) for r in rows}
        # designed order: nearer source first, then longer pretraining; the untrained model last
        key = {m: (dist[m], -length[m]) for m in dist}
        order = {k: i for i, k in enumerate(sorted(set(key.values())))}
        dice = {r["model"]: r["dice"] for r in rows}
        std = {r["model"]: r["dice_std"] for r in rows}
        models = sorted(dice, key=lambda m: (order[key[m]], m))
        rho = spearmanr([dice[m] for m in models], [-order[key[m]] for m in models]).statistic
        scratch = next(m for m in models if m.endswith("_scratch"))
        closest = models[0]
        margin = dice[closest] - dice[scratch]
        margins = {m: dice[m] - dice[scratch] for m in models if m != scratch}
        beyond = {m: bool(margins[m] > std[m] + std[scratch]) for m in margins}
        stats = summary["statistics"][target]
        out[target] = {
            "noise_ceiling": summary["noise_ceiling"][target],
            "noise_ceiling_interval": [stats["noise_ceiling"]["low"], stats["noise_ceiling"]["high"]],
            "spearman_vs_design": float(rho),
            "closest_vs_scratch": {"closest": closest, "margin": margin, "std_closest": std[closest],
                                   "std_scratch": std[scratch], "beyond_seed_spread": beyond[closest]},
            "pretrained_beyond_seed_spread": f"{sum(beyond.values())} of {len(beyond)}",
            "models": [{"model": m, "distance": dist[m], "pretrain_epochs": length[m], "dice": dice[m], "seed_std": std[m],
                        "per_seed": per_seed.get(target, {}).get(m)} for m in models],
            "mean_seed_std": float(np.nanmean([std[m] for m in models])),
            "std_of_model_means": float(np.std([dice[m] for m in models])),
            "estimators_weighted_tau": {e: [s["weighted_tau"]["value"], s["weighted_tau"]["low"], s["weighted_tau"]["high"]]
                                        for e, s in stats["estimators"].items()},
        }
        out[target]["accepted"] = bool(out[target]["noise_ceiling"] >= 0.8 and rho >= 0.8 and beyond[closest])
    return out


def _ci(value, low, high) -> str:
    fmt = lambda v: "nan" if not (isinstance(v, (int, float)) and math.isfinite(v)) else f"{v:+.2f}"  # noqa: E731
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def _write_statistics_csv(path: Path, statistics: dict) -> None:
    lines = ["target,kind,estimator,metric,value,low,high,n,share_ahead"]
    for t, s in statistics.items():
        c = s["noise_ceiling"]
        lines.append(f"{t},noise_ceiling,,weighted_tau,{c['value']},{c['low']},{c['high']},{c['n_seeds']},")
        for e, metrics in s["estimators"].items():
            lines += [f"{t},estimator,{e},{m},{r['value']},{r['low']},{r['high']},{r['n']}," for m, r in metrics.items()]
        for e, metrics in s["paired"].items():
            lines += [f"{t},minus_{s['reference']},{e},{m},{r['difference']},{r['low']},{r['high']},{r['n']},"
                      f"{r['share_ahead']}" for m, r in metrics.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _plot_ceiling(out_png: Path, statistics: dict, estimators: list) -> Path:
    """Per target: each estimator's weighted tau with its 95% interval, beside the noise ceiling
    (dashed line, its interval shaded). matplotlib's Agg canvas directly, as ``plot_scores``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * len(statistics), 0.35 * len(estimators) + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(statistics), squeeze=False)).ravel()
    for ax, (target, s) in zip(axes, statistics.items()):
        y = np.arange(len(estimators))[::-1]
        tau = [s["estimators"][e]["weighted_tau"] for e in estimators]
        v = np.array([r["value"] for r in tau], dtype=float)
        lo, hi = np.array([r["low"] for r in tau], dtype=float), np.array([r["high"] for r in tau], dtype=float)
        err = np.nan_to_num(np.stack([v - lo, hi - v]).clip(min=0))
        ax.errorbar(v, y, xerr=err, fmt="o", color="C0", capsize=3, label="estimator (95% interval)")
        c = s["noise_ceiling"]
        if math.isfinite(c["value"] if c["value"] is not None else math.nan):
            ax.axvline(c["value"], color="C3", ls="--", label=f"noise ceiling {c['value']:+.2f}")
            if math.isfinite(c["low"]) and math.isfinite(c["high"]):
                ax.axvspan(c["low"], c["high"], color="C3", alpha=0.12)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, estimators, fontsize=8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("weighted tau vs mean Dice over seeds")
        ax.set_title(f"{target} ({s['n_seeds']} seed(s), {s['n_cases']} case(s))", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3, axis="x")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    return out_png


def _finite(x) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf
