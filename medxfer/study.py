"""The CC-FV study on generated data: which transferability estimator predicts fine-tuning best?

The experiment of Yang et al. (MICCAI 2023, section 3.1), small enough for 2 CPU cores:

1. **bank**: for the target task, pretrain every architecture on every other task with the same
   number of channels (leave-one-task-out), plus an untrained baseline per architecture
   (:func:`medxfer.transfer.bank_build.build_ccfv_bank`);
2. **score**: every bank model on the target's labelled fine-tuning cases with every estimator,
   without fine-tuning (:func:`medxfer.transferability.score.score_bank`);
3. **fine-tune**: every bank model on the target, ``all_but_head`` (load everything but the last
   block, train all), same budget and seed for all; Dice of the final model on the validation
   fold;
4. **evaluate**: weighted Kendall tau, Pearson, Spearman and TIS of each estimator's scores
   against the measured Dice (:mod:`medxfer.transferability.evaluate`), JSON + CSV + PNG.

Nothing is tuned to favour an estimator: the data generator, the budgets and the estimators'
settings are fixed before the evaluation and reported with it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["StudyConfig", "estimate_seconds", "run_study", "SECONDS_PER_ITERATION"]

#: Training seconds per iteration (batch 2 volumes x 2 patches of 48x48x16, AdamW) measured on the
#: 2-core CPU machines of this project (2026-11); scaled linearly with the patch's voxel count.
SECONDS_PER_ITERATION = {"unet": 0.07, "unetr": 0.20, "swinunetr": 1.0}
_REFERENCE_VOXELS = 48 * 48 * 16
_RUN_OVERHEAD_S = 4.0      # config parsing, caching the cases, validation of one bundle run
_PLAN_S = 12.0             # nnU-Net planning of one generated task
_SCORE_S_PER_CASE = 0.6    # feature sampling + estimators per target case and model (UNet/UNETR, CPU)


@dataclass
class StudyConfig:
    """Budgets and settings of the study (defaults: the README's main job, about 10 min on 2 CPU cores)."""

    target: str = "Task09_Spleen"
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
    sources: list | None = None      # source task folder names; None: every other task with the target's channels

    @classmethod
    def quick(cls) -> "StudyConfig":
        """Smoke-test budgets (tests): one arch, one epoch each; the numbers mean nothing."""
        return cls(archs={"unet": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
                   pretrain_epochs=1, finetune_epochs=1, patch_size=[32, 32, 16],
                   sources=["Task03_Liver", "Task06_Lung"])


def _iterations(n_cases: int, folds: int, epochs: int, batch: int = 2) -> int:
    n_train = n_cases - math.ceil(n_cases / folds) if folds > 1 else n_cases
    return epochs * max(1, math.ceil(n_train / batch))


def estimate_seconds(config: StudyConfig, n_sources: int, n_source_cases: int, n_target_cases: int) -> dict:
    """Rough wall-clock seconds of each step from :data:`SECONDS_PER_ITERATION` (printed first)."""
    scale = math.prod(config.patch_size) / _REFERENCE_VOXELS
    pretrain = finetune = 0.0
    for arch in config.archs:
        per_it = SECONDS_PER_ITERATION.get(arch, 1.0) * scale
        pretrain += n_sources * (_RUN_OVERHEAD_S + per_it * _iterations(n_source_cases, 5, config.pretrain_epochs))
        finetune += (n_sources + 1) * (_RUN_OVERHEAD_S + per_it * _iterations(n_target_cases, config.finetune_folds,
                                                                                 config.finetune_epochs))
    n_models = (n_sources + 1) * len(config.archs)
    n_fit = n_target_cases - math.ceil(n_target_cases / config.finetune_folds)
    est = {"planning": _PLAN_S * (n_sources + 1), "pretraining": pretrain,
           "scoring": n_models * n_fit * _SCORE_S_PER_CASE, "fine_tuning": finetune}
    est["total"] = sum(est.values())
    return est


def run_study(data_dir, out, config: StudyConfig | None = None, progress: bool = True, log=print) -> dict:
    """Run the four steps (module docstring) on the MSD task folders in ``data_dir``.

    Writes under ``out``: ``bank/`` (manifest, checkpoints, pretraining runs), ``scores/``
    (scores.csv/json), ``finetune/<model>/`` (runs) + ``finetune_dice.csv``, ``te_evaluation.json``
    / ``.csv``, ``scores_vs_dice.png`` and ``study.json`` (config, estimate, timings, result).
    Returns the ``study.json`` content.
    """
    from tqdm.auto import tqdm

    from medxfer.data.msd import load_task
    from medxfer.data.splits import apply_split, make_kfold_splits
    from medxfer.transfer.bank import ModelBank
    from medxfer.transfer.bank_build import build_ccfv_bank, source_tasks
    from medxfer.transferability.evaluate import evaluate_estimators, plot_scores, table_from_files, write_report
    from medxfer.transferability.features import SamplingConfig
    from medxfer.transferability.score import score_bank, write_scores
    from medxfer.workflows.bundle import quiet_logging_file, run_bundle
    from medxfer.workflows.msd_seg3d import task_plans

    config = config or StudyConfig()
    out, data_dir = Path(out), Path(data_dir)
    target_dir = data_dir / config.target
    target = load_task(target_dir)
    sources = [p for p in source_tasks(data_dir, config.target) if load_task(p).num_channels == target.num_channels
               and (config.sources is None or p.name in config.sources)]
    n_source_cases = min(len(load_task(p).training) for p in sources) if sources else 0
    estimate = estimate_seconds(config, len(sources), n_source_cases, len(target.training))
    log(f"CC-FV study: target {target.root.name}, {len(sources)} source task(s) x {list(config.archs)} + scratch "
        f"= {(len(sources) + 1) * len(config.archs)} models; estimated {estimate['total'] / 60:.1f} min "
        f"(planning {estimate['planning']:.0f} s, pretraining {estimate['pretraining']:.0f} s, "
        f"scoring {estimate['scoring']:.0f} s, fine-tuning {estimate['fine_tuning']:.0f} s)")
    device = config.device
    timings: dict[str, float] = {}
    quiet = quiet_logging_file(out)  # the bundles' per-iteration logs would bury the study's progress

    t0 = time.perf_counter()
    log("[study 1/4] pretraining the leave-one-task-out bank")
    bank_config = {"archs": config.archs, "patch_size": config.patch_size, "epochs": config.pretrain_epochs,
                   "bank_epochs": [], "optimizer": "adamw", "learning_rate": config.learning_rate, "n_folds": 5,
                   "same_channels_only": True}
    task_plans(target_dir)  # plan the target once up front (the scorer and fine-tuning read it)
    build_ccfv_bank(data_dir, config.target, out / "bank", bank_config, device=device, seed=config.seed,
                    progress=progress, source_names=[p.name for p in sources], logging_file=quiet)
    timings["bank"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[study 2/4] scoring every bank model with every estimator (no fine-tuning)")
    splits = make_kfold_splits(target.training, n_folds=config.finetune_folds, seed=config.seed)
    fit_ids = [r["id"] for r in apply_split(target.training, splits, 0)[0]]
    plans = dict(task_plans(target_dir), patch_size=list(config.patch_size))
    rows = score_bank(out / "bank", target_dir, plans, config.estimators, SamplingConfig(seed=config.seed),
                      device=device, split_ids=fit_ids, progress=progress, seed=config.seed)
    write_scores(rows, out / "scores", {"bank": str(out / "bank"), "target": target.root.name,
                                        "estimators": list(config.estimators), "cases": fit_ids})
    timings["scoring"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log("[study 3/4] fine-tuning every bank model on the target (all_but_head, same budget)")
    bank = ModelBank.open(out / "bank")
    dice_rows = []
    for name in tqdm(bank.names(), desc="fine-tuning bank models", disable=not progress):
        overrides = {"device": device} if device else {}
        wf = run_bundle("msd_seg3d", ["train", "adamw", "finetune"], data_root=str(target_dir),
                        bank_root=str(out / "bank"), bank_entry=name, transfer_mode="all_but_head",
                        output_dir=str(out / "finetune" / name), max_epochs=config.finetune_epochs,
                        val_interval=config.finetune_epochs, patch_size=list(config.patch_size),
                        n_folds=config.finetune_folds, seed=config.seed, learning_rate=config.learning_rate,
                        resume=False, logging_file=quiet, **overrides)
        dice = float(wf.parser.get_parsed_content("validate#evaluator").state.metrics.get("val_mean_dice", math.nan))
        dice_rows.append({"model": name, "dice": dice})
    (out / "finetune_dice.csv").write_text("model,dice\n" + "".join(f"{r['model']},{r['dice']}\n" for r in dice_rows))
    timings["fine_tuning"] = time.perf_counter() - t0

    log("[study 4/4] evaluating the estimators against the measured Dice")
    table = table_from_files(out / "scores" / "scores.json", out / "finetune_dice.csv")
    result = evaluate_estimators(table)
    write_report(result, out)
    plot_scores(table, out / "scores_vs_dice.png", result=result)
    ranking = sorted(result["estimators"], key=lambda e: (-_finite(result["mean"][e]["weighted_tau"]),
                                                          -_finite(result["mean"][e]["pearson"])))
    summary = {"config": asdict(config), "target": target.root.name, "sources": [p.name for p in sources],
               "estimate_s": estimate, "seconds": timings, "finetune_dice": dice_rows,
               "scores": [{k: v for k, v in r.items() if not k.startswith("seconds_") and k != "errors"} for r in rows],
               "evaluation": result["mean"], "best_estimator": ranking[0] if ranking else None,
               "ranking_by_weighted_tau": ranking,
               "scoring_over_finetuning_time": timings["scoring"] / timings["fine_tuning"] if timings["fine_tuning"] else None}
    (out / "study.json").write_text(json.dumps(_json_safe(summary), indent=2, default=str) + "\n")

    log(f"\nfine-tuned Dice on {target.root.name} (validation fold, final model):")
    for r in sorted(dice_rows, key=lambda r: -_finite(r["dice"])):
        log(f"  {r['model']:32s} {r['dice']:.3f}")
    log(f"\n{'estimator':15s} {'w. tau':>7s} {'pearson':>8s} {'spearman':>9s} {'TIS':>6s}  picked")
    per_target = result["per_target"][target.root.name]
    for e in ranking:
        m = per_target[e]
        log(f"{e:15s} {m['weighted_tau']:7.3f} {m['pearson']:8.3f} {m['spearman']:9.3f} {m['tis']:6.3f}  {m['picked']}")
    log(f"\nbest estimator on this generated target (weighted tau): {summary['best_estimator']} — one target and "
        f"{len(dice_rows)} models: a small sample, read it as such")
    return summary


def _finite(x) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf


def _json_safe(obj):
    """NaN / inf -> null, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
