"""Converters from public downloads, as published, to the layouts medxfer's bundles read
(``medxfer convert acdc|covid-qu-ex|idrid|ham10000|isic2019 SRC DST``).

=================  ===========================================  =====================================
dataset            published download (``SRC``)                 written (``DST``), read by
=================  ===========================================  =====================================
``acdc``           ``database/{training,testing}/patientNNN/``  MSD task folder (:mod:`.msd`,
                   NIfTI per patient                            bundles/msd_seg3d)
``covid-qu-ex``    ``Lung Segmentation Data/`` or ``Infection   2D segmentation folder
                   Segmentation Data/`` (Kaggle), PNG           (:mod:`.seg2d`)
``idrid``          ``A. Segmentation/`` (IDRiD), JPEG + TIFF    2D segmentation folder
                   lesion masks                                 (:mod:`.seg2d`)
``ham10000``       ``HAM10000_metadata`` + image folders        class-per-folder images
                                                                (:mod:`.image_folder`)
``isic2019``       ``ISIC_2019_Training_GroundTruth.csv`` +     class-per-folder images
                   ``ISIC_2019_Training_Input/``                (:mod:`.image_folder`)
=================  ===========================================  =====================================

Facts of the published layouts (folder names, file naming, mask suffixes, CSV columns) are written
beside each converter with their source. Written by hand: MONAI and nnU-Net ship no converter for
these downloads as they are (nnU-Net's ``Dataset027_ACDC.py`` writes an nnU-Net v2 raw folder into
``nnUNet_raw``; ours writes the MSD layout anywhere and checks every case).

Common behaviour (decided here):

* ``DST`` appears complete or not at all (:func:`medxfer.atomic.atomic_directory`): a bad file
  midway leaves no half-written folder. An existing ``DST`` is never replaced unless
  ``overwrite=True`` (``--overwrite``), and then only once the new one is complete.
* Bad input is one :class:`~medxfer.data.problems.DatasetError` naming the source file or folder
  and the problem (missing folder of the layout, image without mask, mask of another size, CSV
  without the published columns, a row naming no class or two, ...).
* Images are copied byte for byte (``link=True``: hard-linked where the file system allows,
  else copied), except 2D images whose mode is neither 8-bit grey nor RGB, which are converted
  (grey) and written as PNG. Masks are written as 8-bit PNG label indices with ``labels.json``.
* Hidden files (macOS ``._*``) and ``Thumbs.db`` are ignored everywhere.
* Where the download has published subsets (train / val / test), ``published_split.json`` at
  ``DST`` lists the ids of each in the project's split format (:func:`medxfer.data.splits.load_splits`:
  one fold ``{"train", "val", "test"}``); the 2D readers ignore files at the root.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from os import PathLike
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medxfer.atomic import atomic_directory
from medxfer.jsonfile import write_json

from .image_folder import is_ignored, is_image_file
from .msd import inspect_case
from .problems import DatasetError
from .seg2d import LABELS_FILE
from .splits import save_splits

__all__ = [
    "CONVERTERS",
    "PUBLISHED_SPLIT_FILE",
    "ACDC_LABELS",
    "IDRID_LESIONS",
    "ISIC2019_CLASSES",
    "convert_acdc",
    "convert_covid_qu_ex",
    "convert_idrid",
    "convert_ham10000",
    "convert_isic2019",
]

#: Ids of the published train / val / test subsets, written at ``DST`` where the download has them.
PUBLISHED_SPLIT_FILE = "published_split.json"


# --------------------------------------------------------------------------------------------- helpers

def _entries(folder: Path) -> list[Path]:
    """Non-ignored entries of ``folder``, sorted by name."""
    return sorted((p for p in folder.iterdir() if not is_ignored(p.name)), key=lambda p: p.name)


def _place(src: Path, dst: Path, link: bool) -> None:
    """Copy ``src`` to ``dst`` (hard link with ``link`` where the file system allows it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not supported: copy
            pass
    shutil.copyfile(src, dst)


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _open_image(path: Path):
    """The PIL image of ``path`` (decoded), or a DatasetError naming the file."""
    from PIL import Image, ImageFile

    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DatasetError(path, f"cannot read image: {_first_line(err)}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def _binary_mask(path: Path, size: tuple[int, int], image: Path, threshold: int = 0) -> np.ndarray:
    """A published binary mask as a bool ``(H, W)`` array: a pixel is set when any channel is above
    ``threshold``; its size (width x height) must be ``size``, the size of ``image``."""
    mask = _open_image(path)
    if mask.size != size:
        (mw, mh), (iw, ih) = mask.size, size
        raise DatasetError(path, f"mask is {mw}x{mh} but image {image.name} is {iw}x{ih} (width x height)")
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array.max(axis=-1)
    return array > threshold


def _write_mask(label: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(path)


def _write_image_2d(src: Path, dst_stem: Path, link: bool) -> tuple[Path, tuple[int, int]]:
    """Place a 2D image under ``dst_stem`` + its suffix; returns ``(path, (width, height))``. Modes
    other than L / RGB (16-bit, RGBA, palette) are converted to grey (``L``) and saved as PNG."""
    from PIL import Image

    img = _open_image(src)
    if img.mode in ("L", "RGB") and src.suffix.lower() in (".png", ".jpg", ".jpeg"):
        out = dst_stem.with_name(dst_stem.name + src.suffix.lower())
        _place(src, out, link)
    else:
        out = dst_stem.with_name(dst_stem.name + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: rescale to 8 bits
            array = np.asarray(img, dtype=np.float64)
            top = float(array.max()) or 1.0
            img = Image.fromarray(np.round(array / top * 255.0).astype(np.uint8))
        else:
            img = img.convert("L")
        img.save(out)
    return out, img.size


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(*parts: str) -> str:
    """An id made of ``parts`` joined by ``_``, every run of characters outside ``[A-Za-z0-9._-]``
    (spaces, brackets) replaced by ``_``."""
    return "_".join(_SAFE.sub("_", p).strip("_") for p in parts if p)


def _labels_json(path: Path, names: Sequence[str]) -> None:
    write_json(path, {str(i): name for i, name in enumerate(names)})


# ------------------------------------------------------------------------------------------------- ACDC

#: ACDC label values (the challenge's evaluation page: "0, 1, 2 and 3 represent voxels located in the
#: background, in the RV cavity, in the myocardium, and in the LV cavity").
ACDC_LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
_ACDC_PATIENT = re.compile(r"^patient\d{3}$")
_ACDC_FRAME = re.compile(r"^(?P<case>patient\d{3}_frame\d{2})\.nii\.gz$")


def _acdc_cases(folder: Path, need_labels: bool) -> list[tuple[str, Path, Path | None]]:
    """``(case id, image, label or None)`` of every ``patientNNN/patientNNN_frameNN.nii.gz``."""
    cases = []
    patients = [p for p in _entries(folder) if p.is_dir() and _ACDC_PATIENT.match(p.name)]
    if not patients:
        raise DatasetError(folder, "holds no patientNNN/ folder (ACDC layout: database/training/patient001/"
                                   "patient001_frame01.nii.gz + patient001_frame01_gt.nii.gz)")
    for patient in patients:
        frames = [f for f in _entries(patient) if _ACDC_FRAME.match(f.name) and f.name.startswith(patient.name + "_")]
        if not frames:
            raise DatasetError(patient, f"no {patient.name}_frameNN.nii.gz (the end-diastolic and end-systolic frames)")
        for frame in frames:
            case = _ACDC_FRAME.match(frame.name)["case"]
            gt = frame.with_name(f"{case}_gt.nii.gz")
            if not gt.is_file():
                if need_labels:
                    raise DatasetError(gt, f"missing ground truth of frame {frame.name}")
                gt = None
            cases.append((case, frame, gt))
    return cases


def convert_acdc(src: str | PathLike, dst: str | PathLike, overwrite: bool = False, link: bool = False,
                 include_testing: bool = True) -> dict:
    """ACDC (Automated Cardiac Diagnosis Challenge, MICCAI 2017) -> an MSD task folder.

    Published layout (the download from humanheart-project.creatis.insa-lyon.fr, as documented
    e.g. by CineMA's ``cinema/data/acdc/README.md``; nnU-Net's ``Dataset027_ACDC.py`` reads the
    same)::

        database/training/patient001/Info.cfg                      ED / ES frame, Group, Height, ...
        database/training/patient001/patient001_4d.nii.gz          the whole cine sequence (skipped)
        database/training/patient001/patient001_frame01.nii.gz     end-diastolic frame (3D)
        database/training/patient001/patient001_frame01_gt.nii.gz  its labels 0..3 (ACDC_LABELS)
        database/training/patient001/patient001_frame12.nii.gz     end-systolic frame, + _gt
        database/testing/patient101/...                            same (labels in the 2022 release)

    ``SRC`` may be the folder holding ``database/`` or ``database/`` itself.

    Written (read by :func:`medxfer.data.msd.load_task`, bundles/msd_seg3d)::

        DST/dataset.json                 MSD keys, modality {"0": "MRI"}, labels 0..3, 3D
        DST/imagesTr/patient001_frame01.nii.gz   DST/labelsTr/patient001_frame01.nii.gz
        DST/imagesTs/patient101_frame01.nii.gz   (DST/labelsTs/... when the testing set has them)

    Decisions: every labelled frame is one case (ED and ES of a patient are two cases, as nnU-Net's
    conversion; split by patient when cross-validating: case ids start with the patient). The
    testing patients go to ``test`` (unlabelled in MSD's sense; their labels, where published, to
    ``labelsTs/`` so they can be scored), ``include_testing=False`` leaves them out. Every training
    case is opened and checked before it is copied (:func:`medxfer.data.msd.inspect_case`: readable,
    image and label geometry agree, label values within 0..3).

    Returns:
        ``{"dst", "training", "test", "labels"}`` (case counts).
    """
    src, dst = Path(src), Path(dst)
    root = src / "database" if (src / "database" / "training").is_dir() else src
    training, testing = root / "training", root / "testing"
    if not training.is_dir():
        raise DatasetError(training, "missing folder of the ACDC download (database/training/patientNNN/)")
    train_cases = _acdc_cases(training, need_labels=True)
    test_cases = _acdc_cases(testing, need_labels=False) if include_testing and testing.is_dir() else []
    for case, image, label in train_cases:
        problems, _ = inspect_case({"id": case, "image": str(image), "label": str(label)}, ACDC_LABELS)
        if problems:
            raise DatasetError(problems[0].path, problems[0].reason)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        training_list, test_list = [], []
        for case, image, label in train_cases:
            _place(image, tmp / "imagesTr" / f"{case}.nii.gz", link)
            _place(label, tmp / "labelsTr" / f"{case}.nii.gz", link)
            training_list.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        for case, image, label in test_cases:
            _place(image, tmp / "imagesTs" / f"{case}.nii.gz", link)
            if label is not None:
                _place(label, tmp / "labelsTs" / f"{case}.nii.gz", link)
            test_list.append(f"./imagesTs/{case}.nii.gz")
        write_json(tmp / "dataset.json", {
            "name": "ACDC",
            "description": "Automated Cardiac Diagnosis Challenge (MICCAI 2017): cine MRI, end-diastolic and "
                           "end-systolic frames, converted by medxfer convert acdc",
            "reference": "O. Bernard et al., IEEE TMI 37(11):2514-2525, 2018, doi:10.1109/TMI.2018.2837502",
            "licence": "see MANDATORY_CITATION.md of the ACDC download",
            "release": "ACDC (CREATIS, University of Lyon)",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {str(k): v for k, v in ACDC_LABELS.items()},
            "numTraining": len(training_list),
            "numTest": len(test_list),
            "training": training_list,
            "test": test_list,
        })
    return {"dst": str(dst), "training": len(train_cases), "test": len(test_cases), "labels": len(ACDC_LABELS)}


# ------------------------------------------------------------------------------------------ COVID-QU-Ex

#: COVID-QU-Ex subsets: top folder of the Kaggle download (anasmohammedtahir/covidqu) and the mask
#: folders of each class folder.
COVID_QU_EX_SUBSETS = {
    "lung": ("Lung Segmentation Data", ("lung masks",), ("background", "lung")),
    "infection": ("Infection Segmentation Data", ("lung masks", "infection masks"), ("background", "lung", "infection")),
}
_COVID_SPLITS = {"Train": "train", "Val": "val", "Test": "test"}


def convert_covid_qu_ex(src: str | PathLike, dst: str | PathLike, subset: str = "lung", overwrite: bool = False,
                        link: bool = False) -> dict:
    """COVID-QU-Ex (Qatar University chest X-rays, Kaggle ``anasmohammedtahir/covidqu``) -> a 2D
    segmentation folder.

    Published layout (the Kaggle download; the top folder is repeated inside itself)::

        Lung Segmentation Data/Lung Segmentation Data/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/
            images/<name>.png            chest X-ray, 256 x 256
            lung masks/<name>.png        0/255 lung mask, same name and size
        Infection Segmentation Data/Infection Segmentation Data/{Train,Val,Test}/<class>/
            images/  lung masks/  infection masks/<name>.png

    ``SRC`` may be the download root, the top folder (either nesting) or the folder holding
    ``Train/``; ``subset`` chooses ``"lung"`` (Lung Segmentation Data: binary lung masks) or
    ``"infection"`` (Infection Segmentation Data: 0 background, 1 lung, 2 infection; an infected
    pixel is 2 even outside the lung mask).

    Written: ``DST/images/<Split>_<Class>_<name>.png``, ``DST/masks/<same>.png`` (label indices),
    ``DST/labels.json`` and ``DST/published_split.json`` (Train / Val / Test ids). Ids join split,
    class folder and file name (characters outside ``[A-Za-z0-9._-]`` become ``_``), so names that
    repeat across classes stay distinct. Masks are read as set where any channel is above 127 (the
    published masks hold 0 and 255).

    Returns:
        ``{"dst", "images", "per_split": {split: n}, "per_class": {class: n}, "labels"}``.
    """
    if subset not in COVID_QU_EX_SUBSETS:
        raise ValueError(f"COVID-QU-Ex subset must be one of {sorted(COVID_QU_EX_SUBSETS)}, got {subset!r}")
    top, mask_folders, names = COVID_QU_EX_SUBSETS[subset]
    src, dst = Path(src), Path(dst)
    # the Kaggle download nests the top folder inside itself; accept either level or the split folders' parent
    base = next((b for b in (src / top / top, src / top, src) if any((b / s).is_dir() for s in _COVID_SPLITS)), src)
    splits = [s for s in _COVID_SPLITS if (base / s).is_dir()]
    if not splits:
        raise DatasetError(src, f"no Train/, Val/ or Test/ folder found (COVID-QU-Ex layout: '{top}/{top}/Train/"
                                f"COVID-19/images/*.png' + '{mask_folders[-1]}/')")
    pairs = []  # (split, class, image, [masks])
    for split in splits:
        classes = [c for c in _entries(base / split) if c.is_dir()]
        if not classes:
            raise DatasetError(base / split, "holds no class folder (COVID-19/, Non-COVID/, Normal/)")
        for cls in classes:
            image_dir = cls / "images"
            if not image_dir.is_dir():
                raise DatasetError(image_dir, "missing folder of the COVID-QU-Ex layout (<class>/images/)")
            for folder in mask_folders:
                if not (cls / folder).is_dir():
                    raise DatasetError(cls / folder, f"missing mask folder of the COVID-QU-Ex {subset} subset")
            for image in _entries(image_dir):
                if not image.is_file() or not is_image_file(image.name):
                    continue
                masks = [cls / folder / image.name for folder in mask_folders]
                for m in masks:
                    if not m.is_file():
                        raise DatasetError(m, f"missing mask of image {image}")
                pairs.append((split, cls.name, image, masks))
    if not pairs:
        raise DatasetError(base, "holds no image (expected <Split>/<class>/images/*.png)")
    ids: dict[str, Path] = {}
    split_ids: dict[str, list[str]] = {s: [] for s in _COVID_SPLITS.values()}
    per_class: dict[str, int] = {}
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for split, cls, image, masks in pairs:
            case = _safe_id(split, cls, image.stem)
            if case in ids:
                raise DatasetError(image, f"gives id {case!r} like {ids[case]}; rename one")
            ids[case] = image
            _, size = _write_image_2d(image, tmp / "images" / case, link)
            label = np.zeros(size[::-1], dtype=np.uint8)
            for value, mask in enumerate(masks, start=1):
                label[_binary_mask(mask, size, image, threshold=127)] = value
            _write_mask(label, tmp / "masks" / f"{case}.png")
            split_ids[_COVID_SPLITS[split]].append(case)
            per_class[cls] = per_class.get(cls, 0) + 1
        _labels_json(tmp / LABELS_FILE, names)
        save_splits([{k: sorted(v) for k, v in split_ids.items()}], tmp / PUBLISHED_SPLIT_FILE)
    return {"dst": str(dst), "images": len(pairs), "per_split": {k: len(v) for k, v in split_ids.items()},
            "per_class": per_class, "labels": len(names)}


# ------------------------------------------------------------------------------------------------ IDRiD

#: IDRiD Segmentation ground truths: code (file suffix ``_<code>.tif``) -> (folder, class name).
IDRID_LESIONS = {
    "MA": ("1. Microaneurysms", "microaneurysms"),
    "HE": ("2. Haemorrhages", "haemorrhages"),
    "EX": ("3. Hard Exudates", "hard_exudates"),
    "SE": ("4. Soft Exudates", "soft_exudates"),
    "OD": ("5. Optic Disc", "optic_disc"),
}
_IDRID_SETS = {"a. Training Set": "train", "b. Testing Set": "test"}
_IDRID_IMAGE = re.compile(r"^IDRiD_\d{2,3}$")


def convert_idrid(src: str | PathLike, dst: str | PathLike, lesions: Sequence[str] = ("MA", "HE", "EX", "SE"),
                  overwrite: bool = False, link: bool = False) -> dict:
    """IDRiD (Indian Diabetic Retinopathy Image Dataset, Segmentation part) -> a 2D segmentation folder.

    Published layout (IEEE DataPort / the IDRiD challenge; as read e.g. by torch_em's ``idrid``
    loader)::

        A. Segmentation/1. Original Images/a. Training Set/IDRiD_01.jpg ... IDRiD_54.jpg  (4288 x 2848)
        A. Segmentation/1. Original Images/b. Testing Set/IDRiD_55.jpg ... IDRiD_81.jpg
        A. Segmentation/2. All Segmentation Groundtruths/a. Training Set/
            1. Microaneurysms/IDRiD_01_MA.tif   2. Haemorrhages/IDRiD_01_HE.tif
            3. Hard Exudates/IDRiD_01_EX.tif    4. Soft Exudates/IDRiD_01_SE.tif
            5. Optic Disc/IDRiD_01_OD.tif
        A. Segmentation/2. All Segmentation Groundtruths/b. Testing Set/...   (same)

    One TIFF mask per image and lesion type; a lesion absent from an image has no file (e.g. soft
    exudates are marked in only some images), read here as an empty mask. The masks are binary but
    not 0/1: the lesion is drawn in red (RGB TIFF; 76 once converted to grey), so a pixel is set
    where any channel is non-zero.

    ``SRC`` may be the download root or ``A. Segmentation/`` itself. ``lesions`` (codes of
    :data:`IDRID_LESIONS`, default the four lesions MA, HE, EX, SE; ``OD`` the optic disc) become
    classes 1..K in that order; where masks overlap, the lesion listed **first** wins (so the default
    keeps small lesions over large ones). One lesion gives a binary dataset.

    Written: ``DST/images/IDRiD_NN.jpg`` (copied), ``DST/masks/IDRiD_NN.png``, ``DST/labels.json``
    and ``DST/published_split.json`` (Training Set -> train, Testing Set -> test; the release has
    no validation set, so ``val`` is empty).

    Returns:
        ``{"dst", "images", "per_split", "labels", "overlap_pixels"}``; ``overlap_pixels`` counts the
        pixels set in more than one of the chosen masks.
    """
    lesions = [str(code).upper() for code in lesions]
    unknown = [c for c in lesions if c not in IDRID_LESIONS]
    if unknown or not lesions or len(set(lesions)) != len(lesions):
        raise ValueError(f"IDRiD lesions must be distinct codes among {list(IDRID_LESIONS)}, got {lesions}")
    src, dst = Path(src), Path(dst)
    seg = src / "A. Segmentation" if (src / "A. Segmentation").is_dir() else src
    image_root, gt_root = seg / "1. Original Images", seg / "2. All Segmentation Groundtruths"
    for folder in (image_root, gt_root):
        if not folder.is_dir():
            raise DatasetError(folder, "missing folder of the IDRiD layout (A. Segmentation/1. Original Images/ + "
                                       "2. All Segmentation Groundtruths/)")
    sets = [s for s in _IDRID_SETS if (image_root / s).is_dir()]
    if not sets:
        raise DatasetError(image_root, f"holds neither {' nor '.join(repr(s) for s in _IDRID_SETS)}")
    cases = []  # (split, image, {code: mask or None})
    for name in sets:
        images = {p.stem: p for p in _entries(image_root / name)
                  if p.is_file() and is_image_file(p.name) and _IDRID_IMAGE.match(p.stem)}
        if not images:
            raise DatasetError(image_root / name, "holds no IDRiD_NN.jpg image")
        masks: dict[str, dict[str, Path]] = {stem: {} for stem in images}
        for code in lesions:
            folder = gt_root / name / IDRID_LESIONS[code][0]
            if not folder.is_dir():
                raise DatasetError(folder, f"missing ground-truth folder of lesion {code}")
            for mask in _entries(folder):
                if not mask.is_file():
                    continue
                stem, suffix = mask.stem, mask.suffix.lower()
                if suffix not in (".tif", ".tiff") or not stem.endswith(f"_{code}"):
                    raise DatasetError(mask, f"not an IDRiD {code} mask (expected IDRiD_NN_{code}.tif)")
                owner = stem[: -len(code) - 1]
                if owner not in images:
                    raise DatasetError(mask, f"mask without image ({image_root / name / (owner + '.jpg')} missing)")
                masks[owner][code] = mask
        cases += [(_IDRID_SETS[name], images[stem], masks[stem]) for stem in sorted(images)]
    names = ["background"] + [IDRID_LESIONS[c][1] for c in lesions]
    split_ids: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    overlap = 0
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        for split, image, found in cases:
            _, size = _write_image_2d(image, tmp / "images" / image.stem, link)
            label = np.zeros(size[::-1], dtype=np.uint8)
            hits = np.zeros(size[::-1], dtype=np.uint8)
            for value in range(len(lesions), 0, -1):  # the first listed lesion is written last: it wins
                mask_path = found.get(lesions[value - 1])
                if mask_path is None:
                    continue
                mask = _binary_mask(mask_path, size, image)
                label[mask] = value
                hits += mask
            overlap += int(np.count_nonzero(hits > 1))
            _write_mask(label, tmp / "masks" / f"{image.stem}.png")
            split_ids[split].append(image.stem)
        _labels_json(tmp / LABELS_FILE, names)
        save_splits([split_ids], tmp / PUBLISHED_SPLIT_FILE)
    return {"dst": str(dst), "images": len(cases), "per_split": {k: len(v) for k, v in split_ids.items()},
            "labels": len(names), "overlap_pixels": overlap}


# ------------------------------------------------------------------------- classification (ImageFolder)

def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV (or tab-separated) file; DatasetError naming it when a required
    column is missing or it is not text."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(path, f"not a text file: {e}") from None
    lines = text.splitlines()
    if not lines:
        raise DatasetError(path, "empty file (expected a header row)")
    delimiter = "\t" if "\t" in lines[0] else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(path, f"lacks the published column(s) {', '.join(missing)} (header: {', '.join(header)})")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    return header, rows


def _index_images(root: Path) -> dict[str, Path]:
    """Every image file under ``root`` by its stem. The same image twice (HAM10000's Kaggle copy
    holds each part folder in two spellings) is taken once when the copies have the same size;
    two different files with one stem are an error."""
    index: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        for name in sorted(filenames):
            if is_ignored(name) or not is_image_file(name):
                continue
            path = Path(dirpath) / name
            stem = path.stem
            if stem in index:
                if index[stem].stat().st_size != path.stat().st_size:
                    raise DatasetError(path, f"two different images named {stem} ({index[stem]} and this one)")
                continue
            index[stem] = path
    return index


def _write_image_folder(tmp: Path, items: Sequence[tuple[str, str, Path]], link: bool) -> dict[str, int]:
    """Place ``(class, id, image)`` items as ``tmp/<class>/<id><suffix>``; counts per class."""
    counts: dict[str, int] = {}
    for cls, image_id, image in items:
        _place(image, tmp / cls / f"{image_id}{image.suffix.lower()}", link)
        counts[cls] = counts.get(cls, 0) + 1
    return dict(sorted(counts.items()))


#: HAM10000 metadata columns (Harvard Dataverse doi:10.7910/DVN/DBW86T, ``HAM10000_metadata``):
#: lesion_id, image_id, dx, dx_type, age, sex, localization; ``dx`` is one of these diagnoses.
HAM10000_DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def convert_ham10000(src: str | PathLike, dst: str | PathLike, overwrite: bool = False, link: bool = False) -> dict:
    """HAM10000 (Tschandl et al. 2018; the ISIC 2018 Task 3 training set) -> class-per-folder images.

    Published layout (Harvard Dataverse doi:10.7910/DVN/DBW86T; the Kaggle copy
    ``kmader/skin-cancer-mnist-ham10000`` holds the same files)::

        HAM10000_metadata(.csv|.tab)     lesion_id,image_id,dx,dx_type,age,sex,localization
        HAM10000_images_part_1/ISIC_0024306.jpg ...   (5000 JPEGs; part1 / part_1 spellings vary)
        HAM10000_images_part_2/ISIC_0029306.jpg ...   (5015 JPEGs)

    The metadata file is found anywhere under ``SRC`` (comma- or tab-separated), images anywhere
    under ``SRC`` by ``<image_id>.jpg``. ``dx`` is the class: akiec, bcc, bkl, df, mel, nv, vasc
    (:data:`HAM10000_DX`); another value is an error naming the row.

    Written: ``DST/<dx>/<image_id>.jpg`` (:func:`medxfer.data.image_folder.load_image_folder`) and a
    copy of the metadata file at ``DST`` (ignored by the reader). Several images show the same lesion
    (``lesion_id``): split by lesion, not by image, to keep a lesion out of both sides.

    Returns:
        ``{"dst", "images", "per_class": {dx: n}}``.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DatasetError(src, "HAM10000 download folder does not exist")
    found = sorted(p for p in src.rglob("HAM10000_metadata*") if p.is_file() and not is_ignored(p.name)
                   and p.suffix.lower() in ("", ".csv", ".tab", ".txt"))
    if not found:
        raise DatasetError(src, "no HAM10000_metadata(.csv|.tab) file found under it")
    metadata = found[0]
    _, rows = _read_csv(metadata, ("image_id", "dx"))
    index = _index_images(src)
    items = []
    for n, row in enumerate(rows, start=2):
        image_id, dx = row["image_id"], row["dx"]
        if dx not in HAM10000_DX:
            raise DatasetError(metadata, f"line {n}: dx {dx!r} is not one of {', '.join(HAM10000_DX)}")
        if image_id not in index:
            raise DatasetError(metadata, f"line {n}: image {image_id}.jpg not found under {src}")
        items.append((dx, image_id, index[image_id]))
    if not items:
        raise DatasetError(metadata, "lists no image")
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        counts = _write_image_folder(tmp, items, link)
        shutil.copyfile(metadata, tmp / metadata.name)
    return {"dst": str(dst), "images": len(items), "per_class": counts}


#: ISIC 2019 ground-truth columns after ``image`` (challenge.isic-archive.com/data, 2019): one-hot
#: diagnoses; UNK (none of the others) is empty in the training set.
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def convert_isic2019(src: str | PathLike, dst: str | PathLike, subset: str = "Training", overwrite: bool = False,
                     link: bool = False) -> dict:
    """ISIC 2019 classification (Task 1) -> class-per-folder images.

    Published layout (challenge.isic-archive.com/data/#2019)::

        ISIC_2019_Training_Input/ISIC_0000000.jpg ...     25,331 JPEGs (some ids end in _downsampled)
        ISIC_2019_Training_GroundTruth.csv                image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK
        ISIC_2019_Training_Metadata.csv                   image,age_approx,anatom_site_general,lesion_id,sex

    Each ground-truth row is one-hot (``1.0`` in exactly one class column, ``0.0`` elsewhere); a row
    with no class or several is an error naming the line. ``subset="Test"`` reads the
    ``ISIC_2019_Test_*`` files the same way (the test ground truth was released later).

    Written: ``DST/<class>/<image>.jpg`` (class folders named as the CSV columns; a class without
    image, UNK in the training set, gets no folder, since the ImageFolder reader refuses empty class
    folders) and copies of the ground-truth and metadata CSVs at ``DST``.

    Returns:
        ``{"dst", "images", "per_class": {class: n}}``.
    """
    src, dst = Path(src), Path(dst)
    csv_path = src / f"ISIC_2019_{subset}_GroundTruth.csv"
    image_dir = src / f"ISIC_2019_{subset}_Input"
    if not csv_path.is_file():
        raise DatasetError(csv_path, "missing ground-truth file of the ISIC 2019 layout")
    if not image_dir.is_dir():
        raise DatasetError(image_dir, "missing image folder of the ISIC 2019 layout")
    header, rows = _read_csv(csv_path, ("image",))
    classes = [h for h in header if h != "image"]
    unknown = [c for c in classes if c not in ISIC2019_CLASSES]
    if not classes or unknown:
        raise DatasetError(csv_path, f"class columns must be among {', '.join(ISIC2019_CLASSES)}, got {', '.join(classes)}")
    index = _index_images(image_dir)
    items = []
    for n, row in enumerate(rows, start=2):
        try:
            values = [float(row[c]) for c in classes]
        except (TypeError, ValueError):
            raise DatasetError(csv_path, f"line {n}: class values must be numbers (1.0 / 0.0)") from None
        hot = [c for c, v in zip(classes, values) if v == 1.0]
        if len(hot) != 1 or any(v not in (0.0, 1.0) for v in values):
            raise DatasetError(csv_path, f"line {n}: image {row['image']} must have exactly one class set to 1.0, "
                                         f"got {', '.join(hot) or 'none'}")
        if row["image"] not in index:
            raise DatasetError(csv_path, f"line {n}: image {row['image']}.jpg not found in {image_dir}")
        items.append((hot[0], row["image"], index[row["image"]]))
    if not items:
        raise DatasetError(csv_path, "lists no image")
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        counts = _write_image_folder(tmp, items, link)
        for extra in (csv_path, src / f"ISIC_2019_{subset}_Metadata.csv"):
            if extra.is_file():
                shutil.copyfile(extra, tmp / extra.name)
    return {"dst": str(dst), "images": len(items), "per_class": counts}


#: ``medxfer convert <name>`` -> converter ``(src, dst, overwrite=..., link=..., **options) -> summary``.
CONVERTERS: dict[str, Callable[..., dict]] = {
    "acdc": convert_acdc,
    "covid-qu-ex": convert_covid_qu_ex,
    "idrid": convert_idrid,
    "ham10000": convert_ham10000,
    "isic2019": convert_isic2019,
}
