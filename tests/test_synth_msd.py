"""Synthetic MSD generator: layout, geometry, orientation, labels and intensities."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage

from medxfer.data.msd import load_task
from medxfer.data.synth.msd import (MSD_PROFILES, _CT, _MR_BSSFP, _reorient, generate_msd, generate_msd_task,
                                    render_case)

REPO = Path(__file__).resolve().parents[1]
CT_KEYS = [k for k, p in MSD_PROFILES.items() if p.is_ct]


def _task(msd_root, key):
    return load_task(msd_root / MSD_PROFILES[key].folder)


def _data(path):
    return np.asanyarray(nib.load(path).dataobj)


def test_profiles_cover_five_ct_one_mr_one_4d_and_match_the_published_msd_table():
    table = yaml.safe_load((REPO / "configs" / "msd_tasks.yaml").read_text())
    assert len(CT_KEYS) >= 5
    assert any(not p.is_ct and not p.four_d for p in MSD_PROFILES.values())
    assert any(p.four_d for p in MSD_PROFILES.values())
    for p in MSD_PROFILES.values():
        assert p.folder.count("_") == 1 and p.folder.startswith(f"Task{p.task_id:02d}_")  # nnU-Net's converter splits on '_'
        real = table[p.folder]
        assert dict(p.labels) == real["labels"], p.folder
        assert dict(p.modality) == real["modality"], p.folder
        assert ("4D" if p.four_d else "3D") == real["tensorImageSize"]


def test_dataset_json_lists_existing_files_and_ignores_junk(msd_root):
    for p in MSD_PROFILES.values():
        folder = msd_root / p.folder
        meta = json.loads((folder / "dataset.json").read_text())
        for key in ("name", "description", "reference", "licence", "release", "tensorImageSize", "modality",
                    "labels", "numTraining", "numTest", "training", "test"):
            assert key in meta, (p.folder, key)
        assert "synthetic" in meta["description"].lower() and "medxfer" in meta["description"] and "seed 0" in meta["description"]
        assert meta["labels"] == {str(k): v for k, v in p.labels} and meta["modality"] == {str(k): v for k, v in p.modality}
        assert meta["numTraining"] == len(meta["training"]) == 3 and meta["numTest"] == len(meta["test"]) == 1
        for e in meta["training"]:
            assert e["image"].startswith("./imagesTr/") and e["label"].startswith("./labelsTr/")
            assert Path(e["image"]).name == Path(e["label"]).name and Path(e["image"]).name.startswith(p.prefix + "_")
            assert (folder / e["image"]).is_file() and (folder / e["label"]).is_file()
        for t in meta["test"]:
            assert t.startswith("./imagesTs/") and (folder / t).is_file()
        assert sorted(f.name for f in (folder / "imagesTr").iterdir() if not f.name.startswith("._")) == \
            sorted(Path(e["image"]).name for e in meta["training"])
        junk = list((folder / "imagesTr").glob("._*"))
        assert [j.name for j in junk] == [f"._{p.prefix}_1.nii.gz"]
        assert junk[0].name not in json.dumps(meta)
        assert junk[0].read_bytes().startswith(b"\x00\x05\x16\x07")  # AppleDouble magic, not NIfTI
        with pytest.raises(Exception):
            nib.load(junk[0]).get_fdata()


def test_generate_msd_all_profiles_by_default_and_rejects_unknown(tmp_path):
    with pytest.raises(ValueError, match="kidney"):
        generate_msd(tmp_path, profiles=["spleen", "kidney"])
    assert not any(tmp_path.iterdir())  # nothing written before the check
    folders = generate_msd(tmp_path, profiles=["heart", "colon"], num_training=1, num_test=0, shape=(24, 24, 12))
    assert [f.name for f in folders] == ["Task02_Heart", "Task10_Colon"]


def test_headers_qform_sform_units_dtypes_and_same_affine(msd_root):
    for key, p in MSD_PROFILES.items():
        for r in _task(msd_root, key).training:
            img, lab = nib.load(r["image"]), nib.load(r["label"])
            for x in (img, lab):
                assert int(x.header["qform_code"]) == 1 and int(x.header["sform_code"]) == 1
                assert x.header.get_xyzt_units()[0] == "mm"
                assert np.allclose(x.get_qform(), x.get_sform(), atol=1e-4)
            assert np.allclose(img.affine, lab.affine, atol=1e-4)
            assert img.get_data_dtype() == (np.int16 if p.is_ct else np.float32)
            assert lab.get_data_dtype() == np.uint8


def test_header_spacing_equals_requested_spacing(tmp_path):
    folder = generate_msd_task(tmp_path, "spleen", num_training=3, num_test=1, spacing=(0.8, 0.8, 5.0),
                               shape=(40, 40, 12), spacing_jitter=0.0)
    task = load_task(folder)
    for r in task.training + task.test:
        for f in [r["image"]] + ([r["label"]] if "label" in r else []):
            img = nib.load(f)
            zooms = np.asarray(img.header.get_zooms()[:3])
            # the stored orientation may permute axes (PLS): compare as a multiset and per world axis
            assert np.allclose(sorted(zooms), sorted((0.8, 0.8, 5.0)), atol=1e-5)
            assert np.allclose(sorted(img.shape[:3]), sorted((40, 40, 12)))
            canon = nib.as_closest_canonical(img)
            assert np.allclose(canon.header.get_zooms()[:3], (0.8, 0.8, 5.0), atol=1e-5)


def test_small_field_of_view_is_a_miniature_with_every_label_in_view(tmp_path):
    """A user shape/spacing shrinks the field of view: the phantom follows, nothing falls out of view."""
    for key in ("spleen", "liver", "prostate"):
        folder = generate_msd_task(tmp_path, key, num_training=2, num_test=0, shape=(32, 32, 12),
                                   spacing=(1.5, 1.5, 4.0), spacing_jitter=0.0)
        for r in load_task(folder).training:
            label = _data(r["label"])
            for value, _ in MSD_PROFILES[key].labels:
                assert (label == value).sum() > 0, (r["label"], value)
            if MSD_PROFILES[key].is_ct:
                assert (_data(r["image"]) < -900).mean() > 0.02  # air around the (miniature) body


def test_jittered_spacing_stays_within_bound_and_keeps_field_of_view(msd_root):
    for key in ("liver", "heart"):
        p = MSD_PROFILES[key]
        spacings = set()
        for r in _task(msd_root, key).training + _task(msd_root, key).test:
            img = nib.load(r["image"])
            zooms = nib.as_closest_canonical(img).header.get_zooms()[:3]
            assert all(abs(z / p.base_spacing[0] - 1) <= 0.1 + 1e-6 for z in zooms[:2])
            assert np.isclose(zooms[0], zooms[1]) and np.isclose(zooms[2], p.base_spacing[2])
            fov = np.asarray(nib.as_closest_canonical(img).shape[:3]) * np.asarray(zooms)
            assert np.allclose(fov, p.fov_mm, rtol=0.06)
            spacings.add(round(float(zooms[0]), 4))
        assert len(spacings) > 1  # the jitter does vary per case


def test_spleen_default_spacing_is_anisotropic():
    p = MSD_PROFILES["spleen"]
    assert p.base_spacing[2] / p.base_spacing[0] >= 2.5 and p.base_spacing[0] == p.base_spacing[1]


def _world_centroid(path, value=None):
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    idx = np.argwhere(data > 0 if value is None else data == value)
    return nib.affines.apply_affine(img.affine, idx.mean(axis=0))


def test_orientations_vary_but_world_anatomy_is_the_same(msd_root):
    """Spleen on the patient's left (x < 0 in RAS), liver on the right, whatever the stored orientation."""
    seen = set()
    for key, sign in (("spleen", -1), ("liver", +1)):
        task = _task(msd_root, key)
        for r in task.training + task.test:
            affine = nib.load(r["image"]).affine
            seen.add(nib.aff2axcodes(affine))
            if "label" in r:
                # the origin shift is at most 30 mm, the organ sits >= 45 mm from the midline
                assert np.sign(_world_centroid(r["label"], 1)[0]) == sign, r["label"]
    assert len(seen) >= 4


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
    arr4 = rng.random((5, 6, 7, 2))  # 4D channel-last: only the spatial axes move
    new4, _ = _reorient(arr4, affine, ("L", "P", "S"))
    assert new4.shape == (5, 6, 7, 2) and np.array_equal(new4[0, 0, 0], arr4[4, 5, 0])


