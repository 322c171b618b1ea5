"""Benchmark of transferability scoring (SPEC section 5); prints JSON.

On the bank of a finished CC-FV study (``medxfer demo`` writes one to ``runs/demo/study``; the
study is run here first if the folder is missing), all in one process:

1. **scoring**: seconds to score every bank model with every estimator (``score_bank``), split
   into the forward passes (window pass + hooks + sampling) and the estimator math;
   (robustness, which needs its own forward passes of jittered views, is counted in the math);
2. **bare forward**: seconds of plain ``network(window)`` calls over exactly the same windows of
   the same cases, no hooks, no sampling -> ``scoring_forward_over_bare`` (target <= 1.3);
3. **W2**: CC-FV's exact batched W2 versus the per-pair ``scipy.linalg.sqrtm`` closed form on the
   same class-wise voxel features with d = 256 (the deepest decoder stage of a UNETR with
   feature size 32 on the target cases) -> speed-up (target >= 10x) and the largest relative
   difference;
4. **scoring vs fine-tuning**: scoring time over the time the study spent fine-tuning the same
   bank (measured, short CPU budget), and extrapolated to the CC-FV paper's fine-tuning budget
   (100k iterations per model) from the measured seconds per iteration (target <= 1%).

    python scripts/bench/transferability.py [--study runs/demo/study] [--out runs/bench/transferability]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def bare_forward_seconds(bank_root, cases, entries, sw_batch_size: int = 2) -> dict[str, float]:
    """Plain forward passes over the windows ``sample_case`` runs (every window of every case).
    ``cases``: the cases every entry sees, or ``{entry: its cases}`` (entries with their own
    preprocessing, ``scripts/bench/mixed_bank.py``)."""
    from medxfer.networks.registry import build_network
    from medxfer.transfer.bank import ModelBank
    from medxfer.transferability.features import window_starts

    bank = ModelBank.open(bank_root)
    out = {}
    for name in entries:
        e = bank.get(name)
        net = build_network(e.arch, e.in_channels, e.out_channels, e.patch_size, **e.arch_kwargs).eval()
        net.load_state_dict(bank.load_state_dict(name))
        t0 = time.perf_counter()
        with torch.no_grad():
            for case in (cases[name] if isinstance(cases, dict) else cases):
                image = torch.as_tensor(case["image"])
                pad = [max(0, r - s) for r, s in zip(e.patch_size, image.shape[1:])]
                if any(pad):
                    image = torch.nn.functional.pad(image, [p for q in reversed(pad) for p in (0, q)])
                starts = list(itertools.product(*[window_starts(s, r) for s, r in zip(image.shape[1:], e.patch_size)]))
                for b in range(0, len(starts), sw_batch_size):
                    crops = [image[(slice(None), *[slice(s, s + r) for s, r in zip(st, e.patch_size)])]
                             for st in starts[b:b + sw_batch_size]]
                    net(torch.stack(crops))
        out[name] = time.perf_counter() - t0
    return out


def w2_benchmark(cases_pre, seed: int = 0, max_per_class: int = 400) -> dict:
    """Fast batched W2 vs per-pair sqrtm on class-wise samples of a d=256 decoder stage."""
    from medxfer.networks.registry import arch_layout, build_network
    from medxfer.transferability.ccfv import w2_distance_matrix, w2_squared
    from medxfer.transferability.features import SamplingConfig, sample_dataset

    torch.manual_seed(seed)
    roi = [48, 48, 16]
    net = build_network("unetr", 1, 2, roi, feature_size=32, hidden_size=192, mlp_dim=384, num_heads=4).eval()
    stage = arch_layout("unetr", net).decoder_stages[0]  # decoder5: 8 * feature_size = 256 channels
    # every foreground voxel up to 400 per case: n >= d where the organ is large enough, n < d otherwise
    feats = sample_dataset(net, [stage], cases_pre, roi, SamplingConfig(ratio=1.0, max_per_class=max_per_class, variety_samples=0),
                           progress=False)
    samples = [c.levels[0][(c.labels == 1) & ~c.variety].astype(np.float64) for c in feats]
    samples = [s for s in samples if len(s) >= 2]
    d = samples[0].shape[1]
    t0 = time.perf_counter()
    fast = w2_distance_matrix(samples)
    t_fast = time.perf_counter() - t0
    means = [s.mean(0) for s in samples]
    covs = [np.cov(s, rowvar=False) for s in samples]
    slow = np.zeros_like(fast)
    t0 = time.perf_counter()
    for i, j in itertools.combinations(range(len(samples)), 2):
        slow[i, j] = slow[j, i] = np.sqrt(max(w2_squared(means[i], covs[i], means[j], covs[j]), 0.0))
    t_slow = time.perf_counter() - t0
    mask = ~np.eye(len(samples), dtype=bool)
    return {"d": int(d), "cases": len(samples), "pairs": len(samples) * (len(samples) - 1) // 2,
            "samples_per_case": [int(len(s)) for s in samples], "fast_s": t_fast, "sqrtm_per_pair_s": t_slow,
            "speedup": t_slow / t_fast, "max_rel_diff": float(np.max(np.abs(fast[mask] - slow[mask]) / np.abs(slow[mask])))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default="runs/demo/study", help="folder of a finished CC-FV study (medxfer demo)")
    p.add_argument("--data", default="runs/demo/data/msd", help="the study's MSD folder (used if the study must run)")
    p.add_argument("--out", default="runs/bench/transferability")
    p.add_argument("--paper-iterations", type=int, default=100_000, help="CC-FV paper's fine-tuning iterations per model")
    args = p.parse_args(argv)

    from medxfer.study import StudyConfig, run_study
    from medxfer.transferability.features import SamplingConfig
    from medxfer.transferability.score import score_bank, target_cases
    from medxfer.workflows.msd_seg3d import task_plans

    study = Path(args.study)
    if not (study / "study.json").is_file():
        print(f"no finished study in {study}: running it (about 10 min)", file=sys.stderr)
        if not Path(args.data).is_dir():
            from medxfer.data.synth.msd import generate_msd
            generate_msd(args.data, num_training=6, seed=0)
        run_study(args.data, study, StudyConfig())
    meta = json.loads((study / "study.json").read_text())
    config = meta["config"]
    bank = study / "bank"
    data_dir = Path(json.loads((bank / "build_summary.json").read_text())["data_dir"])
    t_score = t_forward = t_math = t_robust = t_bare = 0.0
    per_model, s_per_it, w2_cases = [], [], None
    for target in meta["targets"]:
        scores_meta = json.loads((study / "scores" / target / "scores.json").read_text())["meta"]
        entries = [r["model"] for r in json.loads((study / "scores" / target / "scores.json").read_text())["rows"]]
        target_dir = data_dir / target
        plans = dict(task_plans(target_dir), patch_size=config["patch_size"])
        ids = scores_meta["cases"]
        t0 = time.perf_counter()
        rows = score_bank(bank, target_dir, plans, config["estimators"], SamplingConfig(seed=config["seed"]),
                          entries=entries, device="cpu", split_ids=ids, progress=False, seed=config["seed"])
        t_score += time.perf_counter() - t0
        bare = bare_forward_seconds(bank, target_cases(target_dir, plans, split_ids=ids), entries)
        t_bare += sum(bare.values())
        t_forward += sum(r["seconds_forward"] for r in rows)
        t_math += sum(r["seconds_estimators"] for r in rows)
        t_robust += sum(r.get("seconds_robustness", 0.0) for r in rows)
        per_model += [{"target": target, "model": r["model"], "forward_s": r["seconds_forward"],
                       "bare_forward_s": bare[r["model"]], "ratio": r["seconds_forward"] / bare[r["model"]],
                       "estimators_s": r["seconds_estimators"],
                       **{f"{e}_s": r[f"seconds_{e}"] for e in config["estimators"]}} for r in rows]
        for name in entries:  # fine-tuning of the same models in the study: measured seconds per iteration
            timing = study / "finetune" / target / name / "step_times.json"
            if timing.is_file():
                s_per_it.append(json.loads(timing.read_text())["seconds_per_iteration"])
        if w2_cases is None:
            w2_cases = target_cases(target_dir, plans)  # every labelled case of the first target: more pairs
    ft_wall = meta["seconds"]["fine_tuning"]
    paper_ft = sum(s_per_it) * args.paper_iterations
    result = {
        "benchmark": "transferability", "device": "cpu", "torch_threads": torch.get_num_threads(),
        "targets": meta["targets"], "models_scored": len(per_model), "estimators": config["estimators"],
        "scoring_s": t_score, "scoring_forward_s": t_forward, "estimator_math_s": t_math,
        "estimator_math_without_robustness_s": t_math - t_robust,
        "bare_forward_s": t_bare, "scoring_forward_over_bare": t_forward / t_bare,
        "scoring_total_over_bare": t_score / t_bare,
        "per_model": per_model,
        # n >= d (400 samples, QR path) and n < d (64, Gram path)
        "w2": w2_benchmark(w2_cases),
        "w2_n_lt_d": w2_benchmark(w2_cases, max_per_class=64),
        "finetune_measured_s": ft_wall, "finetune_epochs": config["finetune_epochs"],
        "scoring_over_finetune_measured": t_score / ft_wall,
        "finetune_paper_budget_s_extrapolated": paper_ft,
        "scoring_over_finetune_paper_budget": t_score / paper_ft if paper_ft else None,
    }
    result["checks"] = {"scoring forward / bare <= 1.3": result["scoring_forward_over_bare"] <= 1.3,
                        "W2 speed-up >= 10x at d=256": min(result["w2"]["speedup"], result["w2_n_lt_d"]["speedup"]) >= 10,
                        "scoring / fine-tuning <= 1% (paper budget)": (result["scoring_over_finetune_paper_budget"] or 1) <= 0.01,
                        "scoring / fine-tuning <= 1% (measured short CPU budget)": result["scoring_over_finetune_measured"] <= 0.01}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    (out / "result.json").write_text(text + "\n")
    with open(out / "per_model.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_model[0]))
        writer.writeheader()
        writer.writerows(per_model)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
