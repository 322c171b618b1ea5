"""Model-zoo bundles exported from one fold of a TATL run (issue 15): one ``<name>_def`` per network
with its own weights and metadata entry, the pipeline in the bundle's ``scripts/``, the zoo's rules
(files, metadata schema, verify_net_in_out for every network, ckpt_export, bundle properties),
MONAI's client ``monai.bundle.load``, and masks written in an interpreter that cannot import
medxfer equal, byte for byte, to medxfer's own TATL inference of the same fold."""

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
from monai.bundle import ConfigWorkflow, ckpt_export, load, verify_metadata, verify_net_in_out
from PIL import Image

from bundle_cli import cache_env
from medxfer.cli import main
from medxfer.data.problems import DatasetError
from medxfer.transfer.tatl import load_trained
from medxfer.workflows.bundle import bundle_dir
from medxfer.workflows.tatl_skin import TatlSettings, fold_predictor, run_cross_validation, run_inference
from medxfer.workflows.zoo_export import (METADATA_SCHEMA, ZOO_FILE_LIMIT, source_from_run, source_from_tatl_run,
                                          write_metadata_schema)

ATTRIBUTES = ("milia_like_cyst", "negative_network", "pigment_network", "streaks")  # ISIC 2017
ARCHES = ("unet_effb0", "linknet_effb0")
NETWORKS = ["segment_net", *[f"agnostic_{a}" for a in ARCHES],
            *[f"target_{t}_{a}" for t in ATTRIBUTES for a in ARCHES]]
SIZE = 64
# Run in a fresh interpreter where `import medxfer` fails: nothing of the bundle may need it.
NO_MEDXFER = "import sys; sys.modules['medxfer'] = None; "


@pytest.fixture(scope="module")
def tatl(isic_roots, tmp_path_factory):
    """The tiniest full TATL run (stages 1+2+3, U + Link, fold 0 of 3, 1 epoch per network, 64 x 64,
    ISIC 2017: 11 networks), exported with the command line, and medxfer's own inference of the fold
    on 4 images (+ a mask file that both must skip). One epoch leaves every probability within a few
    thousandths of 0.5, so the run's threshold is set to the median of the stage-2 union probability
    of an image (an inference setting of tatl_run.json): the masks then hold both values and a
    difference of one pixel between the two inferences shows."""
    root = tmp_path_factory.mktemp("zoo_tatl")
    data = isic_roots[2017]
    run = root / "run"
    settings = TatlSettings(working_size=(SIZE, SIZE), max_epochs=1, n_folds=3, batch_size=4, tune_fraction=0.2,
                            offset=4)
    run_cross_validation(bundle_dir("tatl_skin"), data, run, settings, folds=[0], device="cpu")
    images = root / "images"
    images.mkdir()
    originals = sorted((data / "ISIC-2017_Training_Data").glob("*.jpg"))[:4]
    for image in originals:
        shutil.copy(image, images / image.name)
    shutil.copy(next((data / "ISIC-2017_Training_Part1_GroundTruth").glob("*.png")),
                images / f"{originals[0].stem}_segmentation.png")  # a mask: never an input image
    probability = fold_predictor(run, 0).predict(originals[0]).union_probability
    record = json.loads((run / "tatl_run.json").read_text())
    record["threshold"] = float(np.median(probability))
    (run / "tatl_run.json").write_text(json.dumps(record))
    bundle = root / "bundle" / "tatl_isic2017"
    assert main(["export-bundle", "--run", str(run), "--fold", "0", "--out", str(bundle), "--name",
                 "tatl_isic2017"]) == 0
    ours = root / "medxfer_pred"
    run_inference(run, 0, images, ours, device="cpu")
    return {"run": run, "bundle": bundle, "images": images, "ours": ours, "originals": originals}


def _medxfer_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "medxfer"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "medxfer":
            names.append(node.module)
    return names


def _weights(name: str) -> str:
    return "models/model.pt" if name == "segment_net" else f"models/{name}.pt"


