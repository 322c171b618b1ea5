"""`medxfer check-data` names every broken file of a corrupted dataset (issue acceptance)."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from medxfer.cli import main
from medxfer.data.msd import load_task


def _edit_label(path, edit):
    """Rewrite a label file with ``edit(data, affine) -> (data, affine)``."""
    lab = nib.load(path)
    data, affine = edit(np.asanyarray(lab.dataobj).copy(), lab.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def _set_voxel(value):
    def edit(data, affine):
        data[1, 1, 1] = value
        return data, affine

    return edit


def _check(path, capsys):
    code = main(["check-data", str(path), "--quiet"])
    return code, capsys.readouterr().out


@pytest.fixture
def task_copy(tmp_path, msd_root):
    """A writable copy of the generated single-channel CT spleen-like task and its first record."""
    src = next(p for p in sorted(msd_root.iterdir()) if p.name.endswith("Spleen"))
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst, load_task(dst).training[0]


def test_clean_generated_data_passes(msd_root, isic_roots, capsys):
    for path in [msd_root, *isic_roots.values()]:
        code, out = _check(path, capsys)
        assert code == 0, out
        assert "problem" not in out


def test_truncated_nifti_is_named(task_copy, capsys):
    folder, record = task_copy
    raw = open(record["image"], "rb").read()
    open(record["image"], "wb").write(raw[: len(raw) // 2])
    code, out = _check(folder, capsys)
    assert code == 1
    assert f"{record['image']}: cannot read image" in out


def test_label_shape_mismatch_is_named(task_copy, capsys):
    folder, record = task_copy
    _edit_label(record["label"], lambda data, affine: (data[:-2], affine))
    code, out = _check(folder, capsys)
    assert code == 1
    assert f"{record['image']}: spatial shape" in out or f"{record['label']}: spatial shape" in out


def test_undeclared_label_value_7_is_named(task_copy, capsys):
    folder, record = task_copy
    _edit_label(record["label"], _set_voxel(7))
    code, out = _check(folder, capsys)
    assert code == 1
    assert f"{record['label']}: label value(s) [7] not declared" in out


def test_loader_with_check_files_raises_the_same_error(task_copy):
    from medxfer.data.problems import DatasetError

    folder, record = task_copy
    _edit_label(record["label"], _set_voxel(7))
    load_task(folder)  # structure alone is fine
    with pytest.raises(DatasetError, match=record["label"] + r": label value\(s\) \[7\]"):
        load_task(folder, check_files=True)


def test_nan_voxel_is_named(task_copy, capsys):
    folder, record = task_copy
    img = nib.load(record["image"])
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[3, 4, 5] = np.nan
    out_img = nib.Nifti1Image(data, img.affine)
    out_img.set_qform(img.affine, 1)
    out_img.set_sform(img.affine, 1)
    nib.save(out_img, record["image"])
    code, out = _check(folder, capsys)
    assert code == 1
    assert f"{record['image']}: 1 voxel(s) are NaN or infinite" in out


def test_affine_mismatch_is_named(task_copy, capsys):
    folder, record = task_copy
    def shift(data, affine):
        affine[:3, 3] += 5.0  # label shifted by 5 mm
        return data, affine

    _edit_label(record["label"], shift)
    code, out = _check(folder, capsys)
    assert code == 1
    assert "affine differs" in out and record["image"] in out


def test_gzip_that_is_not_nifti_is_named(task_copy, capsys):
    folder, record = task_copy
    with gzip.open(record["label"], "wb") as f:
        f.write(b"this is not a nifti file" * 20)
    code, out = _check(folder, capsys)
    assert code == 1
    assert f"{record['label']}: cannot read image" in out


@pytest.fixture
def isic_copy(tmp_path, isic_roots):
    dst = tmp_path / "isic2018"
    shutil.copytree(isic_roots[2018], dst)
    return dst


def test_missing_attribute_mask_is_named(isic_copy, capsys):
    victim = isic_copy / "ISIC2018_Task2_Training_GroundTruth_v3" / "ISIC_0000003_attribute_streaks.png"
    victim.unlink()
    code, out = _check(isic_copy, capsys)
    assert code == 1
    assert str(victim) in out


def test_bad_image_id_is_named(isic_copy, capsys):
    folder = isic_copy / "ISIC2018_Task1-2_Training_Input"
    bad = folder / "ISIC_12345.jpg"
    shutil.copy(folder / "ISIC_0000001.jpg", bad)
    code, out = _check(isic_copy, capsys)
    assert code == 1
    assert f"{bad}: file name is not an ISIC id" in out


def test_wrong_size_mask_is_named(isic_copy, capsys):
    from PIL import Image

    victim = isic_copy / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000002_segmentation.png"
    Image.new("L", (17, 13)).save(victim)
    code, out = _check(isic_copy, capsys)
    assert code == 1
    assert f"{victim}: mask is 17x13" in out or (str(victim) in out and "size" in out)


def test_path_without_dataset_is_reported(tmp_path, capsys):
    code, out = _check(tmp_path, capsys)
    assert code == 1 and "no dataset found" in out
    code, out = _check(tmp_path / "nope", capsys)
    assert code == 1 and "does not exist" in out
