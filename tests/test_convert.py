"""medxfer.data.convert: each converter on a small generated copy of its dataset's published layout
(folder names, file naming, mask encodings, CSV columns as downloaded), read back with the project's
own readers (MSD task, 2D segmentation folder, ImageFolder) and compared voxel / pixel / label wise
with the generated sources."""

import csv
import os

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medxfer.cli import main
from medxfer.data.convert import (PUBLISHED_SPLIT_FILE, convert_acdc, convert_covid_qu_ex, convert_ham10000,
                                  convert_idrid, convert_isic2019)
from medxfer.data.image_folder import load_image_folder
from medxfer.data.msd import check_case, load_task
from medxfer.data.problems import DatasetError
from medxfer.data.seg2d import load_seg2d, read_mask
from medxfer.data.splits import load_splits

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------- ACDC

def _nifti(path, array, spacing=(1.4, 1.4, 10.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    nib.save(nib.Nifti1Image(array, affine), str(path))


def make_acdc(root, train=("patient001", "patient002"), test=("patient101",), test_labels=True, shape=(12, 10, 3)):
    """database/{training,testing}/patientNNN/ as the ACDC download: Info.cfg, the 4D cine, the ED
    and ES frames and their _gt labels. Returns {case: (image, label)}."""
    cases = {}
    for part, patients in (("training", train), ("testing", test)):
        for p_i, patient in enumerate(patients):
            folder = root / "database" / part / patient
            folder.mkdir(parents=True)
            ed, es = 1, 9 + p_i
            (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 20\nWeight: 80.0\n")
            (folder / "MANDATORY_CITATION.md").write_text("cite Bernard et al. 2018\n")
            _nifti(folder / f"{patient}_4d.nii.gz", RNG.random((*shape, 4)).astype(np.float32))
            for frame in (ed, es):
                case = f"{patient}_frame{frame:02d}"
                image = RNG.random(shape).astype(np.float32) * 500
                label = RNG.integers(0, 4, shape).astype(np.uint8)
                _nifti(folder / f"{case}.nii.gz", image)
                if part == "training" or test_labels:
                    _nifti(folder / f"{case}_gt.nii.gz", label)
                cases[case] = (image, label)
    (root / "database" / "MANDATORY_CITATION.md").write_text("cite\n")
    (root / "database" / "training" / "._patient001").write_text("macOS junk")
    return cases


def test_acdc_to_msd_task(tmp_path):
    cases = make_acdc(tmp_path / "src")
    dst = tmp_path / "Task27_ACDC"
    summary = convert_acdc(tmp_path / "src", dst)
    assert summary == {"dst": str(dst), "training": 4, "test": 2, "labels": 4}
    task = load_task(dst)
    assert task.layout == "msd" and not task.four_d
    assert task.labels == {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
    assert task.channel_names == {0: "MRI"}
    assert [r["id"] for r in task.training] == ["patient001_frame01", "patient001_frame09",
                                                "patient002_frame01", "patient002_frame10"]
    assert [r["id"] for r in task.test] == ["patient101_frame01", "patient101_frame09"]
    for record in task.training:
        assert check_case(task, record) == []
        image, label = nib.load(record["image"]), nib.load(record["label"])
        np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), cases[record["id"]][0])
        np.testing.assert_array_equal(np.asarray(label.dataobj), cases[record["id"]][1])
        np.testing.assert_allclose(image.affine[:3, :3], np.diag([1.4, 1.4, 10.0]))
    assert (dst / "labelsTs" / "patient101_frame09.nii.gz").is_file()
    assert not list(dst.rglob("*_4d*"))  # the cine sequence is not a case


def test_acdc_database_folder_itself_testing_without_labels_and_no_testing(tmp_path):
    make_acdc(tmp_path / "src", test_labels=False)
    summary = convert_acdc(tmp_path / "src" / "database", tmp_path / "a")
    assert summary["test"] == 2 and not (tmp_path / "a" / "labelsTs").exists()
    assert convert_acdc(tmp_path / "src", tmp_path / "b", include_testing=False)["test"] == 0
    assert load_task(tmp_path / "b").test == []


def test_acdc_bad_input_names_the_file(tmp_path):
    make_acdc(tmp_path / "src")
    gt = tmp_path / "src" / "database" / "training" / "patient002" / "patient002_frame10_gt.nii.gz"
    bad = np.asarray(nib.load(gt).dataobj).copy()
    bad[0, 0, 0] = 7
    _nifti(gt, bad)
    with pytest.raises(DatasetError, match="patient002_frame10_gt.nii.gz") as err:
        convert_acdc(tmp_path / "src", tmp_path / "out")
    assert "\n" not in str(err.value) and "7" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written
    gt.unlink()
    with pytest.raises(DatasetError, match="patient002_frame10_gt.nii.gz.*missing ground truth"):
        convert_acdc(tmp_path / "src", tmp_path / "out")
    with pytest.raises(DatasetError, match="training.*missing folder"):
        convert_acdc(tmp_path / "nothing", tmp_path / "out")


# ---------------------------------------------------------------------------------------- COVID-QU-Ex

def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_covid(root, subset="lung", size=(20, 16)):
    """'<Top>/<Top>/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/images|lung masks|infection masks' as the
    Kaggle download; two images per class, one name shared by every class. Returns
    {(split, class, name): (image, lung 0/255, infection 0/255)}."""
    top = {"lung": "Lung Segmentation Data", "infection": "Infection Segmentation Data"}[subset]
    made = {}
    for split in ("Train", "Val", "Test"):
        for cls in ("COVID-19", "Non-COVID", "Normal"):
            folder = root / top / top / split / cls
            for name in ("covid_1.png", f"{cls} (2).png"):
                image = RNG.integers(0, 256, size[::-1]).astype(np.uint8)
                lung = np.where(RNG.random(size[::-1]) > 0.5, 255, 0).astype(np.uint8)
                infection = np.where(RNG.random(size[::-1]) > 0.8, 255, 0).astype(np.uint8)
                _png(folder / "images" / name, image)
                _png(folder / "lung masks" / name, lung)
                if subset == "infection":
                    _png(folder / "infection masks" / name, infection)
                made[(split, cls, name)] = (image, lung, infection)
    return made


def test_covid_qu_ex_lung_to_seg2d(tmp_path):
    made = make_covid(tmp_path / "src")
    summary = convert_covid_qu_ex(tmp_path / "src", tmp_path / "out")
    assert summary["images"] == 18 and summary["per_split"] == {"train": 6, "val": 6, "test": 6}
    assert summary["per_class"] == {"COVID-19": 6, "Non-COVID": 6, "Normal": 6}
    records, labels = load_seg2d(tmp_path / "out", check_files=True)
    assert labels == {0: "background", 1: "lung"} and len(records) == 18
    by_id = {r["id"]: r for r in records}
    image, lung, _ = made[("Val", "Non-COVID", "Non-COVID (2).png")]
    record = by_id["Val_Non-COVID_Non-COVID_2"]  # spaces and brackets become _
    assert record["grey"]
    np.testing.assert_array_equal(np.asarray(Image.open(record["image"])), image)
    np.testing.assert_array_equal(read_mask(record["label"], labels), (lung > 127).astype(np.uint8))
    assert {"Train_COVID-19_covid_1", "Train_Normal_covid_1"} <= set(by_id)  # one name in two classes: two ids
    split = load_splits(tmp_path / "out" / PUBLISHED_SPLIT_FILE)
    assert len(split) == 1 and all(len(split[0][k]) == 6 for k in ("train", "val", "test"))
    assert all(i.startswith("Test_") for i in split[0]["test"])


def test_covid_qu_ex_infection_three_classes_from_the_top_folder(tmp_path):
    made = make_covid(tmp_path / "src", subset="infection")
    top = tmp_path / "src" / "Infection Segmentation Data"
    convert_covid_qu_ex(top, tmp_path / "out", subset="infection")
    records, labels = load_seg2d(tmp_path / "out")
    assert labels == {0: "background", 1: "lung", 2: "infection"}
    _, lung, infection = made[("Train", "COVID-19", "covid_1.png")]
    expected = np.where(infection > 0, 2, np.where(lung > 0, 1, 0))
    record = next(r for r in records if r["id"] == "Train_COVID-19_covid_1")
    np.testing.assert_array_equal(read_mask(record["label"], labels), expected)


def test_covid_qu_ex_bad_input(tmp_path):
    make_covid(tmp_path / "src")
    base = tmp_path / "src" / "Lung Segmentation Data" / "Lung Segmentation Data"
    (base / "Test" / "Normal" / "lung masks" / "covid_1.png").unlink()
    with pytest.raises(DatasetError, match=r"Test/Normal/lung masks/covid_1.png: missing mask of image"):
        convert_covid_qu_ex(tmp_path / "src", tmp_path / "out")
    _png(base / "Test" / "Normal" / "lung masks" / "covid_1.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"covid_1.png: mask is 8x8 but image covid_1.png is 20x16"):
        convert_covid_qu_ex(tmp_path / "src", tmp_path / "out")
    with pytest.raises(DatasetError, match="no Train/, Val/ or Test/"):
        convert_covid_qu_ex(tmp_path / "src", tmp_path / "out", subset="infection")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- IDRiD

def _red_tif(path, mask):
    """A published IDRiD mask: the lesion drawn in red in an RGB TIFF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[mask, 0] = 255
    Image.fromarray(rgb).save(path)


FOLDERS = {"MA": "1. Microaneurysms", "HE": "2. Haemorrhages", "EX": "3. Hard Exudates", "SE": "4. Soft Exudates",
           "OD": "5. Optic Disc"}


def make_idrid(root, size=(24, 16)):
    """'A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NN.jpg' and
    '2. All Segmentation Groundtruths/<set>/<k. Lesion>/IDRiD_NN_<code>.tif'; IDRiD_02 has no soft
    exudate file (absent lesion). Returns {stem: {code: bool mask}}."""
    seg = root / "A. Segmentation"
    made = {}
    for set_name, stems in (("a. Training Set", ("IDRiD_01", "IDRiD_02")), ("b. Testing Set", ("IDRiD_55",))):
        for stem in stems:
            path = seg / "1. Original Images" / set_name / f"{stem}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(RNG.integers(0, 256, (*size[::-1], 3)).astype(np.uint8)).save(path, quality=95)
            made[stem] = {}
            for code, folder in FOLDERS.items():
                (seg / "2. All Segmentation Groundtruths" / set_name / folder).mkdir(parents=True, exist_ok=True)
                if stem == "IDRiD_02" and code == "SE":
                    continue
                mask = RNG.random(size[::-1]) > 0.7
                _red_tif(seg / "2. All Segmentation Groundtruths" / set_name / folder / f"{stem}_{code}.tif", mask)
                made[stem][code] = mask
    return made


def expected_idrid(masks, lesions):
    label = np.zeros(next(iter(masks.values())).shape, np.uint8)
    for value in range(len(lesions), 0, -1):
        if lesions[value - 1] in masks:
            label[masks[lesions[value - 1]]] = value
    return label


def test_idrid_to_seg2d_first_listed_lesion_wins(tmp_path):
    made = make_idrid(tmp_path / "src")
    summary = convert_idrid(tmp_path / "src", tmp_path / "out")
    assert summary["images"] == 3 and summary["per_split"] == {"train": 2, "val": 0, "test": 1}
    records, labels = load_seg2d(tmp_path / "out", check_files=True)
    assert labels == {0: "background", 1: "microaneurysms", 2: "haemorrhages", 3: "hard_exudates", 4: "soft_exudates"}
    lesions = ["MA", "HE", "EX", "SE"]
    overlap = 0
    for record in records:
        masks = made[record["id"]]
        mask = read_mask(record["label"], labels)
        assert mask.shape == (16, 24)
        np.testing.assert_array_equal(mask, expected_idrid(masks, lesions))
        overlap += int(np.count_nonzero(sum(masks[c].astype(int) for c in lesions if c in masks) > 1))
        assert np.asarray(Image.open(record["image"])).shape == (16, 24, 3)
    assert summary["overlap_pixels"] == overlap > 0
    assert np.isin(4, read_mask(f"{tmp_path}/out/masks/IDRiD_01.png", labels))
    assert not np.isin(4, read_mask(f"{tmp_path}/out/masks/IDRiD_02.png", labels))  # no SE file: absent
    split = load_splits(tmp_path / "out" / PUBLISHED_SPLIT_FILE)[0]
    assert split == {"train": ["IDRiD_01", "IDRiD_02"], "val": [], "test": ["IDRiD_55"]}


def test_idrid_one_lesion_is_binary_and_order_chooses_priority(tmp_path):
    made = make_idrid(tmp_path / "src")
    convert_idrid(tmp_path / "src" / "A. Segmentation", tmp_path / "od", lesions=["od"])
    records, labels = load_seg2d(tmp_path / "od")
    assert labels == {0: "background", 1: "optic_disc"}
    np.testing.assert_array_equal(read_mask(records[0]["label"], labels), made["IDRiD_01"]["OD"].astype(np.uint8))
    convert_idrid(tmp_path / "src", tmp_path / "he_ma", lesions=["HE", "MA"])
    records, labels = load_seg2d(tmp_path / "he_ma")
    np.testing.assert_array_equal(read_mask(records[0]["label"], labels), expected_idrid(made["IDRiD_01"], ["HE", "MA"]))
    with pytest.raises(ValueError, match="lesions"):
        convert_idrid(tmp_path / "src", tmp_path / "x", lesions=["MA", "XX"])


def test_idrid_bad_input(tmp_path):
    make_idrid(tmp_path / "src")
    gt = tmp_path / "src" / "A. Segmentation" / "2. All Segmentation Groundtruths" / "a. Training Set" / FOLDERS["EX"]
    _red_tif(gt / "IDRiD_07_EX.tif", np.ones((16, 24), bool))
    with pytest.raises(DatasetError, match=r"IDRiD_07_EX.tif: mask without image"):
        convert_idrid(tmp_path / "src", tmp_path / "out")
    (gt / "IDRiD_07_EX.tif").unlink()
    _red_tif(gt / "IDRiD_02_EX.tif", np.ones((5, 5), bool))
    with pytest.raises(DatasetError, match=r"IDRiD_02_EX.tif: mask is 5x5 but image IDRiD_02.jpg is 24x16"):
        convert_idrid(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- HAM10000 / ISIC 2019

def _jpg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 10, 3)).astype(np.uint8)).save(path)


HAM = [("HAM_0000118", "ISIC_0027419", "bkl"), ("HAM_0000118", "ISIC_0025030", "bkl"),
       ("HAM_0002730", "ISIC_0026769", "nv"), ("HAM_0001466", "ISIC_0031633", "mel"), ("HAM_0002761", "ISIC_0029176", "vasc")]


def make_ham10000(root, delimiter=","):
    """HAM10000_metadata.csv + HAM10000_images_part_1/ and _part_2/ (and the Kaggle copy's second spelling)."""
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        for lesion, image, dx in HAM:
            writer.writerow([lesion, image, dx, "histo", "80.0", "male", "scalp"])
    for i, (_, image, _) in enumerate(HAM):
        part = "HAM10000_images_part_1" if i < 3 else "HAM10000_images_part_2"
        _jpg(root / part / f"{image}.jpg", i)
        _jpg(root / part.lower() / f"{image}.jpg", i)  # the Kaggle copy holds both spellings
    _jpg(root / "HAM10000_images_part_2" / "ISIC_0099999.jpg", 99)  # not in the metadata: left out


def test_ham10000_to_image_folder(tmp_path):
    (tmp_path / "src").mkdir()
    make_ham10000(tmp_path / "src")
    summary = convert_ham10000(tmp_path / "src", tmp_path / "out", link=True)
    assert summary == {"dst": str(tmp_path / "out"), "images": 5, "per_class": {"bkl": 2, "mel": 1, "nv": 1, "vasc": 1}}
    records, classes = load_image_folder(tmp_path / "out", check_files=True)
    assert classes == ["bkl", "mel", "nv", "vasc"]
    assert sorted(r["id"] for r in records) == sorted(f"{dx}/{image}" for _, image, dx in HAM)
    for r in records:
        assert classes[r["label"]] == r["class"]
    src = tmp_path / "src" / "HAM10000_images_part_1" / "ISIC_0027419.jpg"
    assert os.stat(tmp_path / "out" / "bkl" / "ISIC_0027419.jpg").st_ino == os.stat(src).st_ino  # hard link
    assert (tmp_path / "out" / "HAM10000_metadata.csv").is_file()  # lesion ids kept beside


def test_ham10000_tab_metadata_and_bad_rows(tmp_path):
    (tmp_path / "src").mkdir()
    make_ham10000(tmp_path / "src", delimiter="\t")
    (tmp_path / "src" / "HAM10000_metadata.csv").rename(tmp_path / "src" / "HAM10000_metadata.tab")
    assert convert_ham10000(tmp_path / "src", tmp_path / "out")["images"] == 5
    meta = tmp_path / "src" / "HAM10000_metadata.tab"
    meta.write_text(meta.read_text().replace("\tnv\t", "\tnevus\t"))
    with pytest.raises(DatasetError, match=r"HAM10000_metadata.tab: line 4: dx 'nevus' is not one of"):
        convert_ham10000(tmp_path / "src", tmp_path / "out2")
    meta.write_text(meta.read_text().replace("\tnevus\t", "\tnv\t").replace("ISIC_0029176", "ISIC_0000001"))
    with pytest.raises(DatasetError, match=r"line 6: image ISIC_0000001.jpg not found"):
        convert_ham10000(tmp_path / "src", tmp_path / "out2")


ISIC2019_COLUMNS = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC2019_ROWS = [("ISIC_0000000", "NV"), ("ISIC_0000002", "MEL"), ("ISIC_0000004_downsampled", "MEL"),
                 ("ISIC_0053454", "SCC"), ("ISIC_0060000", "AK")]


def make_isic2019(root, rows=ISIC2019_ROWS):
    with open(root / "ISIC_2019_Training_GroundTruth.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ISIC2019_COLUMNS)
        for image, cls in rows:
            writer.writerow([image] + ["1.0" if c == cls else "0.0" for c in ISIC2019_COLUMNS[1:]])
    (root / "ISIC_2019_Training_Metadata.csv").write_text("image,age_approx,anatom_site_general,lesion_id,sex\n")
    for i, (image, _) in enumerate(rows):
        _jpg(root / "ISIC_2019_Training_Input" / f"{image}.jpg", i)
    (root / "ISIC_2019_Training_Input" / "LICENSE.txt").write_text("CC-BY-NC\n")


def test_isic2019_to_image_folder(tmp_path):
    (tmp_path / "src").mkdir()
    make_isic2019(tmp_path / "src")
    summary = convert_isic2019(tmp_path / "src", tmp_path / "out")
    assert summary["per_class"] == {"AK": 1, "MEL": 2, "NV": 1, "SCC": 1}  # no UNK folder (no image)
    records, classes = load_image_folder(tmp_path / "out", check_files=True)
    assert classes == ["AK", "MEL", "NV", "SCC"]
    assert sorted(r["id"] for r in records) == sorted(f"{c}/{i}" for i, c in ISIC2019_ROWS)
    src = np.asarray(Image.open(tmp_path / "src" / "ISIC_2019_Training_Input" / "ISIC_0000004_downsampled.jpg"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "MEL" / "ISIC_0000004_downsampled.jpg")), src)
    assert (tmp_path / "out" / "ISIC_2019_Training_GroundTruth.csv").is_file()


def test_isic2019_row_with_two_classes_and_missing_columns(tmp_path):
    (tmp_path / "src").mkdir()
    make_isic2019(tmp_path / "src")
    gt = tmp_path / "src" / "ISIC_2019_Training_GroundTruth.csv"
    lines = gt.read_text().splitlines()
    lines[3] = lines[3].replace("0.0", "1.0", 1)  # ISIC_0000004_downsampled: MEL and MEL+... two classes
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"GroundTruth.csv: line 4: image ISIC_0000004_downsampled must have "
                                           r"exactly one class"):
        convert_isic2019(tmp_path / "src", tmp_path / "out")
    gt.write_text("name,MEL\nISIC_0000000,1.0\n")
    with pytest.raises(DatasetError, match="lacks the published column"):
        convert_isic2019(tmp_path / "src", tmp_path / "out")
    with pytest.raises(DatasetError, match="ISIC_2019_Test_GroundTruth.csv: missing"):
        convert_isic2019(tmp_path / "src", tmp_path / "out", subset="Test")


# ------------------------------------------------------------------------------------- DST and the CLI

def test_existing_destination_is_never_replaced_silently(tmp_path):
    (tmp_path / "src").mkdir()
    make_isic2019(tmp_path / "src")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="out: exists"):
        convert_isic2019(tmp_path / "src", dst)
    assert (dst / "mine.txt").read_text() == "keep"
    convert_isic2019(tmp_path / "src", dst, overwrite=True)
    assert not (dst / "mine.txt").exists() and load_image_folder(dst)[1] == ["AK", "MEL", "NV", "SCC"]


def test_cli_convert(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    make_ham10000(tmp_path / "src")
    assert main(["convert", "ham10000", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "5 image" in capsys.readouterr().out
    assert main(["convert", "ham10000", str(tmp_path / "src"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out" in err and "exists" in err
    assert main(["convert", "ham10000", str(tmp_path / "src"), str(tmp_path / "out"), "--overwrite"]) == 0
    make_idrid(tmp_path / "idrid")
    assert main(["convert", "idrid", str(tmp_path / "idrid"), str(tmp_path / "od"), "--lesions", "OD"]) == 0
    assert load_seg2d(tmp_path / "od")[1] == {0: "background", 1: "optic_disc"}
    assert main(["convert", "acdc", str(tmp_path / "none"), str(tmp_path / "acdc")]) == 1
    assert "missing folder of the ACDC download" in capsys.readouterr().err


def test_covid_qu_ex_images_of_other_modes_become_grey_png(tmp_path):
    make_covid(tmp_path / "src")
    folder = tmp_path / "src" / "Lung Segmentation Data" / "Lung Segmentation Data" / "Train" / "Normal" / "images"
    deep = (np.arange(320, dtype=np.uint16).reshape(16, 20) * 200)  # 16-bit grey
    Image.fromarray(deep).save(folder / "covid_1.png")
    rgba = np.dstack([RNG.integers(0, 256, (16, 20, 3)), np.full((16, 20), 255)]).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "Normal (2).png")
    convert_covid_qu_ex(tmp_path / "src", tmp_path / "out")
    records = {r["id"]: r for r in load_seg2d(tmp_path / "out", check_files=True)[0]}
    deep_out = Image.open(records["Train_Normal_covid_1"]["image"])
    assert deep_out.mode == "L"
    np.testing.assert_array_equal(np.asarray(deep_out), np.round(deep / deep.max() * 255).astype(np.uint8))
    rgba_out = Image.open(records["Train_Normal_Normal_2"]["image"])
    np.testing.assert_array_equal(np.asarray(rgba_out), np.asarray(Image.fromarray(rgba, "RGBA").convert("L")))