@pytest.mark.parametrize("key", CT_KEYS)
def test_canonical_ras_puts_spine_posterior_in_every_case(msd_root, key):
    task = _task(msd_root, key)
    codes = set()
    for r in task.training + task.test:
        img = nib.load(r["image"])
        codes.add(nib.aff2axcodes(img.affine))
        canon = nib.as_closest_canonical(img)
        assert nib.aff2axcodes(canon.affine) == ("R", "A", "S")
        data = np.asanyarray(canon.dataobj)
        bone = np.argwhere(data > 400)
        body = np.argwhere(data > -500)
        assert bone[:, 1].mean() < body[:, 1].mean() - 3, r["image"]  # Y grows anterior: the spine is posterior
        assert abs(bone[:, 0].mean() - body[:, 0].mean()) < 0.15 * data.shape[0]  # and near the midline
    assert len(codes) >= 3


def test_monai_orientation_ras_puts_spine_posterior(msd_root):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    load = Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
                    Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))])
    for r in _task(msd_root, "spleen").training:
        img = load(r)["image"][0].numpy()
        bone = np.argwhere(img > 400)
        body = np.argwhere(img > -500)
        assert bone[:, 1].mean() < body[:, 1].mean() - 3


@pytest.mark.parametrize("key,organ,tumour", [("liver", "liver", "liver_tumour"), ("pancreas", "pancreas", "pancreas_tumour"),
                                              ("lung", "lung", "lung_nodule"), ("colon", "colon", "colon_tumour")])
