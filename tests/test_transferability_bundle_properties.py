"""``bundles/transferability`` against MONAI's bundle conventions as far as they apply to a bundle
without a network of its own (issue 15, item 2): JSON twins of the YAML configs, ``dataset_dir`` as
the data setting (``data_root`` still works), metadata valid against the project's zoo schema with a
``network_data_format`` that describes the scoring's inputs and outputs, and MONAI's property check
of the metadata (``workflow_type=None``: the meta properties; the train / inference properties ask
for a network, trainer and inferer this bundle does not have).

The ``score`` run uses a tiny spleen task (2 cases of 32x32x12 voxels, hand-written plans) and a bank
of one small UNet, CPU, two estimators.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from medxfer.data.synth.msd import generate_msd_task
from medxfer.networks.registry import build_network
from medxfer.transfer.bank import ModelBank
from medxfer.transferability.score import DEFAULT_ESTIMATORS
from medxfer.workflows.bundle import bundle_dir

BUNDLE = bundle_dir("transferability")
CONFIGS = BUNDLE / "configs"
SCHEMA = bundle_dir("msd_seg3d") / "docs" / "meta_schema.json"
PLANS = {"task": "Task09_Spleen", "target_spacing": [9.6, 9.6, 24.0], "patch_size": [32, 32, 16],
         "normalization": [{"channel": 0, "scheme": "CT", "clip": [-100.0, 200.0], "mean": 100.0, "std": 50.0}],
         "labels": {"0": "background", "1": "spleen"}, "channels": {"0": "CT"}}
UNET = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
FAST = {"device": "cpu", "estimators": ["ccfv", "logme"],
        "sampling": {"_target_": "medxfer.transferability.features.SamplingConfig", "min_per_class": 16,
                     "max_per_class": 64, "variety_samples": 64, "seed": 0, "sw_batch_size": 2}}
#: Regenerates the JSON twins (run in bundles/transferability; as bundles/msd_seg3d's model card says).
REGENERATE = ("python -c \"from pathlib import Path; from monai.bundle import ConfigParser as P; "
              "[P.export_config_file(P.load_config_file(f), f.with_suffix('.json'), indent=2) "
              "for f in Path('configs').glob('*.yaml')]\"")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_props")
    task = generate_msd_task(root / "msd", "spleen", num_training=2, num_test=0, seed=2, shape=(32, 32, 12),
                             spacing=(9.6, 9.6, 24.0))
    (task / "medxfer_plans.json").write_text(json.dumps(PLANS))
    bank = ModelBank.open(root / "bank", create=True)
    torch.manual_seed(0)
    bank.add("unet_0", build_network("unet", 1, 2, [32, 32, 16], **UNET), arch="unet", arch_kwargs=UNET,
             in_channels=1, out_channels=2, patch_size=[32, 32, 16], source=["Task03_Liver"], epoch=1)
    return {"task": task, "bank": root / "bank"}


def _workflow(config: str, suffix: str, **override) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=str(CONFIGS / f"{config}{suffix}"), meta_file=str(CONFIGS / "metadata.json"),
                          workflow_type=None, bundle_root=str(BUNDLE), **override)


def test_json_configs_equal_the_yaml_configs():
    yaml_files = sorted(CONFIGS.glob("*.yaml"))
    assert {p.stem for p in yaml_files} == {"score", "evaluate"}
    assert {p.stem for p in CONFIGS.glob("*.json")} - {"metadata"} == {p.stem for p in yaml_files}, REGENERATE
    for path in yaml_files:
        twin = path.with_suffix(".json")
        assert json.loads(twin.read_text()) == ConfigParser.load_config_file(path), f"{twin}: out of date; {REGENERATE}"


def test_metadata_is_valid_and_describes_the_scoring():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    fmt = meta["network_data_format"]
    assert set(fmt["inputs"]) == {"image", "label"} and set(fmt["outputs"]) == {"pred"}
    pred = fmt["outputs"]["pred"]
    # one channel per estimator the score config runs, in its order
    estimators = ConfigParser.load_config_file(CONFIGS / "score.yaml")["estimators"]
    assert estimators == list(DEFAULT_ESTIMATORS)
    assert pred["num_channels"] == len(estimators)
    assert [pred["channel_def"][str(i)].split(":")[0] for i in range(len(estimators))] == estimators
    assert meta["version"] in meta["changelog"]


@pytest.mark.parametrize("config", ["score", "evaluate"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_monai_meta_property_check_passes(config, suffix, tmp_path):
    wf = _workflow(config, suffix, output_dir=str(tmp_path))
    wf.initialize()
    assert wf.check_properties() == []
    assert wf.version == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    assert wf.spatial_shape == ["*", "*", "*"]  # MONAI's meta property: network_data_format inputs.image
    assert len(wf.channel_def) == len(DEFAULT_ESTIMATORS)  # outputs.pred


def test_score_reads_dataset_dir_and_data_root_alike(setup, tmp_path):
    rows = {}
    for key, suffix in (("dataset_dir", ".json"), ("data_root", ".yaml")):
        out = tmp_path / key
        wf = _workflow("score", suffix, bank_root=str(setup["bank"]), output_dir=str(out), **FAST,
                       **{key: str(setup["task"])})
        wf.initialize()
        assert wf.parser.get_parsed_content("data_root") == str(setup["task"])
        assert wf.parser.get_parsed_content("bundle_root") == str(BUNDLE)
        assert wf.parser.get_parsed_content("device") == "cpu"
        wf.run()
        rows[key] = json.loads((out / "scores.json").read_text())["rows"]
    strip = [[{k: v for k, v in r.items() if not k.startswith("seconds")} for r in rs] for rs in rows.values()]
    assert strip[0] == strip[1] and [r["model"] for r in strip[0]] == ["unet_0"]
    assert all(set(r) >= {"ccfv", "logme"} for r in strip[0])
