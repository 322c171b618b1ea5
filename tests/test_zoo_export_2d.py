"""Model-zoo bundles exported from 2D ``seg2d_transfer`` runs (issue 15): the network's code in the
bundle's own ``scripts/`` package, the zoo's rules (files, metadata schema, verify_net_in_out,
ckpt_export, bundle properties), MONAI's client ``monai.bundle.load``, and masks of the MONAI-only
inference config equal to medxfer's own, also from another folder in an interpreter that cannot
import medxfer."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, load, verify_metadata, verify_net_in_out
from monai.metrics import compute_dice
from PIL import Image

from bundle_cli import cache_env
import medxfer.networks.unet2d as unet2d_module
from medxfer.cli import main
from medxfer.networks import build_network
from medxfer.workflows.bundle import run_bundle
from medxfer.workflows.seg2d_transfer import Seg2DRun, thesis_dice_loss
from medxfer.workflows.zoo_export import (METADATA_SCHEMA, ExportSource, export_bundle, seg2d_preprocessing,
                                          write_metadata_schema)

KW = {"channels": [4, 8, 16]}
REQUIRED = ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
            "configs/multi_gpu_train.json", "LICENSE", "models/model.pt",
            "docs/README.md", "scripts/__init__.py", "scripts/unet2d.py", "scripts/layout.py")
# Run in a fresh interpreter where `import medxfer` fails: nothing of the bundle may need it.
NO_MEDXFER = "import sys; sys.modules['medxfer'] = None; "


def _trained_and_exported(root: Path, num_classes: int) -> dict:
    """A 1-epoch basic unet2d run at 32 x 32 on generated grey images of about 40 x 48 (sizes
    jitter), exported with the command line, and medxfer's own masks of the images."""
    data = root / "data"
    assert main(["synth", "seg2d", "--out", str(data), "--num-images", "6", "--size", "40", "48",
                 "--num-classes", str(num_classes), "--seed", "3"]) == 0
    run = root / "run"
    run_bundle("seg2d_transfer", ["train"], data_root=str(data), output_dir=str(run), arch="unet2d", arch_kwargs=KW,
               image_size=32, max_epochs=1, val_interval=1, batch_size=4, n_folds=3, transfer_mode="scratch",
               device="cpu", num_workers=0)
    bundle = root / "bundle" / "seg2d_unet"
    assert main(["export-bundle", "--run", str(run), "--out", str(bundle), "--name", "seg2d_unet"]) == 0
    ours = root / "medxfer_pred"
    run_bundle("seg2d_transfer", ["inference"], run_dir=str(run), input_dir=str(data / "images"),
               output_dir=str(ours), device="cpu")
    return {"data": data, "run": run, "bundle": bundle, "ours": ours}


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    return _trained_and_exported(tmp_path_factory.mktemp("zoo2d_binary"), 1)


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory):
    return _trained_and_exported(tmp_path_factory.mktemp("zoo2d_multiclass"), 2)


@pytest.fixture(params=["binary", "multiclass"])
def trained(request):
    """Both runs: sigmoid (0/255 masks) and softmax (label indices) postprocessing."""
    return request.getfixturevalue(request.param)


def _medxfer_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "medxfer"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "medxfer":
            names.append(node.module)
    return names


def _same_masks(ours: Path, theirs: Path) -> None:
    assert sorted(p.name for p in theirs.glob("*.png")) == sorted(p.name for p in ours.glob("*.png"))
    for mine in sorted(ours.glob("*.png")):
        a, b = np.asarray(Image.open(mine)), np.asarray(Image.open(theirs / mine.name))
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8, mine.name
        assert np.array_equal(a, b), mine.name


def test_exported_2d_bundle_has_the_zoos_files_valid_metadata_and_its_network_in_scripts(trained, tmp_path):
    bundle, run = trained["bundle"], trained["run"]
    for rel in REQUIRED:
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, METADATA_SCHEMA)
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"),
                    filepath=str(write_metadata_schema(tmp_path / "meta_schema_20240725.json")))
    assert set(meta["required_packages_version"]) == {"pillow"}
    record = json.loads((run / "run.json").read_text())
    fmt = meta["network_data_format"]
    assert (fmt["inputs"]["image"]["num_channels"], fmt["inputs"]["image"]["spatial_shape"]) == (3, [32, 32])
    assert fmt["outputs"]["pred"]["num_channels"] == record["out_channels"]
    for name in ("inference.json", "train.json"):
        text = (bundle / "configs" / name).read_text()
        assert "medxfer" not in text, name  # MONAI only
        cfg = json.loads(text)
        assert "$import scripts" in cfg["imports"]
        net = cfg["network_def"]
        assert net["_target_"] == "scripts.unet2d.UNet2D"
        assert {k: v for k, v in net.items() if not k.startswith("_")} == {
            "in_channels": 3, "out_channels": record["out_channels"], **record["arch_kwargs"]}
    for module in (bundle / "scripts").glob("*.py"):
        assert _medxfer_imports(module) == [], module.name
    assert _medxfer_imports(Path(unet2d_module.__file__))  # the check can fail: the original imports medxfer