def test_lesion_lies_inside_its_organ_region(key, organ, tumour):
    for i in range(4):
        case = render_case(MSD_PROFILES[key], np.random.default_rng(i))
        assert case.masks[tumour].sum() >= 30
        assert not np.any(case.masks[tumour] & ~case.masks[organ])
        value = [v for v, name in MSD_PROFILES[key].label_masks if name == tumour][0]
        assert set(np.unique(case.label[case.masks[tumour]])) == {value}


@pytest.mark.parametrize("key,least", [("liver", 0.3), ("pancreas", 0.1)])  # the pancreas is thin: its tumour bulges
def test_written_tumour_is_embedded_in_its_organ(msd_root, key, least):
    for r in _task(msd_root, key).training:
        label = _data(r["label"])
        tumour = label == 2
        shell = ndimage.binary_dilation(tumour) & ~tumour
        # the tumour is surrounded by its organ (label 1) to a good part, not only background
        assert (label[shell] == 1).mean() > least, r["label"]


def test_every_declared_label_is_present_in_every_training_case(msd_root):
    for key, p in MSD_PROFILES.items():
        for r in _task(msd_root, key).training:
            label = _data(r["label"])
            counts = {v: int((label == v).sum()) for v, _ in p.labels}
            assert all(c >= 30 for c in counts.values()), (r["label"], counts)
            assert set(np.unique(label)) == set(counts)


def test_ct_values_are_hounsfield_units_with_air_fat_and_bone(msd_root):
    for key in CT_KEYS:
        for r in _task(msd_root, key).training:
            img = _data(r["image"])
            assert img.dtype == np.int16 and img.min() >= -1024 and img.max() <= 3071
            assert (img < -900).mean() > 0.02  # air around the body
            assert (img > 300).sum() > 50  # bone
            assert ((img > -150) & (img < -50)).sum() > 200  # subcutaneous fat


def _core(mask):
    core = ndimage.binary_erosion(mask, iterations=1)
    return core if core.sum() > 10 else mask


