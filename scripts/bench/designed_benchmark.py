"""Is the designed benchmark's ground truth trustworthy? (issue 18, item 2)

Generates the graded family (:func:`medxfer.data.synth.graded.generate_graded_family`), runs the
CC-FV study on it (:func:`medxfer.study.run_study`, preset ``configs/study_designed.yaml`` unless
``--preset``; resumable: run the same command again after a kill) and prints JSON with, per target:

- ``noise_ceiling``: mean weighted tau between two seeds' rankings (the study's; bar >= 0.8);
- ``spearman_vs_design``: Spearman of the mean fine-tuned Dice against the designed order (source
  distance in grades, the untrained model last; ties by design stay ties; bar >= 0.8);
- ``closest_vs_scratch``: the closest pretrained model's mean Dice minus the untrained one's, and
  both seed stds; ``beyond_seed_spread`` when the margin exceeds the sum of the two stds (the
  mean +- std bands do not overlap; our reading of "beyond the seed spread");
- every model's mean Dice and seed std, the mean within-model seed std against the std of the
  model means;
and the estimators' weighted tau (with the study's bootstrap intervals), the winner, wall times.

    .venv/bin/python scripts/bench/designed_benchmark.py --out runs/designed [--set seeds=5 ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from medxfer.data.synth.graded import FAMILY_FILE, generate_graded_family
from medxfer.study import load_preset, parse_overrides, run_study


def _source_of(model: str, tasks) -> str | None:
    return next((t for t in tasks if t in model), None)


def evaluate(design: dict, summary: dict, seed_csv: Path) -> dict:
    """The acceptance numbers of every target from the study's summary and per-seed Dice."""
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
        dice = {r["model"]: r["dice"] for r in rows}
        std = {r["model"]: r["dice_std"] for r in rows}
        models = sorted(dice, key=lambda m: (dist[m], m))
        rho = spearmanr([dice[m] for m in models], [-dist[m] for m in models]).statistic
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
            "models": [{"model": m, "distance": dist[m], "dice": dice[m], "seed_std": std[m],
                        "per_seed": per_seed.get(target, {}).get(m)} for m in models],
            "mean_seed_std": float(np.nanmean([std[m] for m in models])),
            "std_of_model_means": float(np.std([dice[m] for m in models])),
            "estimators_weighted_tau": {e: [s["weighted_tau"]["value"], s["weighted_tau"]["low"], s["weighted_tau"]["high"]]
                                        for e, s in stats["estimators"].items()},
        }
        out[target]["accepted"] = bool(out[target]["noise_ceiling"] >= 0.8 and rho >= 0.8 and beyond[closest])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/designed", help="data/ (the family) and study/ go here")
    ap.add_argument("--preset", default="designed", help="study preset (default configs/study_designed.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="StudyConfig override (YAML value)")
    ap.add_argument("--n-grades", type=int, default=5)
    ap.add_argument("--num-training", type=int, default=15)
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 32, 16])
    args = ap.parse_args(argv)

    out = Path(args.out)
    data = out / "data"
    config = load_preset(args.preset, parse_overrides(args.set))
    t0 = time.perf_counter()
    params = {"n_grades": args.n_grades, "num_training": args.num_training, "shape": list(args.shape)}
    old = json.loads((data / FAMILY_FILE).read_text()) if (data / FAMILY_FILE).is_file() else None
    if old is not None and all(old.get(k) == v for k, v in params.items()):
        design = old  # same family: keep the files, so the study resumes
    else:
        design = generate_graded_family(data, n_grades=args.n_grades, num_training=args.num_training,
                                        shape=tuple(args.shape), overwrite=True)
    t_gen = time.perf_counter() - t0
    summary = run_study(data, out / "study", config, progress=False, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    targets = evaluate(design, summary, out / "study" / "finetune_dice_seeds.csv")
    mean = summary["evaluation"]["mean"]
    report = {
        "design": {k: design[k] for k in ("lever", "n_grades", "num_training", "shape", "spacing", "tasks")},
        "config": {k: summary["config"][k] for k in ("archs", "patch_size", "pretrain_epochs", "finetune_epochs",
                                                     "finetune_folds", "seeds", "learning_rate", "workers")},
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
