"""One bank of every kind (issue 14 acceptance): three zoo-layout bundles (UNet, SegResNet, SwinUNETR),
an nnU-Net v2 model trained by nnU-Net itself, a plain checkpoint; ranked by ``medxfer rank`` with
every estimator; one entry of each kind fine-tuned through ``bundles/msd_seg3d``; nnU-Net entries see
exactly nnU-Net's own preprocessed cases."""

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from medxfer.cli import main
from medxfer.data.msd import load_task
from medxfer.data.synth.zoo_bundle import write_zoo_bundle
from medxfer.networks import build_network
from medxfer.transfer.bank import ModelBank
from medxfer.transfer.bank_import import import_bundle, import_checkpoint, import_nnunet
from medxfer.transferability.score import DEFAULT_ESTIMATORS, prepare_cases
from medxfer.transforms.preprocessing import entry_transforms
from medxfer.workflows.bundle import run_bundle

PIXDIM = (9.6, 9.6, 12.0)
UNET_KW = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
FAST = {"num_workers": 0, "device": "cpu", "n_folds": 2, "batch_size": 1, "num_samples": 1, "max_epochs": 1,
        "val_interval": 1}


@pytest.fixture(scope="module")
def mixed_bank(tmp_path_factory, nnunet_model):
    root = tmp_path_factory.mktemp("mixed")
    bank = root / "bank"
    for i, (net, roi) in enumerate((("unet", [32, 32, 32]), ("segresnet", [32, 32, 32]), ("swinunetr", [64, 32, 32]))):
        write_zoo_bundle(root / f"zoo_{net}", net, out_channels=2, roi_size=roi, pixdim=PIXDIM, seed=i)
        assert main(["bank", "import", str(bank), "bundle", str(root / f"zoo_{net}"), "--name", f"zoo_{net}"]) == 0
    assert main(["bank", "import", str(bank), "nnunet", str(nnunet_model["folder"]), "--name", "nnunet_spleen"]) == 0
    torch.manual_seed(7)
    torch.save(build_network("unet", 1, 3, [16, 16, 16], **UNET_KW).state_dict(), root / "published.pt")
    import_checkpoint(bank, root / "published.pt", "unet", UNET_KW, name="published_unet", patch_size=[32, 32, 16],
                      url="https://example.org/published.pt")
    return bank


def test_every_kind_in_one_bank_is_ranked_by_every_estimator(mixed_bank, study_data, tmp_path, capsys):
    bank = ModelBank.open(mixed_bank)
    kinds = {e.name: (e.provenance["kind"], e.preprocessing_kind) for e in bank}
    assert kinds == {"zoo_unet": ("bundle", "monai"), "zoo_segresnet": ("bundle", "monai"),
                     "zoo_swinunetr": ("bundle", "monai"), "nnunet_spleen": ("nnunet", "nnunet"),
                     "published_unet": ("checkpoint", "target_plans")}
    assert main(["bank", "list", str(mixed_bank)]) == 0
    out = tmp_path / "rank"
    assert main(["rank", "--bank", str(mixed_bank), "--data", str(study_data / "Task09_Spleen"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in DEFAULT_ESTIMATORS)
    with open(out / "scores.csv") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(kinds)
    for name, row in rows.items():
        for estimator in DEFAULT_ESTIMATORS:
            assert row[estimator] != "" and math.isfinite(float(row[estimator])), (name, estimator, row)
    # each distinct preprocessing gave its own features: the zoo models' CC-FV differs from the others'
    # (and the three bundles share one preprocessing, prepared once)
    assert len({rows[n]["ccfv"] for n in rows}) == len(rows)


def test_an_nnunet_entry_sees_exactly_nnunets_own_preprocessed_cases(mixed_bank, nnunet_model):
    entry = ModelBank.open(mixed_bank).get("nnunet_spleen")
    task = load_task(nnunet_model["task"])
    cases = prepare_cases(task.training, entry_transforms(entry.preprocessing, None, "eval", mixed_bank))
    dataset = infer_dataset_class(str(nnunet_model["preprocessed"]))(str(nnunet_model["preprocessed"]))
    assert sorted(dataset.identifiers) == sorted(c["id"] for c in cases)
    checked = 0
    for case in cases:
        data, seg, *_ = dataset.load_case(case["id"])
        np.testing.assert_allclose(np.asarray(case["image"]), np.asarray(data), rtol=0, atol=1e-5)
        expected = np.asarray(seg).copy()
        expected[expected < 0] = 0
        assert np.array_equal(np.asarray(case["label"]), expected)
        checked += 1
    assert checked == len(task.training)


@pytest.mark.parametrize("entry", ["zoo_unet", "nnunet_spleen", "published_unet"])
def test_one_entry_of_each_kind_fine_tunes_with_its_own_preprocessing(mixed_bank, study_data, tmp_path, entry):
    target = shutil.copytree(study_data / "Task09_Spleen", tmp_path / "Task09_Spleen")
    out = tmp_path / "ft"
    run_bundle("msd_seg3d", ["train", "finetune"], data_root=str(target), bank_root=str(mixed_bank), bank_entry=entry,
               transfer_mode="all_but_head", output_dir=str(out), **FAST)
    bank_entry = ModelBank.open(mixed_bank).get(entry)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["complete"] or not report["missing"]
    assert report["loaded"] and not report["missing"]
    plans = json.loads((out / "plans.json").read_text())
    record = json.loads((out / "run.json").read_text())
    assert record["arch"] == bank_entry.arch
    if bank_entry.preprocessing_kind == "target_plans":
        assert "preprocessing" not in plans
    else:  # trained, validated (and evaluated) the way the entry expects, at its window
        assert plans["preprocessing"]["kind"] == bank_entry.preprocessing_kind
        assert plans["patch_size"] == bank_entry.patch_size == record["patch_size"]
    assert (out / "model.pt").is_file()
    run_bundle("msd_seg3d", ["train", "evaluate"], data_root=str(target), output_dir=str(out), device="cpu")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics
    if bank_entry.preprocessing_kind == "monai":  # invertible: predictions in the input files' geometry
        image = load_task(target).training[0]["image"]
        run_bundle("msd_seg3d", ["inference"], model_dir=str(out), input_path=image, output_dir=str(tmp_path / "pred"),
                   device="cpu")
        pred = list((tmp_path / "pred").glob("*_seg.nii.gz"))
        assert len(pred) == 1
        assert nib.load(pred[0]).shape == nib.load(image).shape[:3]
        np.testing.assert_allclose(nib.load(pred[0]).affine, nib.load(image).affine, atol=1e-4)
