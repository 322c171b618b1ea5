"""Scoring a bank across processes with ``torchrun`` (issue 16, item 3): 2 gloo ranks on CPU give the
single process's scores, and a killed rank fails the whole run without a finished-looking result.

One tiny target (3 spleen cases of 32x32x12 voxels, hand-written plans) and three models (two UNets,
one UNETR): the 9 (model, case) pairs split 4 + 5, so ``unet_0`` is scored on rank 0 alone,
``unetr_2`` on rank 1 alone and ``unet_1`` on both (its features travel to rank 0). Every estimator.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle_cli import cache_env
from medxfer.cli import main
from medxfer.data.synth.msd import generate_msd_task
from medxfer.distributed import Group, split_range
from medxfer.networks.registry import build_network
from medxfer.transfer.bank import ModelBank
from medxfer.transferability.score import DEFAULT_ESTIMATORS, ROWS_DIR, STATE_FILE
from medxfer.workflows.bundle import bundle_dir

PLANS = {"task": "Task09_Spleen", "target_spacing": [9.6, 9.6, 24.0], "patch_size": [32, 32, 16],
         "normalization": [{"channel": 0, "scheme": "CT", "clip": [-100.0, 200.0], "mean": 100.0, "std": 50.0}],
         "labels": {"0": "background", "1": "spleen"}, "channels": {"0": "CT"}}
UNET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
UNETR = {"feature_size": 4, "hidden_size": 24, "mlp_dim": 48, "num_heads": 2}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

#: rank 1 dies (SIGKILL, as the OOM killer or a lost node would) when it starts its second model,
#: once rank 0 has finished its own model (its row is in scores.partial/), so the test is not a race
KILL_RANK1 = """
import os, signal, sys, time
from pathlib import Path
import medxfer.transferability.score as score
from medxfer.cli import main

if os.environ["RANK"] == "1":
    real, calls = score.sample_dataset, []
    row0 = Path(sys.argv[sys.argv.index("--out") + 1]) / score.ROWS_DIR / "unet_0.json"

    def sample_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            deadline = time.monotonic() + 120
            while not row0.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    score.sample_dataset = sample_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_score")
    task = generate_msd_task(root / "msd", "spleen", num_training=3, num_test=0, seed=2, shape=(32, 32, 12),
                             spacing=(9.6, 9.6, 24.0))
    (task / "medxfer_plans.json").write_text(json.dumps(PLANS))
    bank = ModelBank.open(root / "bank", create=True)
    for seed, (arch, kw, out) in enumerate([("unet", UNET, 3), ("unet", UNET, 2), ("unetr", UNETR, 2)]):
        torch.manual_seed(seed)
        bank.add(f"{arch}_{seed}", build_network(arch, 1, out, [32, 32, 16], **kw), arch=arch, arch_kwargs=kw,
                 in_channels=1, out_channels=out, patch_size=[32, 32, 16], source=[f"Task0{seed}_X"], epoch=1)
    ref = root / "single"
    assert main(_rank_args(root / "bank", task, ref)) == 0  # one process: the reference
    return {"root": root, "task": task, "bank": root / "bank", "reference": _rows(ref)}


def _rank_args(bank, task, out) -> list[str]:
    return ["rank", "--bank", str(bank), "--data", str(task), "--out", str(out), "--device", "cpu"]


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "scores.json").read_text())["rows"]


def _env(tmp: Path) -> dict:
    return {**cache_env(tmp), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_scores(rows: list[dict], reference: list[dict]) -> None:
    assert [r["model"] for r in rows] == [r["model"] for r in reference] == ["unet_0", "unet_1", "unetr_2"]
    for row, ref in zip(rows, reference):
        assert row["errors"] == ref["errors"] == {}
        for name in DEFAULT_ESTIMATORS:
            a, b = ref[name], row[name]
            assert math.isfinite(a) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), (row["model"], name, a, b)


def test_contiguous_shares_cover_the_pairs_once():
    shares = [split_range(9, Group(r, 2)) for r in range(2)]
    assert [list(s) for s in shares] == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert sorted(i for r in range(4) for i in split_range(10, Group(r, 4))) == list(range(10))
    assert list(split_range(5, Group())) == list(range(5))


def test_two_gloo_ranks_of_the_cli_and_of_the_bundle_score_as_one_process(setup, tmp_path):
    """``torchrun -m medxfer.cli rank`` (rendezvous at an explicit c10d endpoint, as across nodes) and
    the bundle's ``score`` config under ``torchrun --standalone``: the single process's scores."""
    out = tmp_path / "cli"
    rdzv = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_id", "test",
            "--rdzv_endpoint", f"127.0.0.1:{_free_port()}"]
    proc = subprocess.run([*TORCHRUN, *rdzv, "-m", "medxfer.cli", *_rank_args(setup["bank"], setup["task"], out)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_scores(_rows(out), setup["reference"])
    state = json.loads((out / STATE_FILE).read_text())
    assert state["done"] and state["ranks"] == 2
    assert proc.stdout.count("best model by this estimator") == 1  # rank 0 alone reports

    out = tmp_path / "bundle"
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle", "run",
                           "--config_file", "configs/score.yaml", "--bundle_root", ".", "--bank_root", str(setup["bank"]),
                           "--data_root", str(setup["task"]), "--output_dir", str(out), "--device", "cpu"],
                          cwd=bundle_dir("transferability"), env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_scores(_rows(out), setup["reference"])


def test_a_killed_rank_fails_the_run_without_a_finished_result_and_a_rerun_completes_it(setup, tmp_path):
    worker = tmp_path / "kill_rank1.py"
    worker.write_text(KILL_RANK1)
    out = tmp_path / "killed"
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node", "2", str(worker),
                           *_rank_args(setup["bank"], setup["task"], out)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # torchrun names the rank that died and how, or the survivor's collective failed first and it says so
    killed = "rank      : 1 (local_rank: 1)" in proc.stderr and "SIGKILL" in proc.stderr
    lost = "error: torchrun rank 0 of 2:" in proc.stderr and "another rank stopped" in proc.stderr
    assert "FAILED" in proc.stderr and (killed or lost), proc.stderr[-3000:]
    assert not (out / "scores.json").exists() and not (out / "scores.csv").exists()
    assert json.loads((out / STATE_FILE).read_text())["done"] is False
    # what rank 0 finished on its own (unet_0) was kept; a plain rerun scores the rest: the reference
    assert [p.name for p in (out / ROWS_DIR).iterdir()] == ["unet_0.json"]
    assert main(_rank_args(setup["bank"], setup["task"], out)) == 0
    assert_same_scores(_rows(out), setup["reference"])
    assert os.environ.get("WORLD_SIZE") is None  # the test process itself never joined a group
