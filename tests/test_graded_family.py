"""The graded family of the designed benchmark (medxfer.data.synth.graded): valid MSD tasks, one
lever (the spleen's CT number) that really is graded on the written images, and nothing else changed."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medxfer.data.msd import check_case, load_task
from medxfer.data.synth.graded import FAMILY_FILE, generate_graded_family, grade_hu
from medxfer.data.synth.msd import MSD_PROFILES, T, render_case

SHAPE, SPACING = (24, 24, 12), (9.6, 9.6, 18.0)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    out = tmp_path_factory.mktemp("graded")
    return out, generate_graded_family(out, n_grades=3, n_targets=2, num_training=4, shape=SHAPE, spacing=SPACING)


def test_every_task_is_a_valid_msd_task_and_the_design_file_records_the_distances(family):
    out, design = family
    assert json.loads((out / FAMILY_FILE).read_text()) == design
    assert list(design["tasks"]) == ["Task60_Grade0A", "Task61_Grade0B", "Task62_Grade1", "Task63_Grade2"]
    for folder, info in design["tasks"].items():
        task = load_task(out / folder)
        assert task.labels == {0: "background", 1: "spleen"} and task.num_channels == 1
        assert len(task.training) == 4
        for record in task.training:
            assert check_case(task, record) == [], (folder, record)
            img = nib.load(record["image"])
            assert img.shape == SHAPE and np.allclose(img.header.get_zooms(), SPACING)
            assert np.asanyarray(img.dataobj).dtype == np.int16
        assert info["spleen_hu"] == pytest.approx(grade_hu(info["grade"], 3))
    assert design["targets"] == ["Task60_Grade0A", "Task61_Grade0B"]
    assert design["distance"]["Task60_Grade0A"] == {"Task61_Grade0B": 0, "Task62_Grade1": 1, "Task63_Grade2": 2}
    assert design["distance"]["Task61_Grade0B"] == {"Task60_Grade0A": 0, "Task62_Grade1": 1, "Task63_Grade2": 2}


def test_the_spleen_core_ct_number_measured_on_the_images_falls_with_the_grade(family):
    out, design = family
    core_mean = {}
    for folder in design["tasks"]:
        values = []
        for record in load_task(out / folder).training:
            image = np.asanyarray(nib.load(record["image"]).dataobj).astype(float)
            spleen = np.asanyarray(nib.load(record["label"]).dataobj) == 1
            core = ndimage.binary_erosion(spleen)
            values.append(image[core if core.any() else spleen])
        core_mean[folder] = float(np.concatenate(values).mean())
    by_grade = [core_mean[f] for f in ("Task60_Grade0A", "Task62_Grade1", "Task63_Grade2")]
    assert by_grade[0] > by_grade[1] + 25 and by_grade[1] > by_grade[2] + 25, core_mean  # design steps: 47.5 HU
    assert abs(core_mean["Task60_Grade0A"] - core_mean["Task61_Grade0B"]) < 15, core_mean  # same grade
    assert abs(by_grade[0] - 110) < 20 and abs(by_grade[2] - 15) < 20, core_mean  # near the nominal values


def test_the_override_changes_only_the_spleen_intensity_by_the_blurred_step():
    prof = MSD_PROFILES["spleen"]
    draw = lambda **kw: render_case(prof, np.random.default_rng(7), SHAPE, SPACING, spacing_jitter=0.0, **kw)  # noqa: E731
    plain, same, shifted = draw(), draw(tissue_overrides=None), draw(tissue_overrides={"ct": {"spleen": (50.0, 10)}})
    np.testing.assert_array_equal(plain.image, same.image)  # no override: the msd renderer unchanged
    np.testing.assert_array_equal(plain.label, shifted.label)  # same anatomy, same random draws
    spleen = plain.tissue == T["spleen"]
    # the renderer blurs (sigma 0.6 voxel) before adding noise, both linear: the difference is the
    # blurred step -60 HU on the spleen voxels (float32 rounding aside)
    expected = ndimage.gaussian_filter(np.where(spleen, -60.0, 0.0).astype(np.float32), sigma=0.6)
    np.testing.assert_allclose(shifted.image - plain.image, expected, atol=1e-3)
