"""msd_seg3d bundle: TorchScript export, network in/out check and metadata check, all offline.

The ``python -m monai.bundle`` commands run as subprocesses, as the bundle README gives them
(cwd = the bundle folder), with a plans file in ``tmp_path`` instead of a trained model's; they are
started together to share their import time. Broken metadata goes through MONAI's
``verify_metadata`` in this process (the CLI exits non-zero on the same exception).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medxfer.networks.registry import build_network
from medxfer.workflows.bundle import bundle_dir
from medxfer.workflows.metadata import SCHEMA_FILE, check_metadata

BUNDLE = bundle_dir("msd_seg3d")
META = BUNDLE / "configs" / "metadata.json"
SCHEMA = BUNDLE / "docs" / "meta_schema.json"
OFFICIAL_SCHEMA_PREFIX = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"

PLANS = {"task": "Task09_Spleen", "target_spacing": [4.8, 4.8, 12.0], "patch_size": [32, 32, 32],
         "channels": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
         "normalization": [{"channel": 0, "scheme": "CT", "clip": [-100.0, 200.0], "mean": 100.0, "std": 50.0}]}

# small networks; extra CLI args: SwinUNETR needs >= 64 voxels on a side (instance norm on a 1-voxel
# bottleneck), so its patch is 64 and its fake input "32*n" uses n = 2 (UNETR's input must equal its patch)
ARCHS = {
    "unet": ({}, []),
    "unetr": ({"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, []),
    "swinunetr": ({"feature_size": 12}, ["--patch_size", "[64, 64, 64]", "--n", "2"]),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Plans file, a UNet ``model.pt`` (plain state dict, as train.yaml's CheckpointSaver writes it)
    and an environment with caches in a temporary folder."""
    root = tmp_path_factory.mktemp("msd_bundle_export")
    plans_file = root / "plans.json"
    plans_file.write_text(json.dumps(PLANS))
    torch.manual_seed(0)
    net = build_network("unet", 1, 2, PLANS["patch_size"])
    torch.save(net.state_dict(), root / "model.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME"):
        env[var] = str(root / "cache" / var.lower())
    return {"root": root, "plans": plans_file, "ckpt": root / "model.pt", "ts": root / "model.ts", "env": env}


def commands(work) -> dict[str, list]:
    """The ``python -m monai.bundle`` commands checked here, as the README gives them (cwd = bundle)."""
    net = ["network_def", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.yaml"]
    cmds = {"ckpt_export": ["ckpt_export", *net, "--filepath", work["ts"], "--ckpt_file", work["ckpt"],
                            "--bundle_root", ".", "--plans_file", work["plans"]],
            "verify_metadata": ["verify_metadata", "--meta_file", "configs/metadata.json",
                                "--filepath", "docs/meta_schema.json"]}
    for arch, (arch_kwargs, extra) in ARCHS.items():
        cmds[f"verify_net_in_out_{arch}"] = ["verify_net_in_out", *net, "--plans_file", work["plans"], "--device", "cpu",
                                             "--arch", arch, "--arch_kwargs", repr(arch_kwargs), *extra]
    return cmds


@pytest.fixture(scope="module")
def cli(work):
    """Every command of :func:`commands` started at once (they are independent and mostly the ~5 s
    import of monai), each test waiting for its own: ``cli[name]()`` -> ``(returncode, output)``."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=BUNDLE, env=work["env"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in commands(work).items()}
    results = {}

    def result(name):
        if name not in results:
            out, _ = procs[name].communicate(timeout=300)
            results[name] = (procs[name].returncode, out)
        return results[name]

    yield {name: (lambda name=name: result(name)) for name in procs}
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_ckpt_export_unet_torchscript_matches_eager(work, cli):
    ts_file = work["ts"]
    code, out = cli["ckpt_export"]()
    assert code == 0, out[-3000:]
    assert ts_file.is_file()

    eager = build_network("unet", 1, 2, PLANS["patch_size"])
    eager.load_state_dict(torch.load(work["ckpt"], weights_only=True))
    eager.eval()
    scripted = torch.jit.load(str(ts_file), map_location="cpu")
    scripted.eval()
    x = torch.rand(2, 1, *PLANS["patch_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = eager(x), scripted(x)
    assert got.shape == (2, 2, *PLANS["patch_size"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # the bundle travels inside the TorchScript file: metadata + the config as JSON
    from monai.data import load_net_with_metadata

    _, meta, extra = load_net_with_metadata(str(ts_file), more_extra_files=("inference.json",))
    assert meta["version"] == json.loads(META.read_text())["version"]
    assert json.loads(extra["inference.json"])["arch"] == "unet"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_verify_net_in_out(cli, arch):
    code, out = cli[f"verify_net_in_out_{arch}"]()
    assert code == 0, out[-3000:]
    assert "data shape of network is verified with no error" in out


def test_shipped_metadata_is_valid_offline(cli):
    meta = json.loads(META.read_text())
    assert meta["schema"].startswith(OFFICIAL_SCHEMA_PREFIX) and meta["schema"].endswith(".json")
    assert SCHEMA_FILE == SCHEMA
    assert check_metadata(META) == []
    assert check_metadata(META, SCHEMA) == []
    # the network's output is logits, one channel per label of the task
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == len(PLANS["labels"]) and pred["value_range"] == []

    code, out = cli["verify_metadata"]()
    assert code == 0, out[-3000:]
    assert "File exists" in out and "metadata is verified with no error" in out  # used as is, nothing downloaded


def _broken(tmp_path, change) -> Path:
    meta = json.loads(META.read_text())
    change(meta)
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta, indent=4))
    return path


def _verify_metadata(meta_file):
    """MONAI's ``verify_metadata`` in this process (the CLI's exit code is that of its exception),
    with the shipped schema pinned by its md5."""
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA), hash_val=hashlib.md5(SCHEMA.read_bytes()).hexdigest())


def test_metadata_missing_required_key_fails(tmp_path):
    path = _broken(tmp_path, lambda m: m.pop("required_packages_version"))
    assert check_metadata(path) == [f"{path}: $: 'required_packages_version' is a required property"]
    with pytest.raises(ValueError, match="'required_packages_version' is a required property"):
        _verify_metadata(path)


def test_metadata_wrong_type_fails(tmp_path):
    def change(meta):
        meta["network_data_format"]["inputs"]["image"]["num_channels"] = "1"
        meta["network_data_format"]["outputs"]["pred"].pop("is_patch_data")

    path = _broken(tmp_path, change)
    problems = check_metadata(path, SCHEMA)
    assert problems == [
        f"{path}: $.network_data_format.inputs.image.num_channels: '1' is not of type 'integer'",
        f"{path}: $.network_data_format.outputs.pred: 'is_patch_data' is a required property",
    ]
    with pytest.raises(ValueError, match="is not of type 'integer'|is_patch_data"):
        _verify_metadata(path)


def test_metadata_consistency_and_unreadable_files(tmp_path):
    path = _broken(tmp_path, lambda m: m.update(version="0.2.0"))
    assert check_metadata(path) == [f"{path}: $.changelog: no entry for the current version '0.2.0'"]
    path = _broken(tmp_path, lambda m: m["network_data_format"]["outputs"]["pred"].update(num_channels=3))
    (problem,) = check_metadata(path)
    assert "$.network_data_format.outputs.pred.channel_def" in problem and "num_channels is 3" in problem

    missing = tmp_path / "nothing.json"
    assert check_metadata(missing) == [f"{missing}: metadata file not found"]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    (problem,) = check_metadata(bad, SCHEMA)
    assert problem.startswith(f"{bad}: invalid JSON")
