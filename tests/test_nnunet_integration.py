"""Acceptance: generated MSD data goes through nnU-Net v2's own conversion and integrity check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _nnunet(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    exe = BIN / cmd[0]
    if not exe.exists():
        pytest.fail(f"{exe} not found: nnunetv2 is a required dependency")
    return subprocess.run([str(exe), *cmd[1:]], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["spleen", "prostate"])
def test_generated_task_passes_nnunet_convert_and_verify_dataset_integrity(tmp_path, profile):
    from medxfer.data.synth.msd import generate_msd_task

    task = generate_msd_task(tmp_path / "msd", profile=profile, num_training=3, num_test=1, seed=1)
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
        Path(env[var]).mkdir()
    env["nnUNet_def_n_proc"] = "1"
    dataset_id = 900 + (1 if profile == "spleen" else 2)

    conv = _nnunet(["nnUNetv2_convert_MSD_dataset", "-i", str(task), "-overwrite_id", str(dataset_id), "-np", "1"], env)
    assert conv.returncode == 0, conv.stderr[-3000:]
    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset_id}_*"))
    meta = json.loads((raw / "dataset.json").read_text())
    n_channels = len(meta["channel_names"])
    assert len(list((raw / "imagesTr").glob("*.nii.gz"))) == 3 * n_channels
    assert not list((raw / "imagesTr").glob("._*"))  # the junk file was not converted

    plan = _nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "--verify_dataset_integrity",
                    "-c", "3d_fullres", "-np", "1", "-npfp", "1", "--no_pbar"], env)
    assert plan.returncode == 0, (plan.stdout[-3000:], plan.stderr[-3000:])
    pre = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{dataset_id}_*"))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    fullres = plans["configurations"]["3d_fullres"]
    # nnU-Net's target spacing comes from the generated headers: anisotropic like the profile
    assert fullres["spacing"][0] > fullres["spacing"][2]  # nnU-Net spacing order is (z, y, x)
    assert len(list((pre / "nnUNetPlans_3d_fullres").glob("*"))) >= 3
