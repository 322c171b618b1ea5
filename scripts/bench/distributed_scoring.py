"""Benchmark of distributed scoring (issue 16): one bank scored by ``torchrun -m medxfer.cli rank`` with
1 and with 2 gloo ranks on CPU; prints JSON.

A generated spleen-like target (``--cases`` labelled cases) and ``--models`` seeded, untrained UNets
(every estimator). Reported per run: the scoring seconds ``score_into`` records in
``scores.state.json`` (after start-up and imports; what the split speeds up), the wall seconds of
the whole command, and the throughput in (model, case) pairs per scoring second. Runs: 1 rank x 1
thread, 1 rank x ``--ranks`` threads (the same cores used by one process), ``--ranks`` ranks x 1
thread. The N-rank scores must equal the 1-rank ones (checked, 1e-9; the 1 x N-thread run only to
1e-4: the thread count changes float32 rounding); ``speedup`` is
1-rank / N-rank scoring seconds, both with one thread per rank.

    python scripts/bench/distributed_scoring.py [--out runs/bench/distributed_scoring]   # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

PLANS = {"task": "Task09_Spleen", "target_spacing": [4.8, 4.8, 12.0], "patch_size": [32, 32, 16],
         "normalization": [{"channel": 0, "scheme": "CT", "clip": [-100.0, 200.0], "mean": 100.0, "std": 50.0}],
         "labels": {"0": "background", "1": "spleen"}, "channels": {"0": "CT"}}
UNET = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}


def _run(out: Path, bank: Path, task: Path, ranks: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "medxfer.cli", "rank", "--bank", str(bank), "--data", str(task), "--out", str(out),
               "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    state = json.loads((out / "scores.state.json").read_text())
    rows = json.loads((out / "scores.json").read_text())["rows"]
    return {"ranks": ranks, "threads_per_rank": threads, "scoring_s": state["seconds"], "wall_s": wall, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench/distributed_scoring")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from medxfer.data.synth.msd import generate_msd_task
    from medxfer.networks import build_network
    from medxfer.transfer.bank import ModelBank
    from medxfer.transferability.score import DEFAULT_ESTIMATORS

    root = Path(args.out)
    if root.exists():
        raise SystemExit(f"{root}: exists; choose another --out")
    task = generate_msd_task(root / "msd", "spleen", num_training=args.cases, num_test=0, seed=3, shape=(64, 64, 24),
                             spacing=(4.8, 4.8, 12.0))
    (task / "medxfer_plans.json").write_text(json.dumps(PLANS))
    bank = ModelBank.open(root / "bank", create=True)
    for i in range(args.models):
        torch.manual_seed(i)
        bank.add(f"unet_{i}", build_network("unet", 1, 2, PLANS["patch_size"], **UNET), arch="unet", arch_kwargs=UNET,
                 in_channels=1, out_channels=2, patch_size=PLANS["patch_size"], source=[f"Task{i:02d}_X"], epoch=1)

    runs = [_run(root / "r1_t1", root / "bank", task, 1, 1), _run(root / f"r1_t{args.ranks}", root / "bank", task, 1,
                                                                       args.ranks),
            _run(root / f"r{args.ranks}_t1", root / "bank", task, args.ranks, 1)]
    reference = runs[0]["rows"]
    # N ranks x 1 thread: the 1 x 1 scores to 1e-9; 1 rank x N threads only to float32 rounding (the
    # thread count changes how CPU convolutions sum, as tests/conftest.py notes)
    for run, tol in ((runs[2], 1e-9), (runs[1], 1e-4)):
        for a, b in zip(reference, run["rows"]):
            for name in DEFAULT_ESTIMATORS:
                assert math.isclose(a[name], b[name], rel_tol=tol, abs_tol=tol), (run["ranks"], a["model"], name)
    pairs = args.models * args.cases
    report = {"models": args.models, "cases": args.cases, "pairs": pairs, "cpu_count": os.cpu_count(),
              "load_average_1min": os.getloadavg()[0], "n_rank_scores_equal_one_rank_1e-9": True,
              "runs": [{k: v for k, v in r.items() if k != "rows"} | {"pairs_per_s": pairs / r["scoring_s"]}
                       for r in runs],
              "speedup": runs[0]["scoring_s"] / runs[2]["scoring_s"],
              "speedup_vs_one_rank_same_threads": runs[1]["scoring_s"] / runs[2]["scoring_s"]}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
