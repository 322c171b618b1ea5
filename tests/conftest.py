"""Shared fixtures: caches in temporary folders, generated datasets made once per session."""

import os
import tempfile

# Caches (matplotlib, torch, pip, ...) must not land in the home directory (SPEC section 11).
_cache = tempfile.mkdtemp(prefix="medxfer-test-cache-")
for var in ("MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME"):
    os.environ.setdefault(var, os.path.join(_cache, var.lower()))
os.environ.setdefault("MPLBACKEND", "Agg")
# One compute thread (also in the subprocesses the tests start): the tests' networks are tiny, so
# thread start-up dominates; measured on 2 shared cores, tests/test_faults_training.py +
# tests/test_score_regression.py took 29 s with the default and 24 s with one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def msd_root(tmp_path_factory):
    """Every MSD profile, 3 training + 1 test case each (seed 0). Do not modify: copy first."""
    from medxfer.data.synth.msd import generate_msd

    root = tmp_path_factory.mktemp("msd")
    generate_msd(root, num_training=3, num_test=1, seed=0)
    return root


@pytest.fixture(scope="session")
def isic_roots(tmp_path_factory):
    """ISIC 2018 and 2017 folders, 12 images each (seed 0). Do not modify: copy first."""
    from medxfer.data.synth.isic import generate_isic

    return {year: generate_isic(tmp_path_factory.mktemp(f"isic{year}"), year=year, num_images=12, seed=0)
            for year in (2018, 2017)}


#: Volumes of the quick CC-FV study's data (tests/test_study.py, tests/test_faults_resume.py).
STUDY_TINY = dict(shape=(32, 32, 12), spacing=(9.6, 9.6, 24.0), num_test=0, seed=4)


@pytest.fixture(scope="session")
def study_data(tmp_path_factory):
    """Planned tiny MSD tasks for the quick study: spleen (the target, 6 cases), liver and lung
    (3 cases), prostate (2 channels: never a source for the 1-channel target). Planning is the slow
    part, so it runs once per session: the spleen task with nnU-Net, and liver and lung reuse its
    plans (same generator grid; task and labels adapted, as a user would edit them). Plans live in
    each task folder (``medxfer_plans.json``): copy the folder (``shutil.copytree``) to get planned
    tasks. Do not modify."""
    import json

    from medxfer.data.msd import load_task
    from medxfer.data.synth.msd import generate_msd_task
    from medxfer.workflows.msd_seg3d import task_plans

    data = tmp_path_factory.mktemp("study_data") / "msd"
    spleen = generate_msd_task(data, "spleen", num_training=6, **STUDY_TINY)
    for profile in ("liver", "lung", "prostate"):
        generate_msd_task(data, profile, num_training=3, **STUDY_TINY)
    plans = task_plans(spleen)
    for name in ("Task03_Liver", "Task06_Lung"):
        task = load_task(data / name)
        edited = dict(plans, task=name, source=str(task.root), labels={str(k): v for k, v in task.labels.items()})
        (task.root / "medxfer_plans.json").write_text(json.dumps(edited, indent=2) + "\n")
    return data


@pytest.fixture(scope="session")
def quick_study(study_data, tmp_path_factory):
    """The quick-preset study (``StudyConfig.quick()``, CPU, one torch thread) run once,
    uninterrupted, on a copy of ``study_data``: ``{"data", "out", "config", "summary", "log"}``.
    The reference the resume tests compare with: they run the study with one thread too (the
    thread count changes the last bits of CPU convolutions; one thread is also several times
    faster on a shared, loaded 2-core machine). Do not modify."""
    import shutil

    import torch

    from medxfer.study import StudyConfig, run_study

    root = tmp_path_factory.mktemp("quick_study")
    shutil.copytree(study_data, root / "msd")
    config = StudyConfig.quick()
    config.device = "cpu"
    log: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_study(root / "msd", root / "study", config, progress=False, log=log.append)
    finally:
        torch.set_num_threads(threads)
    return {"data": root / "msd", "out": root / "study", "config": config, "summary": summary, "log": log}


@pytest.fixture(scope="session")
def nnunet_model(tmp_path_factory):
    """``{"folder": trainer folder, "task": generated MSD task, "preprocessed": nnU-Net's preprocessed
    cases of the configuration, "plans", "dataset_json", "seconds"}``; made once per session by
    :func:`tiny_nnunet_model` (nnU-Net's converter, planner, preprocessor and plain trainer). Do not modify."""
    import json
    import time

    from medxfer.planning.nnunet_model import tiny_nnunet_model

    root = tmp_path_factory.mktemp("nnunet_model")
    start = time.perf_counter()
    folder = tiny_nnunet_model(root)
    seconds = time.perf_counter() - start
    plans = json.loads((folder / "plans.json").read_text())
    out_dir = folder.parents[2]
    pre = out_dir / "nnUNet_preprocessed" / folder.parent.name / plans["configurations"]["3d_fullres"]["data_identifier"]
    return {"folder": folder, "task": root / "msd" / "Task09_Spleen", "preprocessed": pre, "plans": plans,
            "dataset_json": json.loads((folder / "dataset.json").read_text()), "seconds": seconds, "out_dir": out_dir}
