"""ISIC loader: round trip of a generated set, and one named Problem per corrupted file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data.isic import (
    ISIC_ID,
    check_isic_record,
    convert_isic2017_superpixels,
    detect_isic_year,
    load_isic,
    scan_isic,
)
from medxfer.data.problems import DatasetError
from medxfer.data.synth.isic import generate_isic

IMG18, T1_18, T2_18 = (
    "ISIC2018_Task1-2_Training_Input",
    "ISIC2018_Task1_Training_GroundTruth",
    "ISIC2018_Task2_Training_GroundTruth_v3",
)
ATTRS_2018 = ("globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks")
ATTRS_2017 = ("milia_like_cyst", "negative_network", "pigment_network", "streaks")


@pytest.fixture
def isic2018(tmp_path) -> Path:
    return generate_isic(tmp_path / "isic2018", year=2018, num_images=4, size=(40, 52), seed=1)


def _problems_by_path(problems):
    return {p.path: p.reason for p in problems}


def test_round_trip_2018(isic2018):
    records, problems = scan_isic(isic2018)
    assert problems == []
    ids = [f"ISIC_{i:07d}" for i in range(4)]
    assert [r["id"] for r in records] == ids
    for r in records:
        assert ISIC_ID.fullmatch(r["id"])
        assert r["image"] == str(isic2018.absolute() / IMG18 / f"{r['id']}.jpg")
        assert r["lesion"] == str(isic2018.absolute() / T1_18 / f"{r['id']}_segmentation.png")
        assert tuple(r["attributes"]) == ATTRS_2018
        for name, path in r["attributes"].items():
            assert path == str(isic2018.absolute() / T2_18 / f"{r['id']}_attribute_{name}.png")
            assert r[f"attribute_{name}"] == path
        assert all(Path(p).is_file() for p in [r["image"], r["lesion"], *r["attributes"].values()])
        assert check_isic_record(r) == []
    assert load_isic(isic2018, check_files=True) == records
    assert detect_isic_year(isic2018) == 2018


def test_round_trip_2017_ignores_superpixels_license_and_metadata(tmp_path):
    root = generate_isic(tmp_path, year=2017, num_images=3, size=(40, 52))
    images = root / "ISIC-2017_Training_Data"
    Image.new("RGB", (52, 40)).save(images / "ISIC_0000000_superpixels.png")
    (images / "ISIC-2017_Training_Data_metadata.csv").write_text("image_id,age\n")
    (images / "LICENSE.txt").write_text("CC-BY-NC")
    assert detect_isic_year(root) == 2017
    records = load_isic(root)
    assert [r["id"] for r in records] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert tuple(records[0]["attributes"]) == ATTRS_2017
    assert records[0]["attribute_streaks"].endswith("ISIC-2017_Training_Part2_GroundTruth/ISIC_0000000_streaks.png")
    assert all(check_isic_record(r) == [] for r in records)


def test_task1_needs_no_task2_folder_and_has_no_attribute_keys(isic2018):
    for f in (isic2018 / T2_18).iterdir():
        f.unlink()
    (isic2018 / T2_18).rmdir()
    records = load_isic(isic2018, task=1)
    assert len(records) == 4
    assert all(set(r) == {"id", "image", "lesion"} for r in records)
    with pytest.raises(DatasetError, match=T2_18):
        load_isic(isic2018, task=2)


def test_missing_attribute_mask_is_named_and_load_raises(isic2018):
    gone = isic2018 / T2_18 / "ISIC_0000002_attribute_streaks.png"
    gone.unlink()
    records, problems = scan_isic(isic2018)
    assert [p.path for p in problems] == [str(gone.absolute())]
    assert "missing attribute mask" in problems[0].reason
    assert "ISIC_0000002" not in [r["id"] for r in records] and len(records) == 3
    with pytest.raises(DatasetError, match="ISIC_0000002_attribute_streaks.png"):
        load_isic(isic2018)


def test_missing_lesion_mask_and_orphan_masks_are_problems(isic2018):
    (isic2018 / T1_18 / "ISIC_0000001_segmentation.png").unlink()
    (isic2018 / IMG18 / "ISIC_0000003.jpg").unlink()
    by_path = _problems_by_path(scan_isic(isic2018)[1])
    assert "missing lesion mask" in by_path[str(isic2018.absolute() / T1_18 / "ISIC_0000001_segmentation.png")]
    assert "no image" in by_path[str(isic2018.absolute() / T1_18 / "ISIC_0000003_segmentation.png")]
    for name in ATTRS_2018:
        assert "no image" in by_path[str(isic2018.absolute() / T2_18 / f"ISIC_0000003_attribute_{name}.png")]


def test_non_isic_file_names_and_unknown_attribute_are_problems(isic2018):
    src = isic2018 / IMG18 / "ISIC_0000000.jpg"
    for bad in ("ISIC_123.jpg", "foo.jpg", "ISIC_0000000.png"):
        (isic2018 / IMG18 / bad).write_bytes(src.read_bytes())
    mask = isic2018 / T2_18 / "ISIC_0000000_attribute_streaks.png"
    (isic2018 / T2_18 / "ISIC_0000000_attribute_dots.png").write_bytes(mask.read_bytes())
    records, problems = scan_isic(isic2018)
    by_path = _problems_by_path(problems)
    for bad in ("ISIC_123.jpg", "foo.jpg", "ISIC_0000000.png"):
        assert "not an ISIC id ISIC_nnnnnnn" in by_path[str(isic2018.absolute() / IMG18 / bad)]
    assert "unknown attribute 'dots'" in by_path[str(isic2018.absolute() / T2_18 / "ISIC_0000000_attribute_dots.png")]
    assert len(problems) == 4 and len(records) == 4


def test_macos_and_hidden_junk_is_ignored(isic2018):
    (isic2018 / IMG18 / "._ISIC_0000000.jpg").write_bytes(b"\x00\x05\x16\x07junk")
    (isic2018 / T2_18 / "._ISIC_0000000_attribute_streaks.png").write_bytes(b"junk")
    (isic2018 / IMG18 / ".DS_Store").write_bytes(b"junk")
    (isic2018 / T1_18 / "ATTRIBUTION.txt").write_text("ISIC")
    records, problems = scan_isic(isic2018)
    assert problems == [] and len(records) == 4


def test_mask_of_wrong_size_is_named(isic2018):
    record = load_isic(isic2018)[0]
    path = record["attribute_globules"]
    Image.fromarray(np.zeros((80, 100), np.uint8)).save(path)
    w, h = Image.open(record["image"]).size
    problems = check_isic_record(record)
    assert [p.path for p in problems] == [path]
    assert problems[0].reason == f"mask is 100x80 but image is {w}x{h}"


def test_mask_with_value_128_is_named(isic2018):
    record = load_isic(isic2018)[1]
    w, h = Image.open(record["image"]).size
    values = np.zeros((h, w), np.uint8)
    values[2:5, 2:5] = 128
    values[10, 10] = 255
    Image.fromarray(values).save(record["lesion"])
    problems = check_isic_record(record)
    assert [p.path for p in problems] == [record["lesion"]]
    assert "0/255" in problems[0].reason and "128" in problems[0].reason


def test_rgb_mask_is_not_single_channel(isic2018):
    record = load_isic(isic2018)[0]
    w, h = Image.open(record["image"]).size
    Image.new("RGB", (w, h)).save(record["attribute_streaks"])
    problems = check_isic_record(record)
    assert [p.path for p in problems] == [record["attribute_streaks"]]
    assert "single-channel" in problems[0].reason


def test_truncated_jpeg_is_named_and_load_raises_dataset_error(isic2018):
    record = load_isic(isic2018)[2]
    data = Path(record["image"]).read_bytes()
    Path(record["image"]).write_bytes(data[: len(data) // 2])
    problems = check_isic_record(record)
    assert [p.path for p in problems] == [record["image"]]
    assert problems[0].reason.startswith("cannot read image:")
    with pytest.raises(DatasetError) as err:
        load_isic(isic2018, check_files=True)
    assert "ISIC_0000002.jpg" in str(err.value)


def test_garbage_mask_file_is_unreadable_not_a_traceback(isic2018):
    record = load_isic(isic2018)[0]
    Path(record["lesion"]).write_bytes(b"not a png at all")
    problems = check_isic_record(record)
    assert [p.path for p in problems] == [record["lesion"]]
    assert problems[0].reason.startswith("cannot read mask:")


def test_missing_folders_and_foreign_roots(tmp_path, isic2018):
    for f in (isic2018 / T1_18).iterdir():
        f.unlink()
    (isic2018 / T1_18).rmdir()
    records, problems = scan_isic(isic2018)
    assert records == [] and [p.path for p in problems] == [str(isic2018.absolute() / T1_18)]

    empty = tmp_path / "not_isic"
    empty.mkdir()
    assert detect_isic_year(empty) is None
    with pytest.raises(DatasetError) as err:
        load_isic(empty)
    assert "ISIC2018_Task1-2_Training_Input" in str(err.value) and "ISIC-2017_Training_Data" in str(err.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_isic(tmp_path / "nowhere")


def test_flat_keys_work_with_monai_load_imaged(isic2018):
    monai_transforms = pytest.importorskip("monai.transforms")
    record = load_isic(isic2018)[0]
    keys = ["image", "lesion"] + [f"attribute_{a}" for a in ATTRS_2018]
    data = monai_transforms.LoadImaged(keys=keys, image_only=True, ensure_channel_first=True)(record)
    w, h = Image.open(record["image"]).size
    assert tuple(data["image"].shape) == (3, w, h)  # PIL reader: spatial axes (W, H)
    for key in keys[1:]:
        assert tuple(data[key].shape) == (1, w, h)


def test_2017_superpixel_json_without_pngs_is_reported_once_with_a_hint(tmp_path):
    root = generate_isic(tmp_path, year=2017, num_images=2, size=(40, 52))
    part2 = root / "ISIC-2017_Training_Part2_GroundTruth"
    (part2 / "ISIC_0000000_features.json").write_text("{}")
    (part2 / "ISIC_0000001_features.json").write_text("{}")
    assert scan_isic(root)[1] == []  # converted already: the JSON beside the PNGs is ignored
    for png in part2.glob("ISIC_0000000_*.png"):
        png.unlink()
    records, problems = scan_isic(root)
    assert [p.path for p in problems] == [str((part2 / "ISIC_0000000_features.json").absolute())]
    assert "medxfer convert-isic2017" in problems[0].reason
    assert [r["id"] for r in records] == ["ISIC_0000001"]


def _superpixel_png(index: np.ndarray, path):
    rgb = np.stack([index & 255, (index >> 8) & 255, (index >> 16) & 255], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def test_convert_isic2017_superpixels_paints_marked_superpixels(tmp_path):
    from medxfer.cli import main

    root = generate_isic(tmp_path, year=2017, num_images=1, size=(40, 52))
    images, part2 = root / "ISIC-2017_Training_Data", root / "ISIC-2017_Training_Part2_GroundTruth"
    h, w = np.asarray(Image.open(images / "ISIC_0000000.jpg")).shape[:2]
    for png in part2.glob("*.png"):
        png.unlink()
    # 300 superpixels: ids above 255 exercise the green channel of the encoding
    index = (np.arange(h * w).reshape(h, w) * 300 // (h * w)).astype(np.int64)
    _superpixel_png(index, images / "ISIC_0000000_superpixels.png")
    marks = {name: [0] * 300 for name in ("milia_like_cyst", "negative_network", "pigment_network", "streaks")}
    marks["pigment_network"][7] = 1
    marks["pigment_network"][290] = 1
    (part2 / "ISIC_0000000_features.json").write_text(json.dumps(marks))
    assert main(["convert-isic2017", str(root)]) == 0
    pigment = np.asarray(Image.open(part2 / "ISIC_0000000_pigment_network.png"))
    assert set(np.unique(pigment)) == {0, 255}
    assert np.array_equal(pigment == 255, np.isin(index, [7, 290]))
    assert not np.asarray(Image.open(part2 / "ISIC_0000000_streaks.png")).any()
    assert [r["id"] for r in load_isic(root, check_files=True)] == ["ISIC_0000000"]
    assert main(["convert-isic2017", str(root)]) == 1  # masks exist: not overwritten silently
    marks["streaks"] = [0] * 10
    (part2 / "ISIC_0000000_features.json").write_text(json.dumps(marks))
    with pytest.raises(DatasetError, match="features.json: 'streaks' has 10 entries but .* 300 superpixels"):
        convert_isic2017_superpixels(root, overwrite=True)


def test_root_holding_both_years_is_read_as_asked(tmp_path):
    generate_isic(tmp_path, year=2018, num_images=2, size=(32, 40))
    generate_isic(tmp_path, year=2017, num_images=3, size=(32, 40))
    assert detect_isic_year(tmp_path) == 2018
    assert len(load_isic(tmp_path)) == 2
    records = load_isic(tmp_path, year=2017)
    assert len(records) == 3 and "ISIC-2017_Training_Data" in records[0]["image"]
