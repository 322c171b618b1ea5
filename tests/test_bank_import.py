"""Importing the models researchers have (issue 14): zoo bundles, nnU-Net v2 models, checkpoints.

The bundles are written in the model zoo's layout (``medxfer.data.synth.zoo_bundle``: JSON configs,
``network_def`` with ``_target_`` and ``@`` references, ``models/model.pt``); the checks against the
source's own preprocessing use MONAI's ``ConfigParser`` on the *original* bundle config.
"""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.transforms import ResizeWithPadOrCrop

from medxfer.cli import main
from medxfer.data.msd import load_task
from medxfer.data.synth.zoo_bundle import write_zoo_bundle
from medxfer.networks import build_network
from medxfer.transfer.bank import BankError, ModelBank, entry_layout, sha256_file
from medxfer.transfer.bank_import import import_bundle, import_checkpoint
from medxfer.transferability.score import task_target
from medxfer.workflows.msd_seg3d import task_plans

#: Bundle windows and spacing near the tiny study volumes (32 x 32 x 12 voxels of 9.6 x 9.6 x 24 mm).
PIXDIM = (9.6, 9.6, 12.0)
ROI = {"unet": [32, 32, 32], "segresnet": [32, 32, 32], "swinunetr": [64, 32, 32]}
UNET_KW = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {net: write_zoo_bundle(root / f"{net}_bundle", net, out_channels=2, roi_size=ROI[net], pixdim=PIXDIM,
                                  seed=i)
            for i, net in enumerate(("unet", "segresnet", "swinunetr"))}


@pytest.fixture(scope="module")
def spleen(study_data):
    return study_data / "Task09_Spleen"


def _checkpoint(path, seed=0, out_channels=3):
    torch.manual_seed(seed)
    net = build_network("unet", 1, out_channels, [16, 16, 16], **UNET_KW)
    torch.save(net.state_dict(), path)
    return net


def test_a_zoo_bundle_imports_with_its_network_preprocessing_and_provenance(bundles, tmp_path):
    bank_root = tmp_path / "bank"
    entry = import_bundle(bank_root, bundles["unet"])
    assert entry.arch == "unet" and entry.in_channels == 1 and entry.out_channels == 2
    assert entry.patch_size == ROI["unet"]  # inferer#roi_size, an @ reference in the config
    assert entry.arch_kwargs == {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2,
                                 "norm": "batch"}
    pre = entry.preprocessing
    assert pre["kind"] == "monai" and pre["image_key"] == "image"
    scale = next(t for t in pre["transforms"] if t["_target_"] == "ScaleIntensityRanged")
    assert (scale["a_min"], scale["a_max"]) == (-57.0, 164.0)
    assert any("Spacingd(pixdim=[9.6, 9.6, 12.0]" in s for s in pre["summary"])
    prov = entry.provenance
    assert prov["kind"] == "bundle" and prov["version"] == "0.1.0" and prov["licence"].startswith("Apache")
    assert prov["sha256"] == sha256_file(bundles["unet"] / "models" / "model.pt")
    assert (bank_root / prov["copied_to"] / "inference.json").is_file()
    # the bank's weights are the bundle's, exactly
    bank = ModelBank.open(bank_root)
    original = torch.load(bundles["unet"] / "models" / "model.pt", weights_only=True)
    got = bank.load_state_dict(entry.name)
    assert list(got) == list(original) and all(torch.equal(got[k], original[k]) for k in original)
    # the manifest is plain YAML a person reads
    manifest = yaml.safe_load((bank_root / "bank.yaml").read_text())
    assert manifest["entries"][0]["provenance"]["kind"] == "bundle"


