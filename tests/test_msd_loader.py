"""MSD and nnU-Net v2 loaders: structure, MONAI loading, clear errors."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medxfer.data.msd import load_msd_datalist, load_task, scan_task
from medxfer.data.problems import DatasetError


def _tasks(root):
    return sorted(p for p in root.iterdir() if (p / "dataset.json").is_file())


def test_every_generated_task_loads_with_matching_counts(msd_root):
    tasks = _tasks(msd_root)
    assert len(tasks) >= 7
    for folder in tasks:
        task = load_task(folder)
        meta = json.loads((folder / "dataset.json").read_text())
        assert len(task.training) == meta["numTraining"] == 3
        assert len(task.test) == meta["numTest"] == 1
        assert task.labels[0] == "background"
        for r in task.training:
            assert r["image"].endswith(".nii.gz") and not r["image"].split("/")[-1].startswith("._")


def test_macos_junk_file_is_ignored(msd_root):
    folder = _tasks(msd_root)[0]
    junk = [p for p in (folder / "imagesTr").iterdir() if p.name.startswith("._")]
    assert junk, "the generator writes a ._ file on purpose"
    ids = [r["id"] for r in load_task(folder).training]
    assert not any(i.startswith("._") for i in ids)


def test_monai_loadimaged_every_training_pair_shapes_match(msd_root):
    """Acceptance: LoadImaged + EnsureChannelFirstd on every pair; 4D images give C > 1."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    load = Compose([LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"])])
    saw_multichannel = False
    for folder in _tasks(msd_root):
        task = load_task(folder)
        for record in task.training:
            data = load(record)
            image, label = data["image"], data["label"]
            assert image.shape[1:] == label.shape[1:], record["image"]
            assert label.shape[0] == 1
            assert image.shape[0] == task.num_channels
            if task.four_d:
                assert image.shape[0] > 1
                saw_multichannel = True
            # the affine MONAI reads is the file's affine
            assert np.allclose(image.affine.numpy(), nib.load(record["image"]).affine, atol=1e-4)
    assert saw_multichannel


def test_nnunet_v2_layout_loads_multichannel_as_list(tmp_path, msd_root):
    """Build an nnU-Net v2 raw folder by hand (one file per channel) and read it back."""
    src = load_task(next(p for p in _tasks(msd_root) if load_task(p).four_d))
    dst = tmp_path / "Dataset005_Prostate"
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    for i, r in enumerate(src.training):
        img = nib.load(r["image"])
        data = np.asanyarray(img.dataobj)
        for c in range(data.shape[3]):
            nib.save(nib.Nifti1Image(data[..., c], img.affine), dst / "imagesTr" / f"case{i}_{c:04d}.nii.gz")
        shutil.copy(r["label"], dst / "labelsTr" / f"case{i}.nii.gz")
    (dst / "imagesTr" / "._case0_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07junk")
    labels = {name: value for value, name in src.labels.items()}
    (dst / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2", "1": "ADC"}, "labels": labels,
                                                  "numTraining": len(src.training), "file_ending": ".nii.gz"}))
    task = load_task(dst)
    assert task.layout == "nnunetv2" and task.num_channels == 2
    assert [r["id"] for r in task.training] == [f"case{i}" for i in range(len(src.training))]
    assert all(isinstance(r["image"], list) and len(r["image"]) == 2 for r in task.training)

    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    data = Compose([LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"])])(task.training[0])
    assert data["image"].shape[0] == 2 and data["image"].shape[1:] == data["label"].shape[1:]

    (dst / "imagesTr" / "case1_0001.nii.gz").unlink()
    _, problems = scan_task(dst)
    assert any(p.path.endswith("case1_0001.nii.gz") and "missing" in p.reason for p in problems)


def _copy_task(msd_root, tmp_path):
    src = _tasks(msd_root)[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_listed_but_missing_file_is_named(tmp_path, msd_root):
    folder = _copy_task(msd_root, tmp_path)
    victim = sorted((folder / "labelsTr").glob("*.nii.gz"))[0]
    victim.unlink()
    with pytest.raises(DatasetError, match=victim.name + ".*does not exist"):
        load_task(folder)


def test_broken_dataset_json_is_named_with_line(tmp_path, msd_root):
    folder = _copy_task(msd_root, tmp_path)
    (folder / "dataset.json").write_text('{"name": "x",\n "training": [}')
    with pytest.raises(DatasetError, match=r"dataset.json: invalid JSON at line 2"):
        load_task(folder)


def test_missing_required_key_and_count_mismatch(tmp_path, msd_root):
    folder = _copy_task(msd_root, tmp_path)
    meta = json.loads((folder / "dataset.json").read_text())
    meta["numTraining"] += 1
    (folder / "dataset.json").write_text(json.dumps(meta))
    _, problems = scan_task(folder)
    assert any("numTraining is" in p.reason for p in problems)
    del meta["labels"]
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="lacks required key.*labels"):
        load_task(folder)


def test_datalist_sections(msd_root):
    folder = _tasks(msd_root)[0]
    assert len(load_msd_datalist(folder, "test")) == 1
    assert set(load_msd_datalist(folder)[0]) == {"id", "image", "label"}
    with pytest.raises(ValueError, match="section"):
        load_msd_datalist(folder, "validation")
