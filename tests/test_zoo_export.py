"""Self-contained model-zoo bundles exported from medxfer runs and bank entries (issue 15): the zoo's
rules (files, metadata schema, verify_net_in_out, ckpt_export, bundle properties), MONAI's client
``monai.bundle.load``, and predictions of the MONAI-only inference config equal to medxfer's own."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, load, verify_metadata, verify_net_in_out
from monai.data import load_net_with_metadata
from monai.inferers import SlidingWindowInferer
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.transforms import LoadImaged

from medxfer.cli import main
from medxfer.data.msd import load_task
from medxfer.networks import build_network
from medxfer.transfer.bank import ModelBank
from medxfer.workflows.bundle import run_bundle
from medxfer.workflows.zoo_export import (METADATA_SCHEMA, ZOO_FILE_LIMIT, export_bundle, export_program,
                                          source_from_bank, write_metadata_schema)

KW = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
FAST = {"num_workers": 0, "device": "cpu", "n_folds": 2, "batch_size": 1, "num_samples": 1}
REQUIRED = ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
            "configs/multi_gpu_train.json", "configs/logging.conf", "LICENSE", "models/model.pt", "docs/README.md",
            "docs/data_license.txt")


@pytest.fixture(scope="module")
def trained(study_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_export")
    task = shutil.copytree(study_data / "Task09_Spleen", root / "Task09_Spleen")
    out = root / "run"
    run_bundle("msd_seg3d", ["train"], data_root=str(task), output_dir=str(out), max_epochs=2, val_interval=1,
               arch_kwargs=KW, **FAST)
    return {"task": task, "run": out, "root": root}


@pytest.fixture(scope="module")
def exported(trained):
    out = trained["root"] / "bundle" / "spleen_unet"
    assert main(["export-bundle", "--run", str(trained["run"]), "--out", str(out), "--name", "spleen_unet"]) == 0
    return out


def _schema(tmp_path) -> Path:
    return write_metadata_schema(tmp_path / "meta_schema_20240725.json")


def test_exported_bundle_has_the_zoos_files_and_valid_metadata(exported, tmp_path):
    for rel in REQUIRED:
        assert (exported / rel).is_file(), rel
    assert (exported / "models" / "model.pt").stat().st_size < ZOO_FILE_LIMIT and not (exported / "large_files.yml").exists()
    meta = json.loads((exported / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, METADATA_SCHEMA)
    verify_metadata(meta_file=str(exported / "configs" / "metadata.json"), filepath=str(_schema(tmp_path)))
    assert set(meta["required_packages_version"]) == {"nibabel"}  # only packages on the index, no medxfer
    broken = dict(meta)
    del broken["network_data_format"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, METADATA_SCHEMA)
    cfg = (exported / "configs" / "inference.json").read_text()
    assert "medxfer" not in cfg  # MONAI only


def test_exported_bundle_passes_verify_net_in_out_ckpt_export_and_loads_in_monai(exported, tmp_path):
    cfg, meta = str(exported / "configs" / "inference.json"), str(exported / "configs" / "metadata.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, device="cpu")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(exported / "models" / "model.pt"),
                meta_file=meta, config_file=cfg, bundle_root=str(exported))
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    network = load("spleen_unet", bundle_dir=str(exported.parent), workflow_type="inference",
                   source="monaihosting")
    state = torch.load(exported / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.allclose(scripted(x), network.eval()(x), atol=1e-5)
    workflow = ConfigWorkflow(config_file=cfg, meta_file=meta, workflow_type="inference",
                              logging_file=str(exported / "configs" / "logging.conf"))
    workflow.initialize()
    assert not workflow.check_properties()  # every required inference property is defined
    data = json.loads(Path(cfg).read_text())
    del data["dataset_dir"]
    (tmp_path / "no_dataset_dir.json").write_text(json.dumps(data))
    incomplete = ConfigWorkflow(config_file=str(tmp_path / "no_dataset_dir.json"), meta_file=meta,
                                workflow_type="inference", logging_file=str(exported / "configs" / "logging.conf"))
    with pytest.raises(KeyError, match="dataset_dir"):  # the check can fail
        incomplete.initialize()
        incomplete.check_properties()


def test_monai_only_inference_equals_medxfers_own(trained, exported, tmp_path):
    task = load_task(trained["task"])
    images = tmp_path / "images"
    images.mkdir()
    for r in task.training[:2]:
        shutil.copy(r["image"], images / Path(r["image"]).name)
    run_bundle("msd_seg3d", ["inference"], model_dir=str(trained["run"]), input_path=str(images),
               output_dir=str(tmp_path / "medxfer_pred"), device="cpu")
    workflow = ConfigWorkflow(config_file=str(exported / "configs" / "inference.json"), workflow_type="inference",
                              bundle_root=str(exported), dataset_dir=str(images), output_dir=str(tmp_path / "zoo_pred"))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    for ours in sorted((tmp_path / "medxfer_pred").glob("*_seg.nii.gz")):
        theirs = tmp_path / "zoo_pred" / ours.name
        a, b = nib.load(ours), nib.load(theirs)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), ours.name
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


def test_a_swinunetr_bank_entry_exports_with_a_torch_export_program(tmp_path):
    bank = ModelBank.open(tmp_path / "bank", create=True)
    torch.manual_seed(0)
    net = build_network("swinunetr", 1, 2, [64, 32, 32], feature_size=12)
    plans_numbers = [{"channel": 0, "scheme": "CT", "clip": [-100.0, 200.0], "mean": 100.0, "std": 50.0}]
    bank.add("swin", net, arch="swinunetr", arch_kwargs={"feature_size": 12}, in_channels=1, out_channels=2,
             patch_size=[64, 32, 32], preprocessing={"kind": "target_plans", "target_spacing": [2.0, 2.0, 3.0],
                                                     "normalization": ["CT"], "normalization_numbers": plans_numbers})
    out = export_bundle(tmp_path / "swin_bundle", source_from_bank(tmp_path / "bank", "swin"))
    cfg, meta = str(out / "configs" / "inference.json"), str(out / "configs" / "metadata.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, device="cpu")
    scale = next(t for t in json.loads(Path(cfg).read_text())["preprocessing"]["transforms"]
                 if t["_target_"] == "ScaleIntensityRanged")
    assert (scale["a_min"], scale["a_max"], scale["b_min"], scale["b_max"]) == (-100.0, 200.0, -4.0, 2.0)
    program = torch.export.load(str(export_program(out)))
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        net.eval()
        assert torch.allclose(program.module()(x), net(x), atol=1e-4)


def test_exported_train_config_fine_tunes_from_the_bundles_weights_with_monai_only(trained, exported, tmp_path):
    cfg = exported / "configs" / "train.json"
    data = json.loads(cfg.read_text())
    assert "medxfer" not in cfg.read_text()
    assert isinstance(data["train"]["handlers"], list) and all(isinstance(h, dict) for h in data["train"]["handlers"])
    bundle = shutil.copytree(exported, tmp_path / "spleen_unet")
    # MONAI Label's bundle trainer overrides the training data like this
    records = [{"image": r["image"], "label": r["label"]} for r in load_task(trained["task"]).training[:3]]
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), workflow_type="train",
                              meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                              dataset_dir=str(trained["task"]), max_epochs=1, val_interval=1, num_samples=1,
                              **{"train#dataset#data": records})
    workflow.initialize()
    assert not workflow.check_properties()
    assert len(workflow.parser.get_parsed_content("train#dataset")) == 3
    start = torch.load(bundle / "models" / "model.pt", weights_only=True)
    loaded = {}
    workflow.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_STARTED, lambda engine: loaded.setdefault("first", {k: v.clone() for k, v in
                                                                        engine.network.state_dict().items()}))
    workflow.run()
    workflow.finalize()
    assert all(torch.equal(loaded["first"][k], v) for k, v in start.items())  # fine-tuning starts from model.pt
    assert (bundle / "models" / "model_finetuned.pt").is_file()


def test_weights_over_the_zoo_limit_are_listed_in_large_files_yml(trained, tmp_path, monkeypatch):
    import medxfer.workflows.zoo_export as zoo_export
    import yaml

    monkeypatch.setattr(zoo_export, "ZOO_FILE_LIMIT", 1024)  # the tiny UNet's weights are ~100 kB
    out = export_bundle(tmp_path / "big", zoo_export.source_from_run(trained["run"]))
    listed = yaml.safe_load((out / "large_files.yml").read_text())["large_files"]
    digest = __import__("hashlib").sha256((out / "models" / "model.pt").read_bytes()).hexdigest()
    assert listed == [{"path": "models/model.pt", "url": "", "hash_val": digest, "hash_type": "sha256"}]


def test_an_imported_zoo_bundle_entry_re_exports_with_its_own_transforms(tmp_path):
    from medxfer.data.synth.zoo_bundle import write_zoo_bundle
    from medxfer.transfer.bank_import import import_bundle

    write_zoo_bundle(tmp_path / "zoo", "segresnet", roi_size=(32, 32, 32), pixdim=(2.0, 2.0, 3.0))
    entry = import_bundle(tmp_path / "bank", tmp_path / "zoo", name="zoo_segresnet")
    out = export_bundle(tmp_path / "again", source_from_bank(tmp_path / "bank", "zoo_segresnet"))
    cfg = json.loads((out / "configs" / "inference.json").read_text())
    assert cfg["preprocessing"]["transforms"] == entry.preprocessing["transforms"]
    assert cfg["network_def"]["_target_"] == "SegResNet"
    verify_net_in_out(net_id="network_def", meta_file=str(out / "configs" / "metadata.json"),
                      config_file=str(out / "configs" / "inference.json"), device="cpu")


def test_exported_evaluate_config_reports_the_dice_of_model_pt_on_the_validation_cases(trained, exported, tmp_path):
    bundle = shutil.copytree(exported, tmp_path / "spleen_unet")
    configs = [str(bundle / "configs" / name) for name in ("train.json", "evaluate.json")]
    assert "medxfer" not in (bundle / "configs" / "evaluate.json").read_text()
    workflow = ConfigWorkflow(config_file=configs, workflow_type="eval", bundle_root=str(bundle),
                              dataset_dir=str(trained["task"]))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    rows = (bundle / "eval" / "val_mean_dice_raw.csv").read_text().strip().splitlines()
    assert rows[0].split(",")[0] == "filename"
    saved = {line.split(",")[0]: float(line.split(",")[-1]) for line in rows[1:]}
    # independently: model.pt through MONAI's sliding window on the same preprocessed validation cases
    parser = workflow.parser
    net = build_network("unet", 1, 2, [32, 32, 16], **KW).eval()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    inferer = SlidingWindowInferer(roi_size=parser["validate#inferer#roi_size"], sw_batch_size=2, overlap=0.5,
                                   mode="gaussian")
    cases = parser.get_parsed_content("validate#dataset")
    assert len(saved) == len(cases) >= 1
    for case in cases:
        with torch.no_grad():
            pred = inferer(case["image"][None], net).argmax(1, keepdim=True)
        dice = compute_dice(one_hot(pred, 2), one_hot(case["label"][None].long(), 2), include_background=False)
        name = Path(case["image"].meta["filename_or_obj"]).name.split(".")[0]
        key = next(k for k in saved if Path(k).name.split(".")[0] == name)
        assert saved[key] == pytest.approx(float(dice.mean()), abs=1e-4)
    name, value = (bundle / "eval" / "metrics.csv").read_text().strip().split(",")
    assert name == "val_mean_dice" and float(value) == pytest.approx(np.mean(list(saved.values())), abs=1e-6)


def test_exported_multi_gpu_config_trains_under_torchrun_with_two_gloo_processes(trained, exported, tmp_path):
    bundle = shutil.copytree(exported, tmp_path / "spleen_unet")
    configs = "['configs/train.json','configs/multi_gpu_train.json']"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle),
                           "--dataset_dir", str(trained["task"]), "--max_epochs", "1", "--val_interval", "1",
                           "--num_samples", "1"], cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(bundle / "models" / "model_finetuned.pt", weights_only=True)
    start = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(saved) == set(start)  # rank 0 saved the unwrapped network (no DDP "module." prefix)
    assert any(not torch.equal(saved[k], start[k]) for k in start)  # and it trained


def test_torchscript_with_embedded_configs_is_enough_to_run_inference_monai_deploy_style(trained, exported, tmp_path):
    """MONAI Deploy's bundle operator reads the TorchScript file only: the network plus the
    ``metadata.json`` / ``inference.json`` that ``ckpt_export`` embeds; it feeds its own loaded image
    to the config's preprocessing (load / save transforms left out) and the config's inferer."""
    cfg, meta = str(exported / "configs" / "inference.json"), str(exported / "configs" / "metadata.json")
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(exported / "models" / "model.pt"),
                meta_file=meta, config_file=cfg, bundle_root=str(exported))
    moved = tmp_path / "deploy" / "model.ts"  # nothing of the bundle folder is reachable from here
    moved.parent.mkdir()
    shutil.move(str(ts), moved)
    net, embedded_meta, extra = load_net_with_metadata(str(moved), more_extra_files=("inference.json",))
    assert embedded_meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    parser = ConfigParser(json.loads(extra["inference.json"]))
    steps = [t for t in parser["preprocessing"]["transforms"] if not t["_target_"].startswith("Load")]
    parser["preprocessing"]["transforms"] = steps
    post = [t for t in parser["postprocessing"]["transforms"] if not t["_target_"].startswith("Save")]
    parser["postprocessing"]["transforms"] = post
    preprocessing, inferer = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    images = tmp_path / "images"
    images.mkdir()
    image = Path(load_task(trained["task"]).training[0]["image"])
    shutil.copy(image, images / image.name)
    workflow = ConfigWorkflow(config_file=cfg, workflow_type="inference", bundle_root=str(exported),
                              dataset_dir=str(images), output_dir=str(tmp_path / "zoo_pred"))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    case = preprocessing(LoadImaged(keys="image", image_only=True)({"image": str(image)}))
    with torch.no_grad():
        case["pred"] = inferer(case["image"][None], net.eval())[0]
    mask = postprocessing(case)["pred"]
    theirs = np.asarray(nib.load(next((tmp_path / "zoo_pred").glob("*_seg.nii.gz"))).dataobj)
    assert np.array_equal(np.asarray(mask[0]).astype(np.uint8), theirs)