@pytest.mark.parametrize("key,tissue", [("spleen", "spleen"), ("liver", "liver"), ("pancreas", "pancreas")])
def test_organ_voxels_have_the_organ_intensity(msd_root, key, tissue):
    for r in _task(msd_root, key).training:
        img = _data(r["image"]).astype(float)
        label = _data(r["label"])
        organ = _core(label == 1)
        mean = img[organ].mean()
        assert abs(mean - _CT[tissue][0]) < 25, (r["image"], mean)
        assert img[organ].std() < 45  # texture + noise, not a mixture of tissues
        assert mean - _CT["fat"][0] > 150
        if key != "spleen":  # hypodense tumour
            assert img[label == 2].mean() < mean - 15


def test_mr_heart_is_positive_with_a_bright_left_atrium(msd_root):
    for r in _task(msd_root, "heart").training:
        img = _data(r["image"])
        label = _data(r["label"])
        assert img.dtype == np.float32 and img.min() >= 0
        la = img[_core(label == 1)].mean()
        body = img[img > 0.2 * np.percentile(img, 99)]
        assert la > np.median(body)  # blood pool is bright on bSSFP
        assert 0.5 * _MR_BSSFP["blood"][0] < la < 1.7 * _MR_BSSFP["blood"][0]  # gain and bias vary per case


def test_4d_profile_is_channel_last_with_3d_label(msd_root):
    task = _task(msd_root, "prostate")
    for r in task.training:
        img, lab = nib.load(r["image"]), nib.load(r["label"])
        assert img.ndim == 4 and img.shape[3] == 2
        assert img.shape[:3] == lab.shape
        data = np.asanyarray(img.dataobj)
        label = np.asanyarray(lab.dataobj)
        # PZ brighter than TZ on both channels (healthy gland: T2-bright, higher ADC), yet the two
        # channels are different contrasts of the same anatomy
        for c in (0, 1):
            assert data[..., c][label == 1].mean() > data[..., c][label == 2].mean()
        assert abs(np.corrcoef(data[..., 0].ravel(), data[..., 1].ravel())[0, 1]) < 0.9
    for t in task.test:
        assert nib.load(t["image"]).shape[3] == 2


def test_same_seed_same_arrays_different_seed_different(tmp_path):
    a = generate_msd_task(tmp_path / "a", "pancreas", num_training=2, num_test=0, seed=5)
    b = generate_msd_task(tmp_path / "b", "pancreas", num_training=2, num_test=0, seed=5)
    c = generate_msd_task(tmp_path / "c", "pancreas", num_training=2, num_test=0, seed=6)
    more = generate_msd_task(tmp_path / "d", "pancreas", num_training=3, num_test=1, seed=5)
    for name in ("imagesTr/pancreas_2.nii.gz", "labelsTr/pancreas_2.nii.gz"):
        imgs = {k: nib.load(f / name) for k, f in dict(a=a, b=b, c=c, d=more).items()}
        arr = {k: np.asanyarray(v.dataobj) for k, v in imgs.items()}
        assert np.array_equal(arr["a"], arr["b"]) and np.array_equal(imgs["a"].affine, imgs["b"].affine)
        assert np.array_equal(arr["a"], arr["d"])  # adding cases does not change existing ones
        assert arr["a"].shape != arr["c"].shape or not np.array_equal(arr["a"], arr["c"])
    assert json.loads((a / "dataset.json").read_text()) == json.loads((b / "dataset.json").read_text())


def test_existing_task_folder_is_not_overwritten_silently(tmp_path):
    folder = generate_msd_task(tmp_path, "spleen", num_training=1, num_test=0)
    marker = folder / "my_notes.txt"
    marker.write_text("precious")
    other = tmp_path / "keep_me.txt"
    other.write_text("not part of the task")
    with pytest.raises(FileExistsError, match=r"Task09_Spleen.*overwrite"):
        generate_msd_task(tmp_path, "spleen", num_training=1, num_test=0)
    assert marker.read_text() == "precious"
    generate_msd_task(tmp_path, "spleen", num_training=1, num_test=0, overwrite=True)
    assert not marker.exists() and other.read_text() == "not part of the task"
    assert (folder / "dataset.json").is_file()
