"""Helpers the msd_seg3d configs call: races between processes, datalists, label spaces, defaults."""

import json
import multiprocessing as mp

import pytest
import torch

from medxfer.data.problems import DatasetError
from medxfer.data.splits import make_kfold_splits, save_splits
from medxfer.data.synth.msd import generate_msd_task
from medxfer.workflows import msd_seg3d as wf

TINY = dict(shape=(32, 32, 12), spacing=(9.6, 9.6, 24.0), num_test=1, seed=5)
PLANS = {"task": "Task09_Spleen", "target_spacing": [9.6, 9.6, 24.0], "patch_size": [40, 40, 12],
         "normalization": [{"channel": 0, "scheme": "CT", "clip": [-100.0, 200.0], "mean": 100.0, "std": 50.0}],
         "labels": {"0": "background", "1": "spleen"}, "channels": {"0": "CT"}}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    return {p: generate_msd_task(root, p, num_training=4, **TINY) for p in ("spleen", "liver", "pancreas")}


def _save(args):
    splits, path = args
    try:
        save_splits(splits, path)
        return "saved"
    except FileExistsError:
        return "exists"


def test_concurrent_split_saves_leave_exactly_one_complete_file(tmp_path):
    splits = make_kfold_splits([f"c{i}" for i in range(40)], n_folds=5, seed=0)
    path = tmp_path / "splits.json"
    with mp.get_context("fork").Pool(4) as pool:
        outcomes = pool.map(_save, [(splits, path)] * 8)
    assert outcomes.count("saved") == 1 and outcomes.count("exists") == 7
    assert json.loads(path.read_text()) == splits
    assert [p.name for p in tmp_path.iterdir()] == ["splits.json"]  # no temporary files left


def test_fold_datalists_uses_the_split_another_process_saved_first(tasks, tmp_path, monkeypatch):
    path = tmp_path / "splits.json"
    other = make_kfold_splits(wf.load_task(tasks["spleen"]).training, n_folds=2, seed=99)
    import medxfer.data.splits as splits_module

    real_save = splits_module.save_splits

    def save_after_other_rank(splits, p):
        real_save(other, p)  # the other rank wins the race between exists() and save
        return real_save(splits, p)

    monkeypatch.setattr(splits_module, "save_splits", save_after_other_rank)
    train, val = wf.fold_datalists(tasks["spleen"], fold=0, n_folds=2, seed=0, splits_file=path)
    assert sorted(r["id"] for r in val) == sorted(other[0]["val"])
    assert sorted(r["id"] for r in train) == sorted(other[0]["train"])


def test_task_plans_loads_plans_another_process_wrote_while_planning(tasks, monkeypatch):
    target = tasks["liver"] / "medxfer_plans.json"

    def plan_raced(data_root, out):
        out.write_text(json.dumps(PLANS))
        raise FileExistsError(f"{out}: plans exist (written meanwhile)")

    monkeypatch.setattr(wf, "plan_task", plan_raced)
    plans = wf.task_plans(tasks["liver"], arch="unet")
    assert plans["target_spacing"] == PLANS["target_spacing"]
    assert plans["patch_size"] == [48, 48, 16]  # rounded up to the UNet's multiple of 16
    target.unlink()


def test_task_plans_without_a_task_names_the_missing_plans_file(tmp_path):
    with pytest.raises(DatasetError, match="plans.json: plans file not found"):
        wf.task_plans(None, tmp_path / "plans.json")


def test_joint_label_space_of_two_tasks_concatenates_foreground_labels(tasks):
    joint = wf.joint_labels([tasks["liver"], tasks["pancreas"]])
    assert joint == {0: "background", 1: "Task03_Liver/liver", 2: "Task03_Liver/cancer",
                     3: "Task07_Pancreas/pancreas", 4: "Task07_Pancreas/cancer"}
    assert wf.joint_labels([tasks["liver"]]) == {0: "background", 1: "liver", 2: "cancer"}


def test_multi_task_datasets_map_labels_into_the_joint_space(tasks, tmp_path):
    for key in ("liver", "pancreas"):
        (tasks[key] / "medxfer_plans.json").write_text(json.dumps(dict(PLANS, task=tasks[key].name)))
    data = wf.source_datasets([tasks["liver"], tasks["pancreas"]], "eval", [32, 32, 16], n_folds=2, splits_dir=tmp_path)
    liver_vals = {int(v) for i in range(2) for v in torch.unique(data[i]["label"])}
    pancreas_vals = {int(v) for i in range(2, 4) for v in torch.unique(data[i]["label"])}
    assert liver_vals <= {0, 1, 2} and 1 in liver_vals
    assert pancreas_vals <= {0, 3, 4} and 3 in pancreas_vals
    summary = wf.sources_preprocessing([tasks["liver"], tasks["pancreas"]], [32, 32, 16])
    assert summary["patch_size"] == [32, 32, 16] and set(summary["tasks"]) == {"Task03_Liver", "Task07_Pancreas"}
    assert summary["tasks"]["Task03_Liver"]["normalization"] == ["CT"]
    for key in ("liver", "pancreas"):
        (tasks[key] / "medxfer_plans.json").unlink()


def test_inference_datalist_reads_a_task_a_folder_or_a_file_and_names_bad_input(tasks, tmp_path):
    from_task = wf.inference_datalist(tasks["spleen"])
    assert len(from_task) == 1 and from_task[0]["image"].endswith("spleen_5.nii.gz")
    folder = wf.inference_datalist(tasks["spleen"] / "imagesTr")  # the macOS ._ junk file is skipped
    assert len(folder) == 4 and not any("/._" in r["image"] for r in folder)
    assert wf.inference_datalist(folder[0]["image"]) == [folder[0]]
    with pytest.raises(DatasetError, match="input not found"):
        wf.inference_datalist(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no .nii"):
        wf.inference_datalist(tmp_path)


def test_cpu_runs_load_data_in_the_main_process():
    assert wf.default_num_workers("cpu") == 0
    assert wf.default_num_workers(torch.device("cpu")) == 0
