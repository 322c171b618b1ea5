"""Synthetic MSD generator: layout, geometry, orientation, labels and intensities."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medxfer.data.msd import load_task
from medxfer.data.synth.msd import MSD_PROFILES, _CT, _reorient, generate_msd_task, render_case

REPO = Path(__file__).resolve().parents[1]


def _task(msd_root, key):
    return load_task(msd_root / MSD_PROFILES[key].folder)


def test_profiles_cover_five_ct_one_mr_one_4d_and_match_the_published_msd_table():
    table = yaml.safe_load((REPO / "configs" / "msd_tasks.yaml").read_text())
    ct = [p for p in MSD_PROFILES.values() if p.is_ct]
    assert len(ct) >= 5
    assert any(not p.is_ct and not p.four_d for p in MSD_PROFILES.values())
    assert any(p.four_d for p in MSD_PROFILES.values())
    for p in MSD_PROFILES.values():
        real = table[p.folder]
        assert dict(p.labels) == real["labels"], p.folder
        assert dict(p.modality) == real["modality"], p.folder
        assert ("4D" if p.four_d else "3D") == real["tensorImageSize"]


def test_dataset_json_lists_existing_files_and_ignores_junk(msd_root):
    for p in MSD_PROFILES.values():
        folder = msd_root / p.folder
        meta = json.loads((folder / "dataset.json").read_text())
        assert "synthetic" in meta["description"].lower()
        assert meta["numTraining"] == len(meta["training"]) == 3 and meta["numTest"] == len(meta["test"]) == 1
        for e in meta["training"]:
            assert (folder / e["image"]).is_file() and (folder / e["label"]).is_file()
        junk = list((folder / "imagesTr").glob("._*"))
        assert len(junk) == 1
        assert junk[0].name not in json.dumps(meta)
        with pytest.raises(Exception):
            nib.load(junk[0]).get_fdata()


def test_header_spacing_equals_requested_spacing(tmp_path):
    folder = generate_msd_task(tmp_path, "spleen", num_training=2, num_test=0, spacing=(0.8, 0.8, 5.0),
                               shape=(40, 40, 12), spacing_jitter=0.0)
    for r in load_task(folder).training:
        for f in (r["image"], r["label"]):
            assert np.allclose(nib.load(f).header.get_zooms()[:3], (0.8, 0.8, 5.0), atol=1e-6)


def test_jittered_spacing_stays_within_bound_and_keeps_field_of_view(msd_root):
    p = MSD_PROFILES["liver"]
    for r in _task(msd_root, "liver").training:
        img = nib.load(r["image"])
        zooms = sorted(img.header.get_zooms()[:3])  # axis order may be swapped by the stored orientation
        in_plane = zooms[:2]
        assert all(abs(z / p.base_spacing[0] - 1) <= 0.1 + 1e-6 for z in in_plane)
        assert np.isclose(zooms[2], p.base_spacing[2])
        fov = sorted(np.asarray(img.shape[:3]) * np.asarray(img.header.get_zooms()[:3]))
        assert np.allclose(fov, sorted(np.asarray(p.base_shape) * np.asarray(p.base_spacing)), rtol=0.06)


def _world_centroid(path, value=None):
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    idx = np.argwhere(data > 0 if value is None else data == value)
    return nib.affines.apply_affine(img.affine, idx.mean(axis=0))


def test_orientations_vary_but_world_anatomy_is_the_same(msd_root):
    """Spleen on the patient's left (x < 0 in RAS), liver on the right, whatever the stored orientation."""
    seen = set()
    for key, sign in (("spleen", -1), ("liver", +1)):
        for r in _task(msd_root, key).training + _task(msd_root, key).test:
            seen.add(nib.aff2axcodes(nib.load(r["image"]).affine))
            if "label" in r:
                assert np.sign(_world_centroid(r["label"], 1)[0]) == sign, r["label"]
    assert len(seen) >= 3


def test_reorient_keeps_every_voxel_at_the_same_world_point():
    rng = np.random.default_rng(0)
    arr = rng.random((5, 6, 7))
    affine = np.diag([0.8, 0.8, 5.0, 1.0])
    affine[:3, 3] = (10, -20, 30)
    for codes in [("L", "P", "S"), ("R", "P", "I"), ("P", "L", "S"), ("A", "R", "I")]:
        new, new_aff = _reorient(arr, affine, codes)
        assert nib.aff2axcodes(new_aff) == codes
        for ijk in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
            world = nib.affines.apply_affine(affine, ijk)
            new_ijk = np.round(nib.affines.apply_affine(np.linalg.inv(new_aff), world)).astype(int)
            assert new[tuple(new_ijk)] == arr[ijk]


def test_monai_orientation_ras_puts_spine_posterior_in_every_case(msd_root):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    load = Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"), Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))])
    for r in _task(msd_root, "spleen").training:
        img = load(r)["image"][0].numpy()
        bone = np.argwhere(img > 400)
        body = np.argwhere(img > -500)
        assert bone[:, 1].mean() < body[:, 1].mean() - 3  # Y grows anterior: bone is posterior


@pytest.mark.parametrize("key,organ,tumour", [("liver", "liver", "liver_tumour"), ("pancreas", "pancreas", "pancreas_tumour")])
def test_tumour_lies_inside_its_organ(key, organ, tumour):
    for i in range(3):
        case = render_case(MSD_PROFILES[key], np.random.default_rng(i))
        assert case.masks[tumour].sum() > 0
        assert not np.any(case.masks[tumour] & ~case.masks[organ])
        assert set(np.unique(case.label[case.masks[tumour]])) == {2}


def test_every_declared_label_is_present_in_every_training_case(msd_root):
    for key, p in MSD_PROFILES.items():
        for r in _task(msd_root, key).training:
            label = np.asanyarray(nib.load(r["label"]).dataobj)
            counts = {v: int((label == v).sum()) for v, _ in p.labels}
            assert all(c >= 20 for c in counts.values()), (r["label"], counts)
            assert set(np.unique(label)) == set(counts)


def test_ct_intensities_are_hounsfield_units_with_organ_contrast(msd_root):
    for r in _task(msd_root, "spleen").training:
        img = np.asanyarray(nib.load(r["image"]).dataobj)
        label = np.asanyarray(nib.load(r["label"]).dataobj)
        assert img.dtype == np.int16 and img.min() >= -1024 and img.max() <= 3071
        assert (img == -1000).mean() > 0.02 or (img < -900).mean() > 0.02  # air around the body
        inner = label == 1
        from scipy import ndimage

        core = ndimage.binary_erosion(inner, iterations=1)
        spleen_mean = img[core if core.sum() > 10 else inner].mean()
        assert abs(spleen_mean - _CT["spleen"][0]) < 25
        assert spleen_mean - _CT["fat"][0] > 150


def test_4d_profile_is_channel_last_with_3d_label(msd_root):
    for r in _task(msd_root, "prostate").training:
        img, lab = nib.load(r["image"]), nib.load(r["label"])
        assert img.ndim == 4 and img.shape[3] == 2
        assert img.shape[:3] == lab.shape
        data = np.asanyarray(img.dataobj)
        label = np.asanyarray(lab.dataobj)
        # PZ brighter than TZ on T2 and on ADC (the contrast the two channels carry)
        for c in (0, 1):
            assert data[..., c][label == 1].mean() > data[..., c][label == 2].mean()


def test_same_seed_same_arrays_different_seed_different(tmp_path):
    a = generate_msd_task(tmp_path / "a", "pancreas", num_training=2, num_test=0, seed=5)
    b = generate_msd_task(tmp_path / "b", "pancreas", num_training=2, num_test=0, seed=5)
    c = generate_msd_task(tmp_path / "c", "pancreas", num_training=2, num_test=0, seed=6)
    more = generate_msd_task(tmp_path / "d", "pancreas", num_training=3, num_test=0, seed=5)
    name = "imagesTr/pancreas_2.nii.gz"
    arr = {k: np.asanyarray(nib.load(f / name).dataobj) for k, f in dict(a=a, b=b, c=c, d=more).items()}
    assert np.array_equal(arr["a"], arr["b"])
    assert np.array_equal(arr["a"], arr["d"])  # adding cases does not change existing ones
    assert arr["a"].shape != arr["c"].shape or not np.array_equal(arr["a"], arr["c"])


def test_existing_task_folder_is_not_overwritten_silently(tmp_path):
    folder = generate_msd_task(tmp_path, "spleen", num_training=1, num_test=0)
    marker = folder / "my_notes.txt"
    marker.write_text("precious")
    with pytest.raises(FileExistsError, match="Task09_Spleen"):
        generate_msd_task(tmp_path, "spleen", num_training=1, num_test=0)
    assert marker.read_text() == "precious"
    generate_msd_task(tmp_path, "spleen", num_training=1, num_test=0, overwrite=True)
    assert not marker.exists()