def test_2d_bundle_passes_verify_net_in_out_ckpt_export_and_loads_in_monai(trained, tmp_path, monkeypatch):
    bundle = trained["bundle"]
    cfg, meta = str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "metadata.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=cfg, device="cpu", bundle_root=str(bundle))
    reference = Seg2DRun(trained["run"], device="cpu").network
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
    # TorchScript works for unet2d (the networks' error messages use list(x.shape), which scripts)
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=meta, config_file=cfg, bundle_root=str(bundle))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "model.ts"))(x), expected, atol=1e-5)
    monkeypatch.chdir(bundle)  # monai.bundle.load takes bundle_root from the working directory
    network = load("seg2d_unet", bundle_dir=str(bundle.parent), workflow_type="inference", source="monaihosting")
    assert type(network).__module__ == "scripts.unet2d"  # built from the bundle's copy, not from medxfer
    with torch.no_grad():
        assert torch.equal(network.eval()(x), expected)
    workflow = ConfigWorkflow(config_file=cfg, meta_file=meta, workflow_type="inference", bundle_root=str(bundle),
                              logging_file=str(bundle / "configs" / "logging.conf"))
    workflow.initialize()
    assert not workflow.check_properties()


def test_monai_only_2d_inference_writes_medxfers_masks(trained, tmp_path):
    bundle = trained["bundle"]
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), workflow_type="inference",
                              bundle_root=str(bundle), dataset_dir=str(trained["data"]),
                              output_dir=str(tmp_path / "zoo_pred"))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    _same_masks(trained["ours"], tmp_path / "zoo_pred")
    sizes = {np.asarray(Image.open(p)).shape for p in (tmp_path / "zoo_pred").glob("*.png")}
    assert len(sizes) > 1 and (32, 32) not in sizes  # each mask at its own image's size, not the network's


def test_monai_bundle_run_from_another_folder_without_medxfer(binary, tmp_path):
    trained = binary
    (tmp_path / "scripts").mkdir()  # a scripts/ folder in the working directory must not shadow the bundle's
    bundle = trained["bundle"]
    argv = ["monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root",
            str(bundle), "--dataset_dir", str(trained["data"] / "images"), "--output_dir", str(tmp_path / "pred")]
    code = NO_MEDXFER + f"import runpy; sys.argv = {argv!r}; runpy.run_module('monai.bundle', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cache_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_masks(trained["ours"], tmp_path / "pred")


def test_exported_2d_train_config_fine_tunes_from_the_bundles_weights(binary, tmp_path):
    trained = binary
    data = json.loads((trained["bundle"] / "configs" / "train.json").read_text())
    assert isinstance(data["train"]["handlers"], list) and all(isinstance(h, dict) for h in data["train"]["handlers"])
    bundle = shutil.copytree(trained["bundle"], tmp_path / "seg2d_unet")
    images = sorted((trained["data"] / "images").iterdir())[:3]
    records = [{"image": str(i), "label": str(trained["data"] / "masks" / f"{i.stem}.png")} for i in images]
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), workflow_type="train",
                              meta_file=str(bundle / "configs" / "metadata.json"), bundle_root=str(bundle),
                              dataset_dir=str(trained["data"]), max_epochs=1, batch_size=2,
                              **{"train#dataset#data": records})
    workflow.initialize()
    assert not workflow.check_properties()
    assert len(workflow.parser.get_parsed_content("train#dataset")) == 3
    item = workflow.parser.get_parsed_content("validate#dataset")[0]
    assert item["image"].shape == (3, 32, 32) and set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0}
    start = torch.load(bundle / "models" / "model.pt", weights_only=True)
    seen = {}
    workflow.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.ITERATION_STARTED, lambda engine: seen.setdefault("first", {k: v.clone() for k, v in
                                                                      engine.network.state_dict().items()}))
    workflow.run()
    workflow.finalize()
    assert all(torch.equal(seen["first"][k], v) for k, v in start.items())  # fine-tuning starts from model.pt
    assert (bundle / "models" / "model_finetuned.pt").is_file()


#: Other registered 2D networks: small settings where the network has any.
OTHERS = {"resnet50_attention_unet": {}, "swin_unet": {"embed_dim": 12, "num_heads": [1, 2, 3, 6]},
          "truncated_resnet50": {"level": 2}, "truncated_densenet121": {"level": 1}, "linknet_effb0": {},
          "unet_effb0": {}}


def test_other_2d_networks_rebuild_from_their_bundles_without_medxfer(tmp_path):
    """Each bundle's network_def + models/model.pt, built in one fresh interpreter that cannot import
    medxfer (the bundles one after the other: each finds its own scripts package), gives the outputs
    of medxfer's network."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    expected, bundles = {}, {}
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    for arch, kw in OTHERS.items():
        torch.manual_seed(0)
        net = build_network(arch, 3, 2, [32, 32], **kw).eval()
        with torch.no_grad():
            expected[arch] = net(x)
        src = ExportSource(name=arch, arch=arch, arch_kwargs=kw, in_channels=3, out_channels=2, patch_size=[32, 32],
                           labels={"0": "background", "1": "a"}, channels={"0": "R", "1": "G", "2": "B"},
                           preprocessing=seg2d_preprocessing([32, 32], norm["mean"], norm["std"]),
                           state=net.state_dict(), kind="seg2d", normalization=norm)
        bundles[arch] = export_bundle(tmp_path / "bundles" / arch, src)
        assert (bundles[arch] / "scripts").is_dir() == (arch != "unet_effb0")  # FlexibleUNet is MONAI's own
    code = NO_MEDXFER + f"""
