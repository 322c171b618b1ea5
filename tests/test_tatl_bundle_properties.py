"""``bundles/tatl_skin`` against MONAI's bundle conventions (issue 15, item 2; the pattern of
tests/test_bundle_properties.py for msd_seg3d): the properties MONAI checks
(``ConfigWorkflow(...).check_properties()``) for train and inference, ``dataset_dir`` as the data
setting (``data_root`` / ``input_dir`` still work), handler lists of handler dicts, one ``<name>_def``
per network kind of the inference, JSON twins equal to the YAML sources.

Data: 12 generated ISIC 2018 images (tests/conftest.py ``isic_roots``), 64x64 working size. The
inference run folder holds untrained networks (one file per shape, hard-linked into every network
folder): the properties do not depend on the weights.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from bundle_cli import bundle_cli
from medxfer.data.isic import ISIC2018, load_isic
from medxfer.transfer.tatl import tatl_network
from medxfer.workflows.bundle import bundle_dir
from medxfer.workflows.tatl_skin import TatlSettings, network_dir

BUNDLE = bundle_dir("tatl_skin")
CONFIGS = BUNDLE / "configs"
TRAIN = {"working_size": [64, 64], "max_epochs": 1, "device": "cpu", "num_workers": 0, "tune_fraction": 0.2,
         "batch_size": 4, "n_folds": 3, "cache_progress": False}
#: Regenerates the JSON twins (run in bundles/tatl_skin; its docs/README.md says the same).
REGENERATE = ("python -c \"from pathlib import Path; from monai.bundle import ConfigParser as P; "
              "[P.export_config_file(P.load_config_file(f), f.with_suffix('.json'), indent=2) "
              "for f in Path('configs').glob('*.yaml')]\"")
#: The inference config's network definitions and the run folders whose weights they receive.
NETWORK_DEFS = {"segment_net_def": "segment_net", "agnostic_unet_effb0_def": "agnostic_unet_effb0",
                "agnostic_linknet_effb0_def": "agnostic_linknet_effb0",
                "target_unet_effb0_def": "target_<attribute>_unet_effb0",
                "target_linknet_effb0_def": "target_<attribute>_linknet_effb0"}


def _workflow(config: str, workflow_type: str | None, suffix: str = ".yaml", **override) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=str(CONFIGS / f"{config}{suffix}"), meta_file=str(CONFIGS / "metadata.json"),
                          workflow_type=workflow_type, bundle_root=str(BUNDLE), **override)


def _names(objects) -> list[str]:
    return [type(o).__name__ for o in objects]


def _pil(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A TATL run folder (stages 1-3, U + Link, ISIC 2018, fold 0) of untrained networks."""
    run = tmp_path_factory.mktemp("tatl_props") / "run"
    fold = run / "fold_0"
    settings = TatlSettings(working_size=(64, 64), offset=4, year=2018)
    fold.mkdir(parents=True)
    (run / "tatl_run.json").write_text(json.dumps(settings.to_json()))
    torch.manual_seed(0)
    weights = {}
    for arch in ("unet_effb0", "linknet_effb0"):
        weights[arch] = run / f"{arch}.pt"
        torch.save(tatl_network(arch).state_dict(), weights[arch])
    folders = [(network_dir(fold, "segment_net"), "unet_effb0")]
    folders += [(network_dir(fold, "agnostic", arch), arch) for arch in weights]
    folders += [(network_dir(fold, "target", arch, a), arch) for a in ISIC2018.attributes for arch in weights]
    for folder, arch in folders:
        folder.mkdir()
        os.link(weights[arch], folder / "model.pt")
    return run


