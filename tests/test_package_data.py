"""Bundles and shared configs ship as package data (issue 12): a non-editable install works outside
the checkout, the checkout (editable install) keeps using its own ``bundles/`` and ``configs/``.

The wheel is built from a copy of the checkout's sources with the test environment's setuptools
(a few seconds, no network) and checked with zipfile; its unpacked copy is imported in a
subprocess to check what :mod:`medxfer.resources` resolves to there. The full install + run is
``scripts/ci_install_smoke.sh`` (CI).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medxfer import resources
from medxfer.workflows.bundle import bundle_dir

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ["msd_seg3d", "seg2d_transfer", "tatl_skin", "transferability"]
#: Files a run may leave in a bundle folder (git-ignored): they must never reach the wheel.
GENERATED = ["bundles/msd_seg3d/models/model.pt", "bundles/msd_seg3d/models/model.ts",
             "bundles/msd_seg3d/models/plans.json", "bundles/msd_seg3d/bank/bank.yaml",
             "bundles/msd_seg3d/bank/checkpoints/unet_scratch.pt", "bundles/tatl_skin/runs/tatl/tatl_run.json",
             "bundles/seg2d_transfer/configs/__pycache__/x.cpython-311.pyc", "bundles/msd_seg3d/configs/stray.pt"]


def test_checkout_resolves_to_its_own_folders():
    """Editable install / source tree: the checkout's bundles/ and configs/, not a copy."""
    assert resources.bundles_root() == REPO / "bundles"
    assert resources.configs_root() == REPO / "configs"
    assert resources.bundle_names() == BUNDLES
    assert (resources.bundle_path("msd_seg3d") / "configs" / "metadata.json").is_file()
    assert bundle_dir("msd_seg3d") == REPO / "bundles" / "msd_seg3d"
    assert resources.config_path("bank_ccfv") == REPO / "configs" / "bank_ccfv.yaml"
    assert resources.config_path("msd_tasks.yaml").is_file()
    assert not resources.is_installed_copy(resources.bundle_path("msd_seg3d"))
    with pytest.raises(FileNotFoundError, match=r"bundles/nope: no such bundle; bundles here: \['msd_seg3d'"):
        bundle_dir("nope")


def _copy_sources(dest: Path) -> None:
    """pyproject.toml, README.md and the three shipped folders (no caches), as a clean checkout has them."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "runs", "bank", "*.pt", "*.ts", "plans.json")
    for name in ("medxfer", "bundles", "configs"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout's sources, plus (in the copy only) every kind of generated file."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    _copy_sources(src)
    for rel in GENERATED:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("generated\n")
    try:
        isolated = int(importlib.metadata.version("setuptools").split(".")[0]) < 77
    except importlib.metadata.PackageNotFoundError:
        isolated = True
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"), str(src)]
    proc = subprocess.run(cmd + ([] if isolated else ["--no-build-isolation"]), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = (tmp / "dist").glob("medxfer-*.whl")
    return whl


def test_wheel_ships_bundles_and_configs_but_no_outputs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for bundle in BUNDLES:
        tracked = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "bundles" / bundle).rglob("*")
                         if p.is_file() and p.parts[-2] in ("configs", "docs") and "__pycache__" not in p.parts)
        assert tracked, bundle
        for rel in tracked + [f"bundles/{bundle}/LICENSE"]:
            assert f"medxfer/{rel}" in names, rel
    assert {"medxfer/configs/bank_ccfv.yaml", "medxfer/configs/msd_tasks.yaml"} <= names
    # every module of the package (a subpackage missing from pyproject's `packages` list would be dropped)
    modules = {f"medxfer/{p.relative_to(REPO / 'medxfer').as_posix()}" for p in (REPO / "medxfer").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert not modules - names, f"not in the wheel (add the subpackage to pyproject.toml): {sorted(modules - names)}"
    leaked = sorted(n for n in names if n.startswith("medxfer/bundles/") and (
        n.endswith((".pt", ".ts", ".pyc", "plans.json")) or any(f"/{d}/" in n for d in ("models", "bank", "runs", "__pycache__"))))
    assert not leaked, f"generated files in the wheel: {leaked}"
    assert not [n for n in names if n.split("/")[0] in ("bundles", "configs", "tests", "scripts")], "top-level data"


def test_unpacked_wheel_resolves_to_its_own_copy(wheel, tmp_path):
    """Imported from the unpacked wheel, medxfer finds the bundles it ships, refuses outputs into them."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    empty = tmp_path / "cwd"
    empty.mkdir()
    code = r"""
import json
from pathlib import Path
from medxfer import resources as r
from medxfer.workflows.bundle import _refuse_installed_outputs, bundle_dir

class Parser(dict):  # what _refuse_installed_outputs reads of a MONAI ConfigParser
    get_parsed_content = dict.__getitem__

root = bundle_dir("tatl_skin")
try:
    _refuse_installed_outputs(Parser(output_dir=str(root / "runs" / "tatl")), root)
    refused = ""
except ValueError as e:
    refused = str(e)
_refuse_installed_outputs(Parser(output_dir="/elsewhere/run", bank_root="/elsewhere/bank"), root)
try:
    bundle_dir("nope")
except FileNotFoundError as e:
    missing = str(e)
print(json.dumps({"package": str(r.package_root()), "bundles": str(r.bundles_root()), "names": r.bundle_names(),
                  "meta": (r.bundle_path("msd_seg3d") / "configs" / "metadata.json").is_file(),
                  "bank_config": str(r.config_path("bank_ccfv.yaml")), "installed": r.is_installed_copy(root),
                  "refused": refused, "missing": missing}))
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["package"] == str(site / "medxfer")
    assert got["bundles"] == str(site / "medxfer" / "bundles")
    assert got["names"] == BUNDLES and got["meta"] and got["installed"]
    assert Path(got["bank_config"]).is_file() and got["bank_config"].startswith(str(site))
    assert "output_dir=" in got["refused"] and "installed bundle" in got["refused"]
    assert got["missing"] == f"{site / 'medxfer' / 'bundles' / 'nope'}: no such bundle; bundles here: {BUNDLES}"