import torch
from monai.bundle import ConfigParser
x, out = torch.load('x.pt'), {{}}
for arch, bundle in {dict((a, str(b)) for a, b in bundles.items())!r}.items():
    parser = ConfigParser()
    parser.read_config(bundle + '/configs/inference.json')
    parser['bundle_root'] = bundle
    net = parser.get_parsed_content('network_def').eval()
    net.load_state_dict(torch.load(bundle + '/models/model.pt', weights_only=True))
    with torch.no_grad():
        out[arch] = (type(net).__module__, net(x))
torch.save(out, 'out.pt')
"""
    (tmp_path / "scripts").mkdir()  # a namespace-package trap in the working directory
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cache_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    for arch, (module, y) in out.items():
        assert module.startswith("scripts.") or arch == "unet_effb0", (arch, module)
        assert torch.allclose(y, expected[arch], atol=1e-5), arch


def test_weights_or_arguments_that_do_not_fit_the_network_are_refused(tmp_path):
    net = build_network("unet2d", 3, 1, [32, 32], **KW)
    state = net.state_dict()
    state["head.weight"] = torch.zeros(1, 5, 1, 1)  # not what network_def builds
    src = ExportSource(name="bad", arch="unet2d", arch_kwargs=KW, in_channels=3, out_channels=1, patch_size=[32, 32],
                       labels={"0": "background", "1": "a"}, channels={"0": "R", "1": "G", "2": "B"},
                       preprocessing=seg2d_preprocessing([32, 32], [0.5] * 3, [0.25] * 3), state=state, kind="seg2d",
                       normalization={"mean": [0.5] * 3, "std": [0.25] * 3})
    with pytest.raises(ValueError, match="weights do not match"):
        export_bundle(tmp_path / "bad", src)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="does not take these arguments"):
        export_bundle(tmp_path / "bad", ExportSource(**{**src.__dict__, "arch_kwargs": {"widths": [4, 8]},
                                                        "state": net.state_dict()}))


def test_exported_2d_evaluate_config_runs_without_medxfer_and_reports_the_dice_of_model_pt(binary, tmp_path):
    bundle = shutil.copytree(binary["bundle"], tmp_path / "seg2d_unet")
    configs = str([str(bundle / "configs" / n) for n in ("train.json", "evaluate.json")])
    argv = ["monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle),
            "--dataset_dir", str(binary["data"])]
    code = NO_MEDXFER + f"import runpy; sys.argv = {argv!r}; runpy.run_module('monai.bundle', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cache_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, value = (bundle / "eval" / "metrics.csv").read_text().strip().split(",")
    # independently: the validation images through model.pt, thresholded, Dice by MONAI's compute_dice
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), workflow_type="train",
                              bundle_root=str(bundle), dataset_dir=str(binary["data"]))
    workflow.initialize()
    net = workflow.parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    scores = []
    for case in workflow.parser.get_parsed_content("validate#dataset"):
        with torch.no_grad():
            pred = (torch.sigmoid(net(case["image"][None])) > 0.5).float()
        scores.append(float(compute_dice(pred, case["label"][None], include_background=True, ignore_empty=False)))
    assert name == "val_mean_dice" and float(value) == pytest.approx(np.nanmean(scores), abs=1e-4)


def test_exported_2d_train_config_is_the_thesis_recipe(trained):
    """MONAI-only train.json = seg2d_transfer's ``recipe: thesis``: its loss equals medxfer's
    thesis_dice_loss on random logits, rotations over [0, pi], poly decay after every step."""
    parser = ConfigParser()
    parser.read_config(str(trained["bundle"] / "configs" / "train.json"))
    parser["bundle_root"] = str(trained["bundle"])
    binary = parser["network_def"]["out_channels"] == 1
    loss = parser.get_parsed_content("loss")
    torch.manual_seed(0)
    logits = torch.randn(3, 1 if binary else 2, 8, 8)
    label = (torch.rand(3, 1, 8, 8) > 0.5).float()
    assert float(loss(logits, label)) == pytest.approx(float(thesis_dice_loss(binary)(logits, label)), abs=1e-6)
    assert (parser["max_epochs"], parser["batch_size"], parser["learning_rate"]) == (150, 24, 0.05)
    rotate = next(t for t in parser["train#preprocessing#transforms"] if t["_target_"] == "RandRotated")
    assert rotate["range_x"] == [0.0, pytest.approx(np.pi)] and rotate["prob"] == 1.0
    schedule = next(h for h in parser["train#handlers"] if h["_target_"] == "LrScheduleHandler")
    assert schedule["epoch_level"] is False