def test_tatl_bundle_has_every_network_with_weights_and_valid_metadata(tatl, tmp_path):
    bundle = tatl["bundle"]
    required = ["configs/metadata.json", "configs/inference.json", "configs/logging.conf", "LICENSE",
                "docs/README.md", "docs/data_license.txt", "scripts/__init__.py", "scripts/tatl_inference.py",
                "scripts/linknet.py", *[_weights(n) for n in NETWORKS]]
    for rel in required:
        assert (bundle / rel).is_file(), rel
    assert sorted(p.name for p in (bundle / "models").iterdir()) == sorted(Path(_weights(n)).name for n in NETWORKS)
    large = [_weights(n) for n in NETWORKS if (bundle / _weights(n)).stat().st_size > ZOO_FILE_LIMIT]
    assert large  # the U-shape effb0 weights are above the zoo's 25 MB
    listed = (bundle / "large_files.yml").read_text()
    assert sorted(line.split("path: ")[1] for line in listed.splitlines() if "path: " in line) == sorted(large)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    jsonschema.validate(meta, METADATA_SCHEMA)
    verify_metadata(meta_file=str(meta_file), filepath=str(write_metadata_schema(tmp_path / "meta_schema.json")))
    assert set(meta["required_packages_version"]) == {"pillow", "scipy"}
    text = (bundle / "configs" / "inference.json").read_text()
    assert "medxfer" not in text
    cfg = json.loads(text)
    assert sorted(k[:-4] for k in cfg if k.endswith("_def") and k != "network_def") == sorted(NETWORKS)
    assert cfg["network_def"] == "@segment_net_def" and meta["main_network"] == "segment_net"
    assert sorted(meta["networks"]) == sorted(NETWORKS)
    decoder = json.loads((tatl["run"] / "tatl_run.json").read_text())["decoder_block"]
    for name, entry in meta["networks"].items():
        assert entry["config_id"] == f"{name}_def" and entry["weights"] == _weights(name)
        assert entry["inputs"]["image"]["spatial_shape"] == [SIZE, SIZE] and entry["outputs"]["pred"]["num_channels"] == 1
        net = cfg[f"{name}_def"]
        if name.endswith("linknet_effb0"):
            assert net["_target_"] == "scripts.linknet.LinkNetEffB0" and net["decoder_block"] == decoder
        else:  # MONAI's class, the paper's U stage (no 1x1 pre-conv)
            assert net["_target_"] == "FlexibleUNet" and net["backbone"] == "efficientnet-b0"
            assert ("pre_conv" in net and net["pre_conv"] is None) == (decoder == "paper")
    assert meta["network_data_format"] == {k: meta["networks"]["segment_net"][k] for k in ("inputs", "outputs")}
    broken = json.loads(meta_file.read_text())
    del broken["networks"][NETWORKS[-1]]["outputs"]
    with pytest.raises(jsonschema.ValidationError):  # the schema checks every network's entry
        jsonschema.validate(broken, METADATA_SCHEMA)
    for module in (bundle / "scripts").glob("*.py"):
        assert _medxfer_imports(module) == [], module.name
    card = (bundle / "docs" / "README.md").read_text()
    assert "`network_def` is `@segment_net_def`" in card and "## Not exported" in card


def test_every_network_passes_verify_net_in_out_and_the_main_one_exports_and_loads(tatl, tmp_path, monkeypatch):
    bundle, run = tatl["bundle"], tatl["run"]
    cfg, meta = str(bundle / "configs" / "inference.json"), str(bundle / "configs" / "metadata.json")
    for name in NETWORKS:
        verify_net_in_out(net_id=f"{name}_def", meta_file=meta, config_file=cfg, device="cpu", bundle_root=str(bundle))
    reference = load_trained("unet_effb0", run / "fold_0" / "segment_net" / "model.pt")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = reference(x)
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=meta, config_file=cfg, bundle_root=str(bundle))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "model.ts"))(x), expected, atol=1e-5)
    monkeypatch.chdir(bundle)  # monai.bundle.load takes bundle_root from the working directory
    network = load("tatl_isic2017", bundle_dir=str(bundle.parent), workflow_type="inference", source="monaihosting")
    assert type(network).__name__ == "FlexibleUNet"
    with torch.no_grad():
        assert torch.equal(network.eval()(x), expected)
    workflow = ConfigWorkflow(config_file=cfg, meta_file=meta, workflow_type="inference", bundle_root=str(bundle),
                              logging_file=str(bundle / "configs" / "logging.conf"))
    workflow.initialize()
    assert not workflow.check_properties()


def test_every_def_with_its_weights_is_the_runs_network_without_medxfer(tatl, tmp_path):
    bundle, run = tatl["bundle"], tatl["run"]
    x = torch.randn(1, 3, SIZE, SIZE)
    torch.save(x, tmp_path / "x.pt")
    code = NO_MEDXFER + (
        "import torch; from monai.bundle import ConfigParser; p = ConfigParser(); "
        f"p.read_config({str(bundle / 'configs' / 'inference.json')!r}); p['bundle_root'] = {str(bundle)!r}; "
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); out = {{}}\n"
        f"for name, rel in {[(n, _weights(n)) for n in NETWORKS]!r}:\n"
        "    net = p.get_parsed_content(name + '_def').eval()\n"
        f"    net.load_state_dict(torch.load({str(bundle)!r} + '/' + rel, weights_only=True))\n"
        "    assert not type(net).__module__.startswith('medxfer'), type(net).__module__\n"
        "    with torch.no_grad(): out[name] = net(x)\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cache_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    for name in NETWORKS:
        arch = "linknet_effb0" if name.endswith("linknet_effb0") else "unet_effb0"
        with torch.no_grad():
            assert torch.equal(load_trained(arch, run / "fold_0" / name / "model.pt")(x), theirs[name]), name