def test_bundle_preprocessing_in_scoring_equals_the_bundles_own_transforms(bundles, spleen, tmp_path):
    bank_root = tmp_path / "bank"
    entry = import_bundle(bank_root, bundles["unet"], name="zoo_unet")
    target = task_target(spleen, task_plans(spleen), max_cases=2)
    cases = target.prepare(entry.preprocessing, bank_root)
    # the source's own preprocessing: MONAI's parser on the original bundle config
    parser = ConfigParser()
    parser.read_config(str(bundles["unet"] / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundles["unet"])
    own = parser.get_parsed_content("preprocessing")
    # its own chain with the label added (nearest), as a bundle's training config would do it
    with_label = ConfigParser()
    with_label.read_config(str(bundles["unet"] / "configs" / "inference.json"))
    for t in with_label["preprocessing"]["transforms"]:
        if t["_target_"] in ("LoadImaged", "EnsureChannelFirstd", "Orientationd", "EnsureTyped"):
            t["keys"] = ["image", "label"]
        if t["_target_"] == "Spacingd":
            t["keys"], t["mode"] = ["image", "label"], ["bilinear", "nearest"]
    labelled = with_label.get_parsed_content("preprocessing")
    records = {r["id"]: r for r in load_task(spleen).training}
    net = build_network(entry.arch, 1, 2, entry.patch_size, **entry.arch_kwargs).eval()
    net.load_state_dict(ModelBank.open(bank_root).load_state_dict("zoo_unet"))
    stage = entry_layout(entry, net).feature_stages()[-1]
    for case in cases:
        expected = own({"image": records[case["id"]]["image"]})["image"]
        np.testing.assert_allclose(np.asarray(case["image"]), np.asarray(expected), rtol=0, atol=1e-6)
        ref_label = np.asarray(labelled(dict(records[case["id"]]))["label"])
        assert np.asarray(case["label"]).shape == ref_label.shape
        assert (np.asarray(case["label"]) == ref_label).mean() > 0.999
        # the features the bank model sees on this case are those of the source's own preprocessing
        crop = ResizeWithPadOrCrop(entry.patch_size)
        feats = []
        hook = dict(net.named_modules())[stage].register_forward_hook(lambda m, i, o: feats.append(o.detach()))
        with torch.no_grad():
            for image in (case["image"], expected):
                net(torch.as_tensor(np.asarray(crop(torch.as_tensor(np.asarray(image))))).unsqueeze(0))
        hook.remove()
        assert torch.equal(feats[0], feats[1])


def test_zoo_segresnet_and_swinunetr_bundles_import_with_layouts(bundles, tmp_path):
    bank_root = tmp_path / "bank"
    for net in ("segresnet", "swinunetr"):
        entry = import_bundle(bank_root, bundles[net])
        assert entry.arch == net
        network = build_network(entry.arch, entry.in_channels, entry.out_channels, entry.patch_size, **entry.arch_kwargs)
        layout = entry_layout(entry, network)
        assert layout.decoder_stages and layout.head and layout.penultimate_encoder
    assert "img_size" not in ModelBank.open(bank_root).get("swinunetr_ct_segmentation").arch_kwargs


def test_a_checkpoint_imports_with_channels_read_from_its_weights(tmp_path):
    _checkpoint(tmp_path / "published.pt", out_channels=4)
    entry = import_checkpoint(tmp_path / "bank", tmp_path / "published.pt", "unet", UNET_KW, patch_size=[32, 32, 32],
                              url="https://example.org/published.pt", version="1.0", licence="CC-BY-4.0")
    assert (entry.in_channels, entry.out_channels) == (1, 4)
    assert entry.preprocessing == {"kind": "target_plans"}
    assert entry.provenance["original"] == "https://example.org/published.pt"
    assert entry.provenance["sha256"] == sha256_file(tmp_path / "published.pt")


# --- bad input: one line naming the file -------------------------------------------------------------

def _one_line(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_bundle_without_network_def_is_one_line_naming_the_config(bundles, tmp_path, capsys):
    broken = shutil.copytree(bundles["unet"], tmp_path / "broken")
    cfg = broken / "configs" / "inference.json"
    data = json.loads(cfg.read_text())
    del data["network_def"]
    cfg.write_text(json.dumps(data))
    err = _one_line(capsys, ["bank", "import", str(tmp_path / "bank"), "bundle", str(broken)])
    assert str(cfg) in err and "network_def" in err
    assert not (tmp_path / "bank" / "bank.yaml").exists() or not ModelBank.open(tmp_path / "bank").names()


def test_bundle_weights_of_another_network_name_the_first_mismatched_keys(bundles, tmp_path, capsys):
    broken = shutil.copytree(bundles["unet"], tmp_path / "broken")
    _checkpoint(broken / "models" / "model.pt")  # a smaller UNet than network_def
    err = _one_line(capsys, ["bank", "import", str(tmp_path / "bank"), "bundle", str(broken)])
    assert str(broken / "models" / "model.pt") in err and "do not match" in err
    assert "model.0.conv" in err or "model.1.submodule" in err  # the first keys are named


def test_a_pickled_checkpoint_is_refused_and_not_executed(tmp_path, capsys):
    marker = tmp_path / "executed"

    class OpensAFile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model.0.conv.weight": OpensAFile()}, f)
    err = _one_line(capsys, ["bank", "import", str(tmp_path / "bank"), "checkpoint", str(path), "--arch", "unet"])
    assert str(path) in err and "refused" in err
    assert not marker.exists()


def test_an_unknown_arch_lists_the_registered_ones(tmp_path, capsys):
    _checkpoint(tmp_path / "w.pt")
    err = _one_line(capsys, ["bank", "import", str(tmp_path / "bank"), "checkpoint", str(tmp_path / "w.pt"),
                             "--arch", "resnet3000"])
    assert "unknown arch 'resnet3000'" in err and "segresnet" in err and str(tmp_path / "w.pt") in err


def test_an_existing_name_is_refused_unless_replace_and_the_old_entry_is_kept(tmp_path, capsys):
    bank_root = tmp_path / "bank"
    _checkpoint(tmp_path / "a.pt", seed=0)
    _checkpoint(tmp_path / "b.pt", seed=1)
    args = ["bank", "import", str(bank_root), "checkpoint"]
    kw = ["--arch", "unet", "--arch-kwargs", json.dumps(UNET_KW), "--patch", "16", "16", "16", "--name", "m"]
    assert main(args + [str(tmp_path / "a.pt")] + kw) == 0
    before = ModelBank.open(bank_root).get("m")
    ckpt = bank_root / before.checkpoint
    saved = ckpt.read_bytes()
    capsys.readouterr()
    err = _one_line(capsys, args + [str(tmp_path / "b.pt")] + kw)
    assert "'m' exists" in err and "--replace" in err
    assert ModelBank.open(bank_root).get("m") == before and ckpt.read_bytes() == saved
    assert main(args + [str(tmp_path / "b.pt")] + kw + ["--replace"]) == 0
    after = ModelBank.open(bank_root).get("m")
    assert after.sha256 != before.sha256 and after.provenance["sha256"] == sha256_file(tmp_path / "b.pt")


def _bundle_with_network(src, dest, network_def: dict):
    bundle = shutil.copytree(src, dest)
    cfg = bundle / "configs" / "inference.json"
    data = json.loads(cfg.read_text())
    data["network_def"] = network_def
    cfg.write_text(json.dumps(data, indent=2))
    parser = ConfigParser(data)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_a_bundle_network_medxfer_does_not_know_imports_with_an_automatic_layout_and_scores(bundles, spleen,
                                                                                            tmp_path):
    attention = {"_target_": "AttentionUnet", "spatial_dims": 3, "in_channels": "@input_channels",
                 "out_channels": "@output_classes", "channels": [4, 8, 16], "strides": [2, 2]}
    bundle = _bundle_with_network(bundles["unet"], tmp_path / "attention", attention)
    entry = import_bundle(tmp_path / "bank", bundle, name="attention")
    assert entry.arch == "network_def" and entry.arch_kwargs["network_def"]["_target_"] == "AttentionUnet"
    assert entry.arch_kwargs["network_def"]["in_channels"] == 1  # the @ reference resolved to its number
    out = tmp_path / "rank"
    assert main(["rank", "--bank", str(tmp_path / "bank"), "--data", str(spleen), "--out", str(out),
                 "--estimators", "ccfv", "logme", "leep", "--max-cases", "3"]) == 0
    row = json.loads((out / "scores.json").read_text())["rows"][0]
    assert row["model"] == "attention" and all(np.isfinite(row[e]) for e in ("ccfv", "logme", "leep"))


def test_no_layout_found_is_one_line_naming_the_network_and_an_explicit_layout_imports(bundles, tmp_path, capsys):
    # HighResNet keeps the input resolution throughout (dilated convolutions): no encoder / decoder to find
    params = [{"name": "conv_0", "n_features": 4, "kernel_size": 3},
              {"name": "res_1", "n_features": 4, "kernels": [3, 3], "repeat": 1},
              {"name": "res_2", "n_features": 8, "kernels": [3, 3], "repeat": 1},
              {"name": "res_3", "n_features": 8, "kernels": [3, 3], "repeat": 1},
              {"name": "conv_1", "n_features": 8, "kernel_size": 1}, {"name": "conv_2", "kernel_size": 1}]
    highres = {"_target_": "HighResNet", "spatial_dims": 3, "in_channels": "@input_channels",
               "out_channels": "@output_classes", "layer_params": params}
    bundle = _bundle_with_network(bundles["unet"], tmp_path / "highres", highres)
    err = _one_line(capsys, ["bank", "import", str(tmp_path / "bank"), "bundle", str(bundle)])
    assert "HighResNet" in err and "--layout" in err
    assert not (tmp_path / "bank" / "sources").exists()  # nothing written before every check passed
    layout = tmp_path / "layout.yaml"
    layout.write_text(yaml.safe_dump({"encoder_levels": [["blocks.0", "blocks.1"], ["blocks.2"], ["blocks.3"]],
                                      "decoder_stages": ["blocks.3", "blocks.4"], "head": ["blocks.5"],
                                      "penultimate_encoder": "blocks.2"}))
    assert main(["bank", "import", str(tmp_path / "bank"), "bundle", str(bundle), "--name", "highres",
                 "--layout", str(layout)]) == 0
    entry = ModelBank.open(tmp_path / "bank").get("highres")
    assert entry.layout["head"] == ["blocks.5"]
    net = build_network(entry.arch, 1, 2, entry.patch_size, **entry.arch_kwargs)
    assert entry_layout(entry, net).feature_stages() == ["blocks.3", "blocks.4"]


def test_a_yaml_bundle_config_imports_like_its_json(bundles, tmp_path):
    bundle = shutil.copytree(bundles["unet"], tmp_path / "yaml_bundle")
    cfg = bundle / "configs" / "inference.json"
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(json.loads(cfg.read_text()), sort_keys=False))
    cfg.unlink()
    a = import_bundle(tmp_path / "bank", bundles["unet"], name="json")
    b = import_bundle(tmp_path / "bank", bundle, name="yaml")
    assert (a.arch, a.arch_kwargs, a.patch_size, a.preprocessing) == (b.arch, b.arch_kwargs, b.patch_size, b.preprocessing)
    assert b.provenance["config"] == "configs/inference.yaml"


def test_missing_bundle_weights_point_to_large_files(bundles, tmp_path, capsys):
    bundle = shutil.copytree(bundles["unet"], tmp_path / "no_weights")
    (bundle / "models" / "model.pt").unlink()
    (bundle / "large_files.yml").write_text("large_files:\n  - path: models/model.pt\n    url: https://example.org/m.pt\n")
    err = _one_line(capsys, ["bank", "import", str(tmp_path / "bank"), "bundle", str(bundle)])
    assert str(bundle / "models" / "model.pt") in err and "large_files.yml" in err


def test_nnunet_folder_without_plans_or_fold_is_one_line_naming_the_file(nnunet_model, tmp_path, capsys):
    folder = shutil.copytree(nnunet_model["folder"], tmp_path / "nnunet" / nnunet_model["folder"].name)
    err = _one_line(capsys, ["bank", "import", str(tmp_path / "bank"), "nnunet", str(folder), "--fold", "3"])
    assert str(folder / "fold_3") in err and "fold_0" in err
    (folder / "plans.json").unlink()
    err = _one_line(capsys, ["bank", "import", str(tmp_path / "bank"), "nnunet", str(folder)])
    assert str(folder / "plans.json") in err and "plans.json not found" in err
