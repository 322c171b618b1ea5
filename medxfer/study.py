"""The CC-FV study on generated data: which transferability estimator predicts fine-tuning best?

The experiment of Yang et al. (MICCAI 2023, section 3.1), small enough for 2 CPU cores:

1. **bank**: pretrain every architecture once on every generated task with the targets' number
   of channels, plus an untrained baseline per architecture; for each target the
   leave-one-task-out bank is every model *not* pretrained on it
   (:func:`medxfer.workflows.bank_build.pretrain_bank`, :func:`~medxfer.workflows.bank_build.ccfv_entries`);
2. **score**: every model of a target's bank on its labelled fine-tuning cases with every
   estimator, without fine-tuning (:func:`medxfer.transferability.score.score_bank`);
3. **fine-tune**: every model on the target, ``all_but_head`` (load everything but the last
   block, train all), same budget and seed for all; Dice of the final model on the validation
   fold;
4. **evaluate**: weighted Kendall tau, Pearson, Spearman and TIS of each estimator's scores
   against the measured Dice, per target and averaged (:mod:`medxfer.transferability.evaluate`),
   JSON + CSV + PNG.

Nothing is tuned to favour an estimator: the data generator, the budgets and the estimators'
settings are fixed before the evaluation and reported with it.

The study is resumable (:func:`run_study`): killed and run again with the same command, it skips
every finished step and redoes the half-finished one, ending with the reports of an uninterrupted
run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medxfer.atomic import atomic_write_text
from medxfer.data.msd import load_task
from medxfer.data.splits import apply_split, make_kfold_splits
from medxfer.handlers.bank_saver import marker_key
from medxfer.jsonfile import write_json
from medxfer.transfer.bank import BankError, ModelBank
from medxfer.transferability.evaluate import evaluate_estimators, plot_scores, write_report
from medxfer.transferability.features import SamplingConfig
from medxfer.transferability.score import STATE_FILE, finished_scores, score_bank_into, scoring_key, task_key
from medxfer.workflows.bank_build import job_done, pretrain_bank, pretrain_jobs, task_digest
from medxfer.workflows.bundle import run_bundle
from medxfer.workflows.msd_seg3d import task_plans

__all__ = ["StudyConfig", "estimate_seconds", "run_study", "SECONDS_PER_ITERATION"]

#: Training seconds per iteration (batch 2 volumes x 2 patches of 48x48x16, AdamW) measured on the
#: 2-core CPU machines of this project (2026-11); scaled linearly with the patch's voxel count.
SECONDS_PER_ITERATION = {"unet": 0.07, "unetr": 0.20, "swinunetr": 1.0}
_REFERENCE_VOXELS = 48 * 48 * 16
_RUN_OVERHEAD_S = 4.0      # config parsing, caching the cases, validation of one bundle run
_PLAN_S = 12.0             # nnU-Net planning of one generated task
_SCORE_S_PER_CASE = 0.6    # feature sampling + estimators per target case and model (UNet/UNETR, CPU)
_FINETUNE_CONFIGS = ["train", "adamw", "finetune"]
#: A fine-tuning run's marker, written after the run: ``{"for": key, "dice": ..., "seconds": ...}``.
RESULT_FILE = "result.json"


@dataclass
class StudyConfig:
    """Budgets and settings of the study (defaults: the README's main job, about 10 min on 2 CPU cores)."""

    targets: list = field(default_factory=lambda: ["Task09_Spleen", "Task03_Liver"])
    archs: dict = field(default_factory=lambda: {
        "unet": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
        "unetr": {"feature_size": 8, "hidden_size": 192, "mlp_dim": 384, "num_heads": 4}})
    patch_size: list = field(default_factory=lambda: [48, 48, 16])
    pretrain_epochs: int = 60
    finetune_epochs: int = 40
    finetune_folds: int = 3          # fold 0: (1 - 1/folds) of the target cases fine-tune, the rest validate
    learning_rate: float = 3e-3      # AdamW, poly decay (configs/adamw.yaml)
    estimators: tuple = ("ccfv", "ccfv_official", "logme", "gbc", "transrate", "leep", "nce", "robustness")
    seed: int = 0
    device: str | None = None        # None: cuda when available, else cpu
    sources: list | None = None      # pretraining tasks; None: every task with the targets' channel count

    @classmethod
    def quick(cls) -> "StudyConfig":
        """Smoke-test budgets (tests): one arch, one epoch each; the numbers mean nothing."""
        return cls(archs={"unet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
                   pretrain_epochs=1, finetune_epochs=1, patch_size=[32, 32, 16], targets=["Task09_Spleen"],
                   sources=["Task09_Spleen", "Task03_Liver", "Task06_Lung"])


def _iterations(n_cases: int, folds: int, epochs: int, batch: int = 2) -> int:
    n_train = n_cases - math.ceil(n_cases / folds) if folds > 1 else n_cases
    return epochs * max(1, math.ceil(n_train / batch))


def estimate_seconds(config: StudyConfig, n_tasks: int, n_source_cases: int, n_target_cases: int) -> dict:
    """Rough wall-clock seconds of each step from :data:`SECONDS_PER_ITERATION` (printed first).

    ``n_tasks``: pretraining tasks (targets included: each is a source for the others).
    """
    scale = math.prod(config.patch_size) / _REFERENCE_VOXELS
    n_targets = len(config.targets)
    per_target_models = n_tasks - 1 + 1  # leave-one-task-out + scratch, per arch
    pretrain = finetune = 0.0
    for arch in config.archs:
        per_it = SECONDS_PER_ITERATION.get(arch, 1.0) * scale
        pretrain += n_tasks * (_RUN_OVERHEAD_S + per_it * _iterations(n_source_cases, 5, config.pretrain_epochs))
        finetune += n_targets * per_target_models * (
            _RUN_OVERHEAD_S + per_it * _iterations(n_target_cases, config.finetune_folds, config.finetune_epochs))
    n_fit = n_target_cases - math.ceil(n_target_cases / config.finetune_folds)
    est = {"planning": _PLAN_S * n_tasks, "pretraining": pretrain,
           "scoring": n_targets * per_target_models * len(config.archs) * n_fit * _SCORE_S_PER_CASE,
           "fine_tuning": finetune}
    est["total"] = sum(est.values())
    return est


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class _Target:
    """One target of the study: its task, fine-tuning cases, plans and leave-one-task-out models."""

    task: object
    fit_ids: list
    plans: dict
    models: list

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


def _finetune_key(bank, target: _Target, model: str, config: StudyConfig) -> dict | None:
    """What a fine-tuning result is for: the target's data and plans, the bank entry's bytes and the
    budget; ``None`` while the entry is not in the bank."""
    if bank is None or model not in bank:
        return None
    return marker_key({"target": target.name, "data": task_digest(target.task.root), "entry": model,
                       "entry_sha256": bank.get(model).sha256, "configs": _FINETUNE_CONFIGS,
                       "transfer_mode": "all_but_head", "max_epochs": config.finetune_epochs,
                       "val_interval": config.finetune_epochs, "patch_size": list(config.patch_size),
                       "n_folds": config.finetune_folds, "seed": config.seed, "learning_rate": config.learning_rate})


def _finetune_result(run_dir: Path, key: dict | None) -> dict | None:
    """``result.json`` of a fine-tuning run when it was written for ``key`` (Dice NaN restored)."""
    data = _read_json(run_dir / RESULT_FILE)
    if key is None or not isinstance(data, dict) or data.get("for") != key:
        return None
    return {**data, "dice": math.nan if data.get("dice") is None else float(data["dice"])}


def _open_bank(root: Path) -> ModelBank | None:
    try:
        return ModelBank.open(root)
    except BankError:
        return None


def run_study(data_dir, out, config: StudyConfig | None = None, progress: bool = True, log=print) -> dict:
    """Run the four steps (module docstring) on the MSD task folders in ``data_dir``.

    Writes under ``out``: ``bank/`` (manifest, checkpoints, pretraining runs),
    ``scores/<target>/scores.csv|json``, ``finetune/<target>/<model>/`` (runs, ``result.json``),
    ``finetune_dice.csv`` (target, model, dice), ``table.csv`` (every score next to the Dice),
    ``te_evaluation.json|csv``, ``scores_vs_dice.png`` and ``study.json`` (config, estimate,
    timings, result). Returns the ``study.json`` content.

    Resumable: run again after a kill, the study skips every finished step (pretraining runs via
    the bank's markers, :mod:`medxfer.workflows.bank_build`; scoring per target via
    ``scores.state.json``, :func:`~medxfer.transferability.score.score_into`; fine-tuning per
    (target, model) via ``result.json``, written after the run with what it is for) and redoes
    half-finished ones from scratch; every step is seeded and the reports are computed from the
    steps' files, so they equal those of an uninterrupted run (timings aside: ``seconds`` are
    each step's own, recorded when it ran).
    """
    from tqdm.auto import tqdm

    config = config or StudyConfig()
    out, data_dir = Path(out), Path(data_dir)
    tasks_by_target = [load_task(data_dir / t) for t in config.targets]
    channels = {t.num_channels for t in tasks_by_target}
    if len(channels) != 1:
        raise ValueError(f"the study's targets must have the same number of channels, got {channels}")
    n_channels = channels.pop()
    all_tasks = sorted(p for p in data_dir.iterdir() if (p / "dataset.json").is_file())
    tasks = [p for p in all_tasks if load_task(p).num_channels == n_channels
             and (config.sources is None or p.name in config.sources)]
    skipped = [p.name for p in all_tasks if p not in tasks]
    n_source_cases = min(len(load_task(p).training) for p in tasks)
    estimate = estimate_seconds(config, len(tasks), n_source_cases, min(len(t.training) for t in tasks_by_target))
    log(f"CC-FV study: targets {[t.root.name for t in tasks_by_target]}; {len(tasks)} pretraining task(s) x {list(config.archs)}"
        f" (+ scratch), leave-one-task-out per target (skipped: {skipped or 'none'}); estimated "
        f"{estimate['total'] / 60:.1f} min (planning {estimate['planning']:.0f} s, pretraining {estimate['pretraining']:.0f} s, "
        f"scoring {estimate['scoring']:.0f} s, fine-tuning {estimate['fine_tuning']:.0f} s)")
    device = config.device
    bank_root = out / "bank"
    bank_config = {"archs": config.archs, "patch_size": config.patch_size, "epochs": config.pretrain_epochs,
                   "bank_epochs": [], "optimizer": "adamw", "learning_rate": config.learning_rate, "n_folds": 5}
    jobs = pretrain_jobs(tasks, bank_config)
    targets = []
    for task in tasks_by_target:  # plan the targets up front (scoring and fine-tuning read the plans)
        splits = make_kfold_splits(task.training, n_folds=config.finetune_folds, seed=config.seed)
        models = [e for j in jobs if j.source.name != task.root.name for e in j.entries]
        targets.append(_Target(task, [r["id"] for r in apply_split(task.training, splits, 0)[0]],
                               dict(task_plans(task.root), patch_size=list(config.patch_size)),
                               models + [f"{arch}_scratch" for arch in config.archs]))

    bank = _open_bank(bank_root)  # what is done already (a rerun after a kill)
    done_pre = sum(job_done(bank_root, j, bank_config, config.seed) is not None for j in jobs)
    done_score = sum(finished_scores(out / "scores" / t.name, key) is not None
                     for t in targets if (key := _score_key(bank_root, t, config)) is not None)
    done_ft = sum(_finetune_result(out / "finetune" / t.name / m, _finetune_key(bank, t, m, config)) is not None
                  for t in targets for m in t.models)
    n_ft = sum(len(t.models) for t in targets)
    n_done, n_steps = done_pre + done_score + done_ft, len(jobs) + len(targets) + n_ft
    if n_done:
        log(f"resuming: {n_done} of {n_steps} steps already done (pretraining {done_pre}/{len(jobs)}, scoring "
            f"{done_score}/{len(targets)}, fine-tuning {done_ft}/{n_ft}); they are not redone")

    log("[study 1/4] pretraining every architecture on every task (one pool, leave-one-task-out per target)")
    build = pretrain_bank(data_dir, tasks, bank_root, bank_config, (n_channels, 2), device=device, seed=config.seed,
                          progress=progress, quiet=True, description="CC-FV study pool: one model per task x arch")
    timings: dict[str, float] = {"bank": sum(e["seconds"] or 0.0 for e in build["entries"]), "scoring": 0.0,
                                 "fine_tuning": 0.0}
    bank = ModelBank.open(bank_root)

    table, dice_rows, score_rows = [], [], {}
    for n, target in enumerate(targets, start=1):
        name = target.name
        missing = [m for m in target.models if m not in bank]
        if missing:
            raise BankError(bank.manifest, f"the study's bank lacks {missing} (built by another study?)")
        log(f"[study 2/4] target {n}/{len(targets)} {name}: scoring {len(target.models)} models with every estimator")
        score_dir = out / "scores" / name
        rows, _ = score_bank_into(score_dir, bank_root, target.task.root, target.plans, config.estimators,
                                  SamplingConfig(seed=config.seed), entries=target.models, device=device,
                                  split_ids=target.fit_ids, progress=progress, seed=config.seed, overwrite=True,
                                  meta={"bank": str(bank_root), "target": name,
                                        "estimators": list(config.estimators), "cases": target.fit_ids})
        score_rows[name] = rows
        timings["scoring"] += float((_read_json(score_dir / STATE_FILE) or {}).get("seconds") or 0.0)

        log(f"[study 3/4] target {n}/{len(targets)} {name}: fine-tuning {len(target.models)} models (all_but_head, same budget)")
        for row in tqdm(rows, desc=f"fine-tuning on {name}", disable=not progress):
            result = _finetune(out / "finetune" / name / row["model"], bank_root, bank, target, row["model"], config)
            timings["fine_tuning"] += float(result.get("seconds") or 0.0)
            dice_rows.append({"target": name, "model": row["model"], "dice": result["dice"]})
            table.append({"target": name, "model": row["model"], "dice": result["dice"],
                          **{e: row[e] for e in config.estimators}})

    log("[study 4/4] evaluating the estimators against the measured Dice")
    atomic_write_text(out / "finetune_dice.csv", "target,model,dice\n" + "".join(
        f"{r['target']},{r['model']},{r['dice']}\n" for r in dice_rows))
    atomic_write_text(out / "table.csv", ",".join(table[0]) + "\n" + "".join(
        ",".join(str(v) for v in r.values()) + "\n" for r in table))
    result = evaluate_estimators(table, list(config.estimators))
    write_report(result, out)
    plot_scores(table, out / "scores_vs_dice.png", result=result)
    ranking = sorted(result["estimators"], key=lambda e: (-_finite(result["mean"][e]["weighted_tau"]),
                                                          -_finite(result["mean"][e]["pearson"])))
    summary = {"config": asdict(config), "targets": [t.name for t in targets], "tasks": [p.name for p in tasks],
               "skipped_tasks": skipped, "estimate_s": estimate, "seconds": timings, "finetune_dice": dice_rows,
               "scores": {t: [{k: v for k, v in r.items() if not k.startswith("seconds_") and k != "errors"} for r in rows]
                          for t, rows in score_rows.items()},
               "evaluation": {"mean": result["mean"], "per_target": result["per_target"]},
               "best_estimator": ranking[0] if ranking else None, "ranking_by_weighted_tau": ranking,
               "scoring_over_finetuning_time": timings["scoring"] / timings["fine_tuning"] if timings["fine_tuning"] else None}
    write_json(out / "study.json", summary, default=str)

    for target in targets:
        name = target.name
        log(f"\nfine-tuned Dice on {name} (validation fold, final model):")
        for r in sorted((r for r in dice_rows if r["target"] == name), key=lambda r: -_finite(r["dice"])):
            log(f"  {r['model']:32s} {r['dice']:.3f}")
    log(f"\nmean over {len(targets)} target(s):")
    log(f"{'estimator':15s} {'w. tau':>7s} {'pearson':>8s} {'spearman':>9s} {'TIS':>6s}   per-target w. tau")
    for e in ranking:
        m = result["mean"][e]
        per = "  ".join(f"{result['per_target'][t.name][e]['weighted_tau']:+.2f}" for t in targets)
        log(f"{e:15s} {m['weighted_tau']:7.3f} {m['pearson']:8.3f} {m['spearman']:9.3f} {m['tis']:6.3f}   {per}")
    log(f"\nbest estimator on these generated targets (mean weighted tau): {summary['best_estimator']} — "
        f"{len(targets)} target(s), {len(dice_rows)} fine-tuned models, one seed: a small sample, read it as such")
    return summary


def _finetune(run_dir: Path, bank_root: Path, bank: ModelBank, target: _Target, model: str,
              config: StudyConfig) -> dict:
    """Fine-tune ``model`` on ``target`` into ``run_dir`` unless its ``result.json`` says it was done
    for the same key; a run folder without one (killed) is removed and the run redone from scratch.
    Returns the result (``dice`` of the final model on the validation fold, ``seconds``)."""
    key = _finetune_key(bank, target, model, config)
    result = _finetune_result(run_dir, key)
    if result is not None:
        return result
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = {"device": config.device} if config.device else {}
    t0 = time.perf_counter()
    wf = run_bundle("msd_seg3d", _FINETUNE_CONFIGS, data_root=str(target.task.root), bank_root=str(bank_root),
                    bank_entry=model, transfer_mode="all_but_head", output_dir=str(run_dir),
                    max_epochs=config.finetune_epochs, val_interval=config.finetune_epochs,
                    patch_size=list(config.patch_size), n_folds=config.finetune_folds, seed=config.seed,
                    learning_rate=config.learning_rate, resume=False, quiet=True,
                    cache_progress=False,  # per-iteration logs and caching bars would bury the study's own progress
                    **overrides)
    state = wf.parser.get_parsed_content("validate#evaluator").state
    dice = float(state.metrics.get("val_mean_dice", math.nan))
    write_json(run_dir / RESULT_FILE, {"for": key, "dice": dice, "seconds": time.perf_counter() - t0})  # last
    return _finetune_result(run_dir, key)


def _finite(x) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf
