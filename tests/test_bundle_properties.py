"""``bundles/msd_seg3d`` against MONAI's bundle conventions (issue 15, item 2): the properties MONAI
checks (``ConfigWorkflow(...).check_properties()``, :mod:`monai.bundle.properties`), ``dataset_dir``
as the data setting (``data_root`` / ``input_path`` still work), handler lists that MONAI Label can
iterate, and ``train#dataset#data`` overridable as MONAI Label overrides it.

One tiny spleen task (3 cases of 32x32x12 voxels) with hand-written plans (nnU-Net planning is
tested elsewhere), a small UNet, CPU, no workers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from bundle_cli import bundle_cli
from medxfer.data.synth.msd import generate_msd_task
from medxfer.workflows.bundle import bundle_dir, run_bundle

BUNDLE = bundle_dir("msd_seg3d")
CONFIGS = BUNDLE / "configs"
KW = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
PATCH = [16, 16, 8]
PLANS = {"task": "Task09_Spleen", "channels": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
         "target_spacing": [9.6, 9.6, 24.0], "patch_size": PATCH,
         "normalization": [{"channel": 0, "scheme": "CT", "clip": [-259.0, 147.0], "mean": 54.0, "std": 85.0}]}
FAST = {"num_workers": 0, "device": "cpu", "n_folds": 2, "batch_size": 1, "num_samples": 1, "arch_kwargs": KW}

#: train.yaml's handlers in order; the last three write files (rank 0 only under multi_gpu_train.yaml)
EVERY_RANK = ["StopOnNonFiniteLoss", "ResumeFromLatest", "LrScheduleHandler", "ValidationHandler", "StatsHandler"]
RANK0 = ["ResumableCheckpointSaver", "StepTimer", "FallbackModelSaver"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = generate_msd_task(tmp_path_factory.mktemp("bundle_props"), "spleen", num_training=3, shape=(32, 32, 12),
                             spacing=(9.6, 9.6, 24.0), num_test=1, seed=4)
    (root / "medxfer_plans.json").write_text(json.dumps(PLANS, indent=2))
    return root


@pytest.fixture(scope="module")
def trained(task, tmp_path_factory):
    """1 epoch with validation, the data named by ``dataset_dir`` (MONAI's property)."""
    out = tmp_path_factory.mktemp("bundle_props_run") / "run"
    wf = run_bundle("msd_seg3d", ["train"], dataset_dir=str(task), output_dir=str(out), max_epochs=1, val_interval=1, **FAST)
    return {"out": out, "workflow": wf}


def _workflow(configs: list[str], workflow_type: str | None, suffix: str = ".yaml", **override) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=[str(CONFIGS / f"{c}{suffix}") for c in configs],
                          meta_file=str(CONFIGS / "metadata.json"), workflow_type=workflow_type, bundle_root=str(BUNDLE),
                          **override)


def _names(objects) -> list[str]:
    return [type(o).__name__ for o in objects]


def _network(path) -> dict:
    ckpt = torch.load(path, weights_only=True)
    return ckpt.get("network", ckpt)


#: Regenerates the JSON twins (run in bundles/msd_seg3d; the docs/README.md says the same).
REGENERATE = ("python -c \"from pathlib import Path; from monai.bundle import ConfigParser as P; "
              "[P.export_config_file(P.load_config_file(f), f.with_suffix('.json'), indent=2) "
              "for f in Path('configs').glob('*.yaml')]\"")


def test_json_configs_equal_the_yaml_configs():
    """Every YAML config has its JSON twin (the zoo's format, what MONAI Label and ``monai.bundle.load``
    look for first) with the same content as MONAI reads it; the YAML, with its comments, is the source."""
    yaml_files = sorted(CONFIGS.glob("*.yaml"))
    assert {p.stem for p in yaml_files} >= {"train", "inference", "evaluate", "multi_gpu_train"}
    assert {p.stem for p in CONFIGS.glob("*.json")} - {"metadata"} == {p.stem for p in yaml_files}, REGENERATE
    for path in yaml_files:
        twin = path.with_suffix(".json")
        assert json.loads(twin.read_text()) == ConfigParser.load_config_file(path), f"{twin}: out of date; {REGENERATE}"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_train_config_passes_monai_train_property_check(task, tmp_path, suffix):
    wf = _workflow(["train"], "train", suffix, dataset_dir=str(task), output_dir=str(tmp_path / "run"), max_epochs=1, **FAST)
    wf.initialize()
    assert wf.check_properties() == []  # required ones present, optional ones under MONAI's ids
    assert wf.dataset_dir == str(task) and wf.parser.get_parsed_content("data_root") == str(task)
    assert wf.max_epochs == 1 and wf.trainer.state.max_epochs == 1
    assert _names(wf.train_handlers) == EVERY_RANK + RANK0
    assert _names(wf.val_handlers) == ["StatsHandler", "AtomicCheckpointSaver"]
    # the handlers the trainer runs are train#handlers (the property), not a copy
    assert wf.parser.get_parsed_content("train#trainer#train_handlers")[:len(wf.train_handlers)] == wf.train_handlers
    assert wf.evaluator is wf.parser.get_parsed_content("validate#evaluator")


@pytest.mark.parametrize("configs", [["train"], ["train", "multi_gpu_train"], ["train", "pretrain"],
                                     ["train", "finetune"], ["train", "evaluate"]])
def test_handler_lists_are_lists_of_handler_dicts(configs):
    """MONAI Label iterates ``train#handlers`` and calls ``.get("_target_")`` on each element;
    MONAI's property check reads ``h["_target_"]`` of each."""
    config = ConfigParser.load_config_files([str(CONFIGS / f"{c}.yaml") for c in configs])
    parser = ConfigParser(config)
    for key in ("train#handlers", "validate#handlers"):
        handlers = parser[key]
        assert isinstance(handlers, list) and handlers, key
        assert all(isinstance(h, dict) and isinstance(h.get("_target_"), str) for h in handlers), key
    targets = [h["_target_"].rsplit(".", 1)[-1] for h in parser["train#handlers"]]
    assert targets == EVERY_RANK + RANK0 + (["BankCheckpointer"] if "pretrain" in configs else [])
    # the writers, and only they, are switched off on the processes other than rank 0
    disabled = [h["_target_"].rsplit(".", 1)[-1] for h in parser["train#handlers"] if "_disabled_" in h]
    assert disabled == RANK0 + (["BankCheckpointer"] if "pretrain" in configs else [])


def test_non_rank0_processes_leave_the_file_writers_out(task, tmp_path):
    """``is_not_rank0`` (multi_gpu_train.yaml: ``dist.get_rank() > 0``) drops the disabled handlers
    from the instantiated lists (MONAI's ``_disabled_``), the pretraining bank writer included."""
    wf = _workflow(["train", "pretrain"], None, source_roots=[str(task)], bank_root=str(tmp_path / "bank"),
                   output_dir=str(tmp_path / "run"), is_not_rank0=True, **FAST)
    wf.initialize()
    assert _names(wf.parser.get_parsed_content("train#handlers")) == EVERY_RANK
    assert _names(wf.parser.get_parsed_content("validate#handlers")) == ["StatsHandler"]
    assert wf.parser.get_parsed_content("validate#best_saver") is None
    wf = _workflow(["train", "pretrain"], None, source_roots=[str(task)], bank_root=str(tmp_path / "bank"),
                   output_dir=str(tmp_path / "run0"), **FAST)
    wf.initialize()
    assert _names(wf.parser.get_parsed_content("train#handlers")) == EVERY_RANK + RANK0 + ["BankCheckpointer"]
    assert type(wf.parser.get_parsed_content("validate#best_saver")).__name__ == "AtomicCheckpointSaver"


def test_dataset_dir_and_data_root_train_the_same_model(task, trained, tmp_path):
    """The same 1-epoch training with ``--data_root`` (the documented command) as with
    ``dataset_dir``: identical weights and the same recorded data root."""
    out = tmp_path / "run"
    args = {"data_root": str(task), "output_dir": str(out), "max_epochs": 1, "val_interval": 1, **FAST}
    bundle_cli(BUNDLE, ["--config_file", "configs/train.yaml", "--bundle_root", ".",
                        *[a for k, v in args.items() for a in (f"--{k}", json.dumps(v) if isinstance(v, dict) else str(v))]],
               tmp_path)
    for name in ("model_final.pt", "model.pt"):
        a, b = _network(trained["out"] / name), _network(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    recorded = [json.loads((d / "run.json").read_text())["settings"]["data_root"] for d in (trained["out"], out)]
    assert recorded[0] == recorded[1] and Path(recorded[0]) == task.resolve()
    assert json.loads((out / "splits.json").read_text()) == json.loads((trained["out"] / "splits.json").read_text())


def test_train_dataset_data_override_trains_on_the_given_records(task, tmp_path):
    """MONAI Label's override: ``train#dataset#data`` = its own ``[{"image", "label"}]`` records."""
    case = json.loads((task / "dataset.json").read_text())["training"][0]
    records = [{"image": str(task / case["image"]), "label": str(task / case["label"])}]
    wf = _workflow(["train"], "train", dataset_dir=str(task), output_dir=str(tmp_path / "run"), max_epochs=1,
                   val_interval=5, **{**FAST, "train#dataset#data": records})
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.train_dataset_data == records and len(wf.train_dataset) == 1
    wf.run()
    assert wf.trainer.state.epoch_length == 1 and wf.trainer.state.iteration == 1  # batch 1: one step per record


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_inference_config_passes_monai_inference_property_check(task, trained, tmp_path, suffix):
    out = tmp_path / "pred"
    wf = _workflow(["inference"], "inference", suffix, model_dir=str(trained["out"]), dataset_dir=str(task),
                   output_dir=str(out), device="cpu", num_workers=0)
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.dataset_dir == str(task) and wf.parser.get_parsed_content("input_path") == str(task)
    test_images = [(task / p).resolve() for p in json.loads((task / "dataset.json").read_text())["test"]]
    assert [Path(r["image"]).resolve() for r in wf.dataset.data] == test_images
    assert isinstance(wf.network_def, torch.nn.Module)
    assert _names(wf.handlers) == ["CheckpointLoader", "StatsHandler"]


def test_inference_with_dataset_dir_writes_the_same_predictions_as_with_input_path(task, trained, tmp_path):
    preds = {}
    for key in ("dataset_dir", "input_path"):
        out = tmp_path / key
        run_bundle("msd_seg3d", ["inference"], model_dir=str(trained["out"]), output_dir=str(out), device="cpu",
                   num_workers=0, **{key: str(task)})
        files = sorted(out.glob("*_seg.nii.gz"))
        assert len(files) == len(json.loads((task / "dataset.json").read_text())["test"]), key
        preds[key] = {f.name: np.asarray(nib.load(f).dataobj) for f in files}
    assert preds["dataset_dir"].keys() == preds["input_path"].keys()
    assert all(np.array_equal(preds["dataset_dir"][n], preds["input_path"][n]) for n in preds["dataset_dir"])


def test_evaluate_reads_dataset_dir(task, trained, tmp_path):
    """evaluate.yaml takes the data folder from run.json, or from ``--dataset_dir`` / ``--data_root``."""
    copy = tmp_path / task.name
    shutil.copytree(task, copy)
    run = tmp_path / "run"
    shutil.copytree(trained["out"], run)
    wf = run_bundle("msd_seg3d", ["train", "evaluate"], output_dir=str(run), run=False, **FAST)
    assert Path(wf.parser.get_parsed_content("data_root")) == task.resolve()  # run.json's
    wf = run_bundle("msd_seg3d", ["train", "evaluate"], output_dir=str(run), dataset_dir=str(copy), run=False, **FAST)
    assert wf.parser.get_parsed_content("data_root") == str(copy)