@pytest.fixture(scope="module")
def images(isic_roots, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tatl_props_images")
    for record in load_isic(isic_roots[2018])[:2]:
        os.link(record["image"], folder / f"{record['id']}.jpg")
    return folder


def test_json_configs_equal_the_yaml_configs():
    """Every YAML config has its JSON twin (the zoo's format; MONAI Label and ``monai.bundle.load``
    look for train.json / inference.json first), with the content MONAI reads from the YAML."""
    yaml_files = sorted(CONFIGS.glob("*.yaml"))
    assert {p.stem for p in yaml_files} >= {"train", "inference", "evaluate", "tatl"}
    assert {p.stem for p in CONFIGS.glob("*.json")} - {"metadata"} == {p.stem for p in yaml_files}, REGENERATE
    for path in yaml_files:
        twin = path.with_suffix(".json")
        assert json.loads(twin.read_text()) == ConfigParser.load_config_file(path), f"{twin}: out of date; {REGENERATE}"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_train_config_passes_monai_train_property_check(isic_roots, tmp_path, suffix):
    wf = _workflow("train", "train", suffix, dataset_dir=str(isic_roots[2018]), output_dir=str(tmp_path / "o"), **TRAIN)
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.dataset_dir == str(isic_roots[2018]) and wf.parser.get_parsed_content("data_root") == str(isic_roots[2018])
    assert wf.max_epochs == 1 and wf.trainer.state.max_epochs == 1
    assert _names(wf.train_handlers) == ["StopOnNonFiniteLoss", "ValidationHandler", "StatsHandler"]
    assert _names(wf.val_handlers) == ["EarlyStopHandler", "MetricHistory", "StatsHandler", "AtomicCheckpointSaver"]
    assert wf.val_handlers[0]._handler.trainer is wf.trainer  # early stopping stops the trainer (set in `initialize`)
    assert wf.parser.get_parsed_content("train#trainer#train_handlers")[:3] == wf.train_handlers
    assert wf.evaluator is wf.parser.get_parsed_content("validate#evaluator")
    ids = {r["id"] for r in load_isic(isic_roots[2018])}
    assert {r["id"] for r in wf.train_dataset.data} < ids  # the fold's training images


@pytest.mark.parametrize("config", ["train", "inference"])
def test_handler_lists_are_lists_of_handler_dicts(config):
    """MONAI Label iterates the handler lists and calls ``.get("_target_")`` on each element;
    MONAI's property check reads ``h["_target_"]``."""
    parser = ConfigParser(ConfigParser.load_config_file(CONFIGS / f"{config}.yaml"))
    keys = ("train#handlers", "validate#handlers") if config == "train" else ("handlers",)
    for key in keys:
        handlers = parser[key]
        assert isinstance(handlers, list) and handlers, key
        assert all(isinstance(h, dict) and isinstance(h.get("_target_"), str) for h in handlers), key


def test_data_root_is_an_alias_of_dataset_dir(isic_roots, tmp_path):
    """The documented ``--data_root`` still names the data (it overrides the alias the config reads)."""
    wf = _workflow("train", None, data_root=str(isic_roots[2018]), output_dir=str(tmp_path / "o"), **TRAIN)
    wf.initialize()
    assert wf.parser.get_parsed_content("year") == 2018
    for config in ("tatl", "evaluate"):
        parser = ConfigParser(ConfigParser.load_config_file(CONFIGS / f"{config}.yaml"))
        parser["dataset_dir"] = "/data/x"
        assert parser.get_parsed_content("data_root") == "/data/x", config


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_inference_config_passes_monai_inference_property_check(run_dir, images, tmp_path, suffix):
    out = tmp_path / "pred"
    wf = _workflow("inference", "inference", suffix, run_dir=str(run_dir), dataset_dir=str(images),
                   output_dir=str(out), device="cpu")
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.dataset_dir == str(images) and wf.parser.get_parsed_content("input_dir") == str(images)
    assert sorted(r["image"] for r in wf.dataset.data) == sorted(str(p) for p in images.glob("*.jpg"))
    assert isinstance(wf.network_def, torch.nn.Module) and _names(wf.handlers) == ["StatsHandler"]
    assert type(wf.evaluator).__name__ == "Evaluator"
    # one definition per network kind; each one is what the predictor's networks of that kind are built from
    predictor = wf.parser.get_parsed_content("predictor")
    for key in NETWORK_DEFS:
        definition = wf.parser.get_parsed_content(key)
        assert isinstance(definition, torch.nn.Module), key
    kinds = {"segment_net_def": [predictor.segment_net], "target_unet_effb0_def": [n[0] for n in predictor.targets.values()],
             "target_linknet_effb0_def": [n[1] for n in predictor.targets.values()],
             "agnostic_unet_effb0_def": predictor.union_networks[:1],
             "agnostic_linknet_effb0_def": predictor.union_networks[1:]}
    for key, networks in kinds.items():
        definition = wf.parser.get_parsed_content(key)
        assert networks and all(type(n) is type(definition) and n is not definition for n in networks), key
        assert all(n.state_dict().keys() == definition.state_dict().keys() for n in networks), key
    assert predictor.n_networks == 13 and predictor.union_mode == "stage2"
    wf.run()
    summary = json.loads((out / "predictions.json").read_text())
    assert sorted(summary["images"]) == sorted(p.stem for p in images.glob("*.jpg")) and summary["networks"] == 13
    for stem in summary["images"]:
        expected = predictor.predict(images / f"{stem}.jpg")
        np.testing.assert_array_equal(_pil(out / f"{stem}_union.png"), expected.union * 255)


def test_inference_network_defs_verify_with_monai(tmp_path):
    """MONAI's ``verify_net_in_out`` on the inference config's ``network_def`` (U shape) and a Link-shape
    ``<name>_def`` against metadata.json's network_data_format (no run needed: the defaults build the
    networks; the other definitions differ from these two only in their name)."""
    for key in ("network_def", "agnostic_linknet_effb0_def"):
        proc = bundle_cli(BUNDLE, [key, "--meta_file", "configs/metadata.json", "--config_file",
                                   "configs/inference.json", "--bundle_root", ".", "--device", "cpu", "--n", "2",
                                   "--run_dir", str(tmp_path / "no_run")], tmp_path, command="verify_net_in_out")
        assert "data shape of network is verified with no error" in proc.stdout + proc.stderr, key
