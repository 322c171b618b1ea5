"""2D datasets: class-per-folder image sets and folder-pair segmentation sets.

Loader round trips on generated data, determinism and overwrite refusal of the generators,
every reported problem naming its file, masks matching the drawn objects, and the shape
classes being separable by a handcrafted feature."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medxfer.data.image_folder import check_image_folder_files, load_image_folder, scan_image_folder
from medxfer.data.problems import DatasetError
from medxfer.data.seg2d import check_seg2d_files, load_seg2d, mask_to_index, read_mask, scan_seg2d
from medxfer.data.synth.shapes2d import (
    CLASS_KINDS,
    SEG_KINDS,
    generate_classification_folder,
    generate_seg2d,
    render_seg2d_case,
)


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _luminance(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    return array if array.ndim == 2 else array[..., :3] @ np.array([0.299, 0.587, 0.114])


def _raises(load, root, path, reason: str) -> DatasetError:
    """``load(root)`` raises a DatasetError naming ``path`` first, with ``reason`` in the message."""
    with pytest.raises(DatasetError) as info:
        load(root)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert reason in message, message
    return info.value


@pytest.fixture(scope="module")
def classes_root(tmp_path_factory):
    """4 classes x 4 RGB images of 32 px (seed 0). Do not modify: copy first."""
    return generate_classification_folder(tmp_path_factory.mktemp("classes") / "shapes", num_classes=4,
                                          images_per_class=4, size=32, seed=0)


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory):
    """Binary grey seg2d set, 6 images around 40x48 (seed 0). Do not modify: copy first."""
    return generate_seg2d(tmp_path_factory.mktemp("seg") / "polyps", num_images=6, size=(40, 48), seed=0)


@pytest.fixture
def classes_copy(classes_root, tmp_path):
    return shutil.copytree(classes_root, tmp_path / "shapes")


@pytest.fixture
def seg_copy(seg_root, tmp_path):
    return shutil.copytree(seg_root, tmp_path / "polyps")


# --------------------------------------------------------------------------- round trips
def test_classification_round_trip(classes_root):
    records, classes = load_image_folder(classes_root, check_files=True)
    assert classes == ["disc", "ring", "square", "triangle"]  # sorted folder names, not generation order
    assert len(records) == 16
    assert [r["id"] for r in records] == [r["id"] for r in sorted(records, key=lambda r: (r["label"], r["id"]))]
    for r in records:
        path = classes_root / r["class"] / f"{r['id'].split('/')[1]}.png"
        assert r["image"] == str(path.absolute()) and path.is_file()
        assert classes[r["label"]] == r["class"]
        with Image.open(r["image"]) as img:
            assert (img.mode, img.size) == ("RGB", (32, 32))
    assert [sum(r["label"] == k for r in records) for k in range(4)] == [4, 4, 4, 4]
    assert "not patient data" in (classes_root / "README.txt").read_text()


def test_classification_grey_and_more_classes(tmp_path):
    root = generate_classification_folder(tmp_path / "g", num_classes=len(CLASS_KINDS), images_per_class=1,
                                          size=20, grey=True)
    records, classes = load_image_folder(root)
    assert classes == sorted(CLASS_KINDS) and len(records) == len(CLASS_KINDS) >= 6
    with Image.open(records[0]["image"]) as img:
        assert (img.mode, img.size) == ("L", (20, 20))


def test_seg2d_binary_round_trip(seg_root):
    records, labels = load_seg2d(seg_root, check_files=True)
    assert labels == {0: "background", 1: "blob"}
    assert [r["id"] for r in records] == [f"case_{i:04d}" for i in range(6)]
    sizes = set()
    for r in records:
        assert set(r) == {"id", "image", "label", "grey"} and r["grey"] is True
        assert r["image"] == str((seg_root / "images" / f"{r['id']}.png").absolute())
        assert r["label"] == str((seg_root / "masks" / f"{r['id']}.png").absolute())
        with Image.open(r["image"]) as image, Image.open(r["label"]) as mask:
            assert image.mode == "L" and mask.mode == "L" and image.size == mask.size
            sizes.add(image.size)
            values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 255}
        assert set(np.unique(read_mask(r["label"], labels)).tolist()) <= {0, 1}
    assert len(sizes) > 1  # size jitter: the code downstream must handle varying sizes
    assert json.loads((seg_root / "labels.json").read_text()) == {"0": "background", "1": "blob"}
    assert "not patient data" in (seg_root / "README.txt").read_text()


def test_seg2d_multiclass_rgb_round_trip(tmp_path):
    root = generate_seg2d(tmp_path / "m", num_images=5, size=(32, 32), num_classes=3, grey=False, size_jitter=0)
    records, labels = load_seg2d(root)
    assert labels == {0: "background", 1: SEG_KINDS[0], 2: SEG_KINDS[1], 3: SEG_KINDS[2]}
    seen = set()
    for r in records:
        assert r["grey"] is False
        with Image.open(r["image"]) as image, Image.open(r["label"]) as mask:
            assert image.mode == "RGB" and image.size == mask.size == (32, 32)
            seen |= set(np.unique(np.asarray(mask)).tolist())
    assert seen <= {0, 1, 2, 3} and len(seen) > 2


def test_seg2d_classes_without_labels_json(seg_copy, tmp_path):
    (seg_copy / "labels.json").unlink()
    assert load_seg2d(seg_copy)[1] == {0: "background", 1: "foreground"}  # 0/255 masks: binary
    multi = generate_seg2d(tmp_path / "m", num_images=8, size=(24, 24), num_classes=3, size_jitter=0)
    (multi / "labels.json").unlink()
    found = max(int(np.asarray(Image.open(p)).max()) for p in (multi / "masks").iterdir())
    labels = load_seg2d(multi)[1]
    assert labels == {0: "background", **{c: f"class_{c}" for c in range(1, found + 1)}} and found > 1


def test_mask_to_index():
    mask = np.array([[0, 255], [1, 0]], np.uint8)
    assert mask_to_index(mask, {0: "bg", 1: "fg"}).tolist() == [[0, 1], [1, 0]]
    assert mask_to_index(np.array([[0, 2]], np.uint8), {0: "bg", 1: "a", 2: "b"}).tolist() == [[0, 2]]


# --------------------------------------------------------------------------- generators
def test_generators_are_deterministic(tmp_path):
    def classes(name, seed):
        return _tree_bytes(generate_classification_folder(tmp_path / name, num_classes=2, images_per_class=2,
                                                          size=24, seed=seed))

    def seg(name, seed, n=3):
        return _tree_bytes(generate_seg2d(tmp_path / name, num_images=n, size=(24, 28), num_classes=2, seed=seed))

    a, b, c = classes("a", 0), classes("b", 0), classes("c", 1)
    assert a == b
    assert [k for k in a if k.endswith(".png") and a[k] != c[k]]  # another seed, other images
    s1, s2, s3, s4 = seg("s1", 3), seg("s2", 3), seg("s3", 4), seg("s4", 3, n=4)
    assert s1 == s2
    assert [k for k in s1 if k.endswith(".png") and s1[k] != s3[k]]
    assert all(s4[k] == v for k, v in s1.items() if k.endswith(".png"))  # more images: the others unchanged


def test_generators_refuse_to_overwrite(tmp_path):
    root = generate_classification_folder(tmp_path / "c", num_classes=3, images_per_class=2, size=16)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_classification_folder(root, num_classes=2, images_per_class=1, size=16)
    generate_classification_folder(root, num_classes=2, images_per_class=1, size=16, overwrite=True)
    assert load_image_folder(root)[1] == ["disc", "square"]  # the third class folder is gone

    seg = generate_seg2d(tmp_path / "s", num_images=4, size=(16, 16))
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_seg2d(seg, num_images=2, size=(16, 16))
    generate_seg2d(seg, num_images=2, size=(16, 16), overwrite=True)
    assert len(load_seg2d(seg)[0]) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_seg2d(tmp_path / "other", num_images=1)
    assert (tmp_path / "other" / "data.txt").read_text() == "mine"


def test_seg2d_masks_cover_exactly_what_was_drawn():
    for num_classes, grey in ((1, True), (3, False)):
        empty = drawn = 0
        for i in range(12):
            case = render_seg2d_case(np.random.default_rng(i), 30, 34, num_classes=num_classes, grey=grey)
            changed = np.abs(case.clean - case.background).max(axis=-1)
            fg = case.label > 0
            assert np.array_equal(changed > 0, fg)
            assert (changed[fg] > 20).all()  # every object pixel stands out from the background
            assert case.label.max() <= num_classes
            empty, drawn = empty + (not fg.any()), drawn + fg.any()
        assert drawn and (empty or num_classes > 1)


def test_seg2d_files_masks_align_with_image(tmp_path):
    root = generate_seg2d(tmp_path / "s", num_images=12, size=(40, 40), seed=1)
    with_objects = without = 0
    for mask_path in sorted((root / "masks").iterdir()):
        mask = np.asarray(Image.open(mask_path)) > 0
        image = _luminance(np.asarray(Image.open(root / "images" / mask_path.name)))
        deviation = np.abs(image - np.median(image[~mask]))
        assert (deviation[~mask] > 30).mean() < 0.01  # background: no object outside the mask
        if mask.any():
            with_objects += 1
            assert (deviation[mask] > 30).mean() > 0.95
        else:
            without += 1
    assert with_objects and without  # objects are absent from some images


def _shape_features(image: np.ndarray) -> tuple[float, float]:
    """(area / area of the circle through the farthest pixel, 1 if the centroid is on the object)."""
    lum = _luminance(image)
    border = np.concatenate([lum[0], lum[-1], lum[:, 0], lum[:, -1]])
    components, n = ndimage.label(np.abs(lum - np.median(border)) > 40)
    sizes = ndimage.sum(np.ones_like(lum), components, range(1, n + 1))
    fg = components == 1 + int(np.argmax(sizes))
    ys, xs = np.nonzero(fg)
    cy, cx = ys.mean(), xs.mean()
    radius = np.hypot(ys - cy, xs - cx).max() + 0.5
    return fg.sum() / (np.pi * radius**2), float(fg[int(round(cy)), int(round(cx))])


def test_classification_classes_are_separable_by_a_handcrafted_feature(tmp_path):
    root = generate_classification_folder(tmp_path / "c", num_classes=4, images_per_class=10, size=48, seed=2)
    records, classes = load_image_folder(root)
    feats = np.array([_shape_features(np.asarray(Image.open(r["image"]))) for r in records])
    labels = np.array([r["label"] for r in records])
    train = np.array([int(r["id"][-4:]) < 5 for r in records])
    centroids = np.stack([feats[train & (labels == k)].mean(axis=0) for k in range(len(classes))])
    predicted = np.argmin(((feats[~train, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == labels[~train]).mean() >= 0.9


# --------------------------------------------------------------------------- image folder problems
def test_image_folder_ignores_hidden_and_root_files(classes_copy):
    (classes_copy / "disc" / ".DS_Store").write_bytes(b"\0\0")
    (classes_copy / "disc" / "._disc_0000.png").write_bytes(b"\0\5\26\7")
    (classes_copy / ".ipynb_checkpoints").mkdir()
    (classes_copy / "LOC_synset_mapping.txt").write_text("disc\n")
    shutil.copy(classes_copy / "ring" / "ring_0000.png", classes_copy / "ring" / "n01440764_1.JPEG")
    records, classes = load_image_folder(classes_copy)
    assert classes == ["disc", "ring", "square", "triangle"] and len(records) == 17


def test_image_folder_stray_file(classes_copy):
    stray = classes_copy / "disc" / "notes.txt"
    stray.write_text("x")
    _raises(load_image_folder, classes_copy, stray, "not an image file")


def test_image_folder_empty_class_folder(classes_copy):
    (classes_copy / "zebra").mkdir()
    records, classes, problems = scan_image_folder(classes_copy)
    assert classes[-1] == "zebra" and len(records) == 16
    _raises(load_image_folder, classes_copy, classes_copy / "zebra", "holds no image")


def test_image_folder_structure_problems(classes_copy, tmp_path):
    _raises(load_image_folder, tmp_path / "nowhere", tmp_path / "nowhere", "does not exist")
    (tmp_path / "flat").mkdir()
    _raises(load_image_folder, tmp_path / "flat", tmp_path / "flat", "no class folder")
    for name in ("ring", "square", "triangle"):
        shutil.rmtree(classes_copy / name)
    _raises(load_image_folder, classes_copy, classes_copy, "at least 2")
    shutil.copy(classes_copy / "disc" / "disc_0000.png", classes_copy / "loose.png")
    shutil.copy(classes_copy / "disc" / "disc_0000.png", classes_copy / "disc" / "disc_0000.jpg")
    problems = scan_image_folder(classes_copy)[2]
    assert [p.path for p in problems] == [str(classes_copy / "loose.png"), str(classes_copy / "disc" / "disc_0000.png"),
                                          str(classes_copy)]
    assert "root of an image folder" in problems[0].reason
    assert "two images with id 'disc/disc_0000' (disc_0000.jpg and disc_0000.png)" in problems[1].reason


def test_image_folder_refuses_a_seg2d_dataset(seg_root):
    _raises(load_image_folder, seg_root, seg_root.absolute(), "2D segmentation dataset")


def test_image_folder_unreadable_image(classes_copy):
    broken = classes_copy / "square" / "square_0001.png"
    broken.write_text("not a png")
    records, _ = load_image_folder(classes_copy)
    problems = check_image_folder_files(records)
    assert [p.path for p in problems] == [str(broken)] and "cannot read image" in problems[0].reason
    with pytest.raises(DatasetError, match="square_0001.png: cannot read image"):
        load_image_folder(classes_copy, check_files=True)


# --------------------------------------------------------------------------- seg2d problems
def test_seg2d_missing_mask(seg_copy):
    mask = seg_copy / "masks" / "case_0001.png"
    mask.unlink()
    records, _, problems = scan_seg2d(seg_copy)
    assert len(records) == 5 and len(problems) == 1
    _raises(load_seg2d, seg_copy, mask, "missing mask of image case_0001.png")


def test_seg2d_mask_without_image(seg_copy):
    (seg_copy / "images" / "case_0002.png").unlink()
    _raises(load_seg2d, seg_copy, seg_copy / "masks" / "case_0002.png", "mask without image")


def test_seg2d_mask_of_wrong_size(seg_copy):
    mask = seg_copy / "masks" / "case_0000.png"
    with Image.open(mask) as img:
        w, h = img.size
        img.resize((w + 3, h)).save(mask)
    _raises(load_seg2d, seg_copy, mask, f"mask is {w + 3}x{h} but image case_0000.png is {w}x{h}")


def test_seg2d_three_channel_mask(seg_copy):
    mask = seg_copy / "masks" / "case_0003.png"
    with Image.open(mask) as img:
        img.convert("RGB").save(mask)
    _raises(load_seg2d, seg_copy, mask, "not single-channel (PIL mode RGB, 3 channel(s))")


def test_seg2d_palette_and_16bit_masks(seg_copy):
    mask = seg_copy / "masks" / "case_0003.png"
    with Image.open(mask) as img:
        img.convert("P").save(mask)
    _raises(load_seg2d, seg_copy, mask, "not 8-bit grey (PIL mode P")
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(mask)
    assert "mask is not 8-bit grey" in str(pytest.raises(DatasetError, load_seg2d, seg_copy).value)


def test_seg2d_value_not_in_labels_json(seg_copy):
    mask = seg_copy / "masks" / "case_0004.png"
    array = np.array(Image.open(mask))
    array[:2, :3] = 2
    Image.fromarray(array).save(mask)
    _raises(load_seg2d, seg_copy, mask, "mask has values not in labels.json (2) in 6 pixels")
    # 255 is only the binary foreground: with three classes declared it is out of range
    (seg_copy / "labels.json").write_text(json.dumps({"0": "background", "1": "a", "2": "b"}))
    _raises(load_seg2d, seg_copy, seg_copy / "masks" / "case_0000.png", "not in labels.json (255)")


def test_seg2d_binary_255_mixed_with_other_values_without_labels_json(seg_copy):
    (seg_copy / "labels.json").unlink()
    mask = seg_copy / "masks" / "case_0002.png"
    array = np.array(Image.open(mask))
    array[0, 0] = 128  # what resizing a 0/255 mask with interpolation leaves behind
    Image.fromarray(array).save(mask)
    _raises(load_seg2d, seg_copy, mask, "reads as binary 0/255")


def test_seg2d_bad_labels_json(seg_copy):
    labels = seg_copy / "labels.json"
    labels.write_text("{oops")
    _raises(load_seg2d, seg_copy, labels, "invalid JSON")
    labels.write_text(json.dumps({"0": "background", "2": "polyp"}))
    _raises(load_seg2d, seg_copy, labels, "label values must be 0..K")
    labels.write_text(json.dumps({"background": 0, "polyp": 1}))
    _raises(load_seg2d, seg_copy, labels, "nnU-Net style")


def test_seg2d_structure_problems(seg_copy):
    stray = seg_copy / "images" / "notes.txt"
    stray.write_text("x")
    (seg_copy / "images" / ".DS_Store").write_bytes(b"\0")
    (seg_copy / "kavsir_bboxes.json").write_text("{}")  # root files are not data: ignored
    _raises(load_seg2d, seg_copy, stray, "not an image file")
    stray.unlink()
    jpeg = seg_copy / "masks" / "case_0005.jpg"
    (seg_copy / "masks" / "case_0005.png").rename(jpeg)
    problems = scan_seg2d(seg_copy)[2]
    assert [str(p) for p in problems] == [f"{jpeg}: " + problems[0].reason] and "not a PNG" in problems[0].reason
    shutil.rmtree(seg_copy / "masks")
    _raises(load_seg2d, seg_copy, seg_copy / "masks", "missing folder")


def test_seg2d_image_mode_and_truncated_image(seg_copy):
    image = seg_copy / "images" / "case_0001.png"
    with Image.open(image) as img:
        img.convert("RGBA").save(image)
    _raises(load_seg2d, seg_copy, image, "image mode RGBA is not supported")
    with Image.open(image) as img:
        img.convert("RGB").save(image)
    load_seg2d(seg_copy)  # RGB and grey images may be mixed
    image.write_bytes(image.read_bytes()[:-60])  # header intact, pixels cut off
    records, _ = load_seg2d(seg_copy)
    assert [p.path for p in check_seg2d_files(records)] == [str(image)]
    with pytest.raises(DatasetError, match="case_0001.png: cannot read image"):
        load_seg2d(seg_copy, check_files=True)


def test_check_data_finds_and_checks_2d_segmentation_folders(tmp_path):
    from medxfer.data.validate import check_dataset

    root = generate_seg2d(tmp_path / "target", num_images=4, size=(32, 32), seed=3)
    (report,) = check_dataset(tmp_path)
    assert report.kind == "seg2d" and report.ok and report.num_cases == 4
    gone = sorted((root / "masks").iterdir())[1]
    gone.unlink()
    (report,) = check_dataset(tmp_path)
    assert not report.ok and str(gone) in str(report.problems[0])
