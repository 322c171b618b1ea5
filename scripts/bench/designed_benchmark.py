"""Is the designed benchmark's ground truth trustworthy? (issue 18, item 2)

Generates the graded family (:func:`medxfer.data.synth.graded.generate_graded_family`), runs the
CC-FV study on it (:func:`medxfer.study.run_study`, preset ``configs/study_designed.yaml`` unless
``--preset``; resumable: run the same command again after a kill) and prints JSON with, per target:

- ``noise_ceiling``: mean weighted tau between two seeds' rankings (the study's; bar >= 0.8);
- ``spearman_vs_design``: Spearman of the mean fine-tuned Dice against the designed order (source
  distance in grades, then longer pretraining, the untrained model last; ties by design stay ties; bar >= 0.8);
- ``closest_vs_scratch``: the first model of the designed order's mean Dice minus the untrained one's, and
  both seed stds; ``beyond_seed_spread`` when the margin exceeds the sum of the two stds (the
  mean +- std bands do not overlap; our reading of "beyond the seed spread");
- every model's mean Dice and seed std, the mean within-model seed std against the std of the
  model means;
and the estimators' weighted tau (with the study's bootstrap intervals), the winner, wall times.

    .venv/bin/python scripts/bench/designed_benchmark.py --out runs/designed [--set seeds=5 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from medxfer.data.synth.graded import FAMILY_FILE, generate_graded_family
from medxfer.study import design_check, load_preset, parse_overrides, run_study


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/designed", help="data/ (the family) and study/ go here")
    ap.add_argument("--preset", default="designed", help="study preset (default configs/study_designed.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="StudyConfig override (YAML value)")
    ap.add_argument("--n-grades", type=int, help="default: the preset's `generated`")
    ap.add_argument("--num-training", type=int, help="default: the preset's `generated`")
    ap.add_argument("--shape", type=int, nargs=3, help="default: the preset's `generated`")
    args = ap.parse_args(argv)

    out = Path(args.out)
    data = out / "data"
    config = load_preset(args.preset, parse_overrides(args.set))
    t0 = time.perf_counter()
    params = {"seed": config.seed, **(config.generated or {})}
    for key in ("n_grades", "num_training", "shape"):
        if getattr(args, key) is not None:
            params[key] = list(getattr(args, key)) if key == "shape" else getattr(args, key)
    old = json.loads((data / FAMILY_FILE).read_text()) if (data / FAMILY_FILE).is_file() else None
    if old is not None and all(old.get(k) == v for k, v in params.items()):
        design = old  # same family: keep the files, so the study resumes
    else:
        design = generate_graded_family(data, overwrite=True, **params)
    t_gen = time.perf_counter() - t0
    summary = run_study(data, out / "study", config, progress=False, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    targets = design_check(design, summary, out / "study" / "finetune_dice_seeds.csv")
    mean = summary["evaluation"]["mean"]
    report = {
        "design": {k: design[k] for k in ("lever", "n_grades", "num_training", "shape", "spacing", "tasks")},
        "config": {k: summary["config"][k] for k in ("archs", "patch_size", "pretrain_epochs", "bank_epochs",
                                                     "finetune_epochs", "finetune_folds", "seeds", "learning_rate",
                                                     "pretrain_learning_rate", "transfer_mode", "workers")},
        "targets": targets,
        "accepted_on_every_target": all(t["accepted"] for t in targets.values()),
        "estimators_mean": {e: {m: mean[e][m] for m in ("weighted_tau", "pearson", "spearman", "tis")}
                            for e in summary["ranking_by_weighted_tau"]},
        "best_estimator": summary["best_estimator"],
        "ranking_by_weighted_tau": summary["ranking_by_weighted_tau"],
        "seconds": {"generate": t_gen, "wall": wall, "estimate": summary["estimate_s"]["total"], **summary["seconds"]},
    }
    text = json.dumps(report, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    (out / "designed_benchmark.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
