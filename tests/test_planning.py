"""nnU-Net v2 planning -> medxfer plans: values checked against the data itself."""

import json

import nibabel as nib
import numpy as np
import pytest

from medxfer.data.msd import load_task
from medxfer.data.problems import DatasetError
from medxfer.data.synth.msd import generate_msd_task
from medxfer.planning import load_plans, plan_task


@pytest.fixture(scope="module")
def spleen_plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    task = generate_msd_task(root / "msd", "spleen", num_training=3, num_test=1, seed=2)
    return task, plan_task(task, out=root / "plans.json"), root / "plans.json"


@pytest.mark.slow
def test_ct_plans_match_median_spacing_and_foreground_intensity_statistics(spleen_plans):
    task_dir, plans, path = spleen_plans
    task = load_task(task_dir)
    zooms = np.array([sorted(nib.load(r["image"]).header.get_zooms()[:3]) for r in task.training])
    # anisotropy 12 / 4.8 < 3: nnU-Net uses the median spacing on every axis
    assert sorted(plans["target_spacing"]) == pytest.approx(np.median(zooms, axis=0), rel=1e-5)
    assert plans["target_spacing"][2] == pytest.approx(12.0)  # file axis k is the slice axis
    fg = np.concatenate([np.asanyarray(nib.load(r["image"]).dataobj)[np.asanyarray(nib.load(r["label"]).dataobj) > 0]
                         for r in task.training]).astype(np.float64)
    norm = plans["normalization"][0]
    assert norm["scheme"] == "CT" and norm["name"] == "CT"
    # nnU-Net samples foreground voxels with replacement: statistics agree within sampling error
    assert norm["mean"] == pytest.approx(fg.mean(), abs=1.0)
    assert norm["std"] == pytest.approx(fg.std(), abs=1.0)
    assert norm["clip"][0] == pytest.approx(np.percentile(fg, 0.5), abs=3.0)
    assert norm["clip"][1] == pytest.approx(np.percentile(fg, 99.5), abs=3.0)
    assert len(plans["patch_size"]) == 3 and all(p % 8 == 0 or p == plans["patch_size"][2] for p in plans["patch_size"])
    assert plans["labels"] == {"0": "background", "1": "spleen"}
    assert json.loads(path.read_text()) == plans
    assert (path.parent / "plans.nnUNetPlans.json").is_file()
    assert load_plans(path) == plans


@pytest.mark.slow
def test_existing_plans_are_not_replaced_silently(spleen_plans, tmp_path):
    task_dir, _, path = spleen_plans
    with pytest.raises(FileExistsError, match="plans.json"):
        plan_task(task_dir, out=path)


@pytest.mark.slow
def test_4d_mr_task_gets_per_channel_zscore(tmp_path):
    task = generate_msd_task(tmp_path / "msd", "prostate", num_training=3, num_test=0, seed=3)
    plans = plan_task(task, out=tmp_path / "plans.json", verify=False)
    assert [n["name"] for n in plans["normalization"]] == ["T2", "ADC"]
    assert all(n["scheme"] == "zscore" for n in plans["normalization"])
    assert plans["target_spacing"][2] == pytest.approx(8.4, rel=1e-5)


def test_bad_plans_files_name_the_file_and_the_problem(tmp_path):
    path = tmp_path / "plans.json"
    with pytest.raises(DatasetError, match="plans.json: plans file not found"):
        load_plans(path)
    path.write_text(json.dumps({"target_spacing": [1, 1], "patch_size": [64, 64, 32], "normalization": []}))
    with pytest.raises(DatasetError, match="same length"):
        load_plans(path)
    path.write_text(json.dumps({"target_spacing": [1, 1, 0], "patch_size": [64, 64, 32], "normalization": []}))
    with pytest.raises(DatasetError, match="> 0 mm"):
        load_plans(path)
