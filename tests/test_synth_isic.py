"""Generated ISIC data: exact on-disk layout, mask values, masks vs. what was drawn,
prevalence, sizes, appearance, determinism, refusal to overwrite."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from medxfer.data.synth.isic import (
    ATTRIBUTE_PREVALENCE,
    ISIC_ATTRIBUTES,
    assign_attributes,
    generate_isic,
    render_case,
)

ATTRS_2018 = ("globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks")
ATTRS_2017 = ("milia_like_cyst", "negative_network", "pigment_network", "streaks")
# Written out here (not taken from the code) so the test checks the published names.
PREVALENCE = {
    2018: {"pigment_network": 0.5867, "milia_like_cyst": 0.2625, "globules": 0.2321,
           "negative_network": 0.0732, "streaks": 0.0386},
    2017: {"streaks": 0.0798, "negative_network": 0.0862, "milia_like_cyst": 0.3355,
           "pigment_network": 0.7903},
}


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_attribute_tables_match_spec_and_paper():
    assert ISIC_ATTRIBUTES == {2018: ATTRS_2018, 2017: ATTRS_2017}
    assert ATTRIBUTE_PREVALENCE == PREVALENCE


def test_2018_layout_and_file_names_are_exactly_isic(tmp_path):
    out = generate_isic(tmp_path / "isic", year=2018, num_images=3, size=(40, 52), first_id=7)
    assert out == tmp_path / "isic"
    assert sorted(p.name for p in out.iterdir()) == [
        "ISIC2018_Task1-2_Training_Input",
        "ISIC2018_Task1_Training_GroundTruth",
        "ISIC2018_Task2_Training_GroundTruth_v3",
    ]
    ids = ["ISIC_0000007", "ISIC_0000008", "ISIC_0000009"]
    assert _files(out / "ISIC2018_Task1-2_Training_Input") == [f"{i}.jpg" for i in ids]
    assert _files(out / "ISIC2018_Task1_Training_GroundTruth") == [f"{i}_segmentation.png" for i in ids]
    assert _files(out / "ISIC2018_Task2_Training_GroundTruth_v3") == sorted(
        f"{i}_attribute_{a}.png" for i in ids for a in ATTRS_2018
    )


def test_2017_layout_and_file_names_are_exactly_isic(tmp_path):
    out = generate_isic(tmp_path, year=2017, num_images=2, size=(40, 52))
    assert sorted(p.name for p in out.iterdir()) == [
        "ISIC-2017_Training_Data",
        "ISIC-2017_Training_Part1_GroundTruth",
        "ISIC-2017_Training_Part2_GroundTruth",
    ]
    ids = ["ISIC_0000000", "ISIC_0000001"]
    assert _files(out / "ISIC-2017_Training_Data") == [f"{i}.jpg" for i in ids]
    assert _files(out / "ISIC-2017_Training_Part1_GroundTruth") == [f"{i}_segmentation.png" for i in ids]
    assert _files(out / "ISIC-2017_Training_Part2_GroundTruth") == sorted(
        f"{i}_{a}.png" for i in ids for a in ATTRS_2017
    )


@pytest.mark.parametrize("year", [2018, 2017])
def test_images_are_rgb_jpeg_in_size_range_and_masks_are_8bit_0_255_of_same_size(tmp_path, year):
    size, jitter = (60, 80), 0.2
    out = generate_isic(tmp_path, year=year, num_images=12, size=size, size_jitter=jitter, seed=3)
    sizes = set()
    for jpg in sorted(out.glob("*/*.jpg")):
        with Image.open(jpg) as img:
            img.load()
            assert img.format == "JPEG" and img.mode == "RGB"
            w, h = img.size
        sizes.add((h, w))
        assert round(size[0] * (1 - jitter)) <= h <= round(size[0] * (1 + jitter))
        assert round(size[1] * (1 - jitter)) <= w <= round(size[1] * (1 + jitter))
        masks = [p for p in out.glob(f"*/{jpg.stem}_*.png")]
        assert len(masks) == 1 + len(ISIC_ATTRIBUTES[year])
        for png in masks:
            with Image.open(png) as m:
                assert m.format == "PNG" and m.mode == "L" and m.size == (w, h)
                assert set(np.unique(np.asarray(m)).tolist()) <= {0, 255}
    assert len(sizes) > 1, "sizes should vary like real ISIC images"


@pytest.mark.parametrize("year", [2018, 2017])
def test_lesion_mask_matches_lesion_drawing_and_attribute_masks_cover_their_patterns(year):
    names = ISIC_ATTRIBUTES[year]
    cases = []
    for s in range(12):
        chosen = {names[s % len(names)]} if s % 3 else set(names)
        if s == 0:
            chosen = set()
        height, width = [(40, 56), (96, 128), (120, 90)][s % 3]
        cases.append((s, height, width, chosen))
    for s, height, width, chosen in cases:
        case = render_case(np.random.default_rng(s), height, width, chosen, year)
        assert case.image.shape == (height, width, 3) and case.image.dtype == np.uint8
        lesion = case.lesion
        assert lesion.dtype == bool and lesion.shape == (height, width)
        # every pixel the lesion drawing changed is in the mask, and the mask is mostly drawn
        assert not (case.lesion_drawn & ~lesion).any()
        iou = (case.lesion_drawn & lesion).sum() / (case.lesion_drawn | lesion).sum()
        assert iou > 0.9
        assert set(case.attributes) == set(names)
        for name in names:
            mask, drawn = case.attributes[name], case.drawn[name]
            assert mask.shape == (height, width) and mask.dtype == bool
            assert not (mask & ~lesion).any(), f"{name} mask leaves the lesion"
            assert not (drawn & ~mask).any(), f"{name} drawn outside its mask"
            if name in chosen:
                assert drawn.sum() >= 3, f"{name} barely drawn"
                # the mask is the pattern region, not the whole lesion or a frame
                assert mask.sum() < lesion.sum()
            else:
                assert not mask.any() and not drawn.any()


def test_milia_are_the_bright_spots_of_the_lesion():
    # independent of the drawn maps: near-white pixels inside the lesion are cysts
    for s in range(6):
        case = render_case(np.random.default_rng(100 + s), 96, 128, {"milia_like_cyst"}, 2018)
        lum = _luminance(case.image)
        bright = case.lesion & (lum > 215)
        assert bright.any()
        assert not (bright & ~case.attributes["milia_like_cyst"]).any()


def test_render_case_rejects_attributes_of_another_year():
    with pytest.raises(ValueError, match="globules"):
        render_case(np.random.default_rng(0), 64, 64, {"globules"}, 2017)


@pytest.mark.parametrize("year", [2018, 2017])
@pytest.mark.parametrize("n", [1, 7, 60, 333])
def test_assigned_prevalence_is_within_half_an_image_of_the_table(year, n):
    carried = assign_attributes(n, year, seed=5)
    assert len(carried) == n
    for name, p in PREVALENCE[year].items():
        measured = sum(name in c for c in carried) / n
        assert abs(measured - p) <= 1 / (2 * n) + 1e-9, (name, measured, p)


@pytest.mark.parametrize("year", [2018, 2017])
def test_prevalence_measured_on_written_masks_matches_table(tmp_path, year):
    n = 60
    out = generate_isic(tmp_path, year=year, num_images=n, size=(32, 40), seed=11)
    task2 = next(p for p in out.iterdir() if "Task2" in p.name or "Part2" in p.name)
    for name, p in PREVALENCE[year].items():
        pattern = f"*_attribute_{name}.png" if year == 2018 else f"*_{name}.png"
        files = sorted(task2.glob(pattern))
        assert len(files) == n
        present = sum(bool(np.asarray(Image.open(f)).any()) for f in files)
        assert abs(present / n - p) <= 1 / (2 * n) + 1e-9, (name, present, p)


def test_lesion_is_darker_than_skin(tmp_path):
    out = generate_isic(tmp_path, year=2018, num_images=8, seed=2)
    for jpg in sorted((out / "ISIC2018_Task1-2_Training_Input").glob("*.jpg")):
        lum = _luminance(np.asarray(Image.open(jpg)))
        mask = out / "ISIC2018_Task1_Training_GroundTruth" / f"{jpg.stem}_segmentation.png"
        lesion = np.asarray(Image.open(mask)) > 0
        assert 0 < lesion.sum() < lesion.size
        assert lum[lesion].mean() < lum[~lesion].mean() - 30


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = generate_isic(tmp_path / "a", num_images=4, size=(40, 52), seed=9)
    b = generate_isic(tmp_path / "b", num_images=4, size=(40, 52), seed=9)
    c = generate_isic(tmp_path / "c", num_images=4, size=(40, 52), seed=10)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".jpg")


def test_existing_files_are_not_overwritten_without_flag(tmp_path):
    generate_isic(tmp_path, year=2018, num_images=2, size=(32, 40))
    image = tmp_path / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000.jpg"
    before = image.read_bytes()
    with pytest.raises(FileExistsError, match="ISIC2018_Task1-2_Training_Input"):
        generate_isic(tmp_path, year=2018, num_images=2, size=(32, 40), seed=1)
    assert image.read_bytes() == before
    # the other year's layout lives in other folders: no conflict
    generate_isic(tmp_path, year=2017, num_images=2, size=(32, 40))
    generate_isic(tmp_path, year=2018, num_images=2, size=(32, 40), seed=1, overwrite=True)
    assert image.read_bytes() != before


def test_overwrite_leaves_no_image_of_a_larger_earlier_set(tmp_path):
    generate_isic(tmp_path, year=2018, num_images=5, size=(32, 40))
    generate_isic(tmp_path, year=2017, num_images=3, size=(32, 40))
    generate_isic(tmp_path, year=2018, num_images=2, size=(32, 40), overwrite=True)
    assert len(list((tmp_path / "ISIC2018_Task1-2_Training_Input").glob("*.jpg"))) == 2
    assert len(list((tmp_path / "ISIC2018_Task2_Training_GroundTruth_v3").glob("*.png"))) == 2 * 5
    assert len(list((tmp_path / "ISIC-2017_Training_Data").glob("*.jpg"))) == 3