def test_monai_bundle_run_without_medxfer_writes_medxfers_masks_byte_for_byte(tatl, tmp_path):
    (tmp_path / "scripts").mkdir()  # a scripts/ folder in the working directory must not shadow the bundle's
    bundle, ours, theirs = tatl["bundle"], tatl["ours"], tmp_path / "pred"
    argv = ["monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root",
            str(bundle), "--dataset_dir", str(tatl["images"]), "--output_dir", str(theirs)]
    code = NO_MEDXFER + f"import runpy; sys.argv = {argv!r}; runpy.run_module('monai.bundle', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cache_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stems = [p.stem for p in tatl["originals"]]
    expected = sorted([f"{s}_attribute_{a}.png" for s in stems for a in ATTRIBUTES] +
                      [f"{s}_{k}.png" for s in stems for k in ("union", "overlay")])
    assert sorted(p.name for p in theirs.glob("*.png")) == sorted(p.name for p in ours.glob("*.png")) == expected
    masks = []
    for mine in sorted(ours.glob("*.png")):
        assert (theirs / mine.name).read_bytes() == mine.read_bytes(), mine.name
        if "_overlay" not in mine.name:
            masks.append(np.asarray(Image.open(mine)))
    values = np.concatenate([m.ravel() for m in masks])
    assert set(np.unique(values)) == {0, 255}  # masks with both values: the comparison can fail
    for stem, image in zip(stems, tatl["originals"]):
        with Image.open(image) as img:
            assert np.asarray(Image.open(theirs / f"{stem}_union.png")).shape == (img.height, img.width)
    # the union map is the stage-2 prediction (medxfer's default), not the OR of the attribute masks
    unions = [np.asarray(Image.open(theirs / f"{s}_union.png")) for s in stems]
    ors = [np.max([np.asarray(Image.open(theirs / f"{s}_attribute_{a}.png")) for a in ATTRIBUTES], axis=0)
           for s in stems]
    assert any(not np.array_equal(u, o) for u, o in zip(unions, ors))


def test_unfinished_folds_and_misplaced_fold_are_refused(tatl, tmp_path):
    run = tmp_path / "run"
    (run / "fold_0" / "segment_net").mkdir(parents=True)
    shutil.copy(tatl["run"] / "tatl_run.json", run / "tatl_run.json")
    with pytest.raises(DatasetError, match=r"segment_net/model.pt: not found: the fold has not finished"):
        source_from_run(run)
    with pytest.raises(DatasetError, match=r"fold_3: no such fold in the run \(folds: \[0\]\)"):
        source_from_tatl_run(run, fold=3)
    assert main(["export-bundle", "--run", str(run), "--fold", "3", "--out", str(tmp_path / "b")]) == 1
    assert main(["export-bundle", "--bank", str(tmp_path), "--entry", "x", "--fold", "0",
                 "--out", str(tmp_path / "b")]) == 1
    assert not (tmp_path / "b").exists()


def test_a_run_without_stages_1_and_2_exports_its_whole_image_or_union_pipeline(tatl, tmp_path):
    """A Table 3 ablation (stage 3 alone): no Segment-Net (whole images), no stage-2 union map (the
    OR of the attribute masks); the bundle's main network is the first target segmenter and its
    masks are medxfer's. The trained fold is reused under the ablation's settings."""
    run = tmp_path / "run"
    run.mkdir()
    record = json.loads((tatl["run"] / "tatl_run.json").read_text())
    (run / "tatl_run.json").write_text(json.dumps({**record, "stages": [3]}))
    (run / "fold_0").symlink_to(tatl["run"] / "fold_0", target_is_directory=True)
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", "--run", str(run), "--out", str(bundle)]) == 0
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    targets = [n for n in NETWORKS if n.startswith("target_")]
    assert sorted(k[:-4] for k in cfg if k.endswith("_def") and k != "network_def") == sorted(targets)
    assert cfg["network_def"] == f"@{targets[0]}_def" and cfg["union"] == "or_stage3"
    assert cfg["predictor"]["segment_net"] is None and cfg["predictor"]["union_networks"] == []
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["main_network"] == targets[0]
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), workflow_type="inference",
                              bundle_root=str(bundle), dataset_dir=str(tatl["images"]),
                              output_dir=str(tmp_path / "zoo_pred"))
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    run_inference(run, 0, tatl["images"], tmp_path / "ours", device="cpu", union="or_stage3")
    ours = sorted((tmp_path / "ours").glob("*.png"))
    assert [p.name for p in ours] == sorted(p.name for p in (tmp_path / "zoo_pred").glob("*.png"))
    for mine in ours:
        assert (tmp_path / "zoo_pred" / mine.name).read_bytes() == mine.read_bytes(), mine.name
