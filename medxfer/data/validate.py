"""Dataset validation: ``medxfer check-data PATH``.

Finds every dataset under PATH (an MSD ``TaskNN_Name`` or nnU-Net ``DatasetNNN_Name`` folder with a
dataset.json, an ISIC 2017/2018 folder, or a folder holding several of them) and reports each
problem as ``<file>: <one-line reason>``:

* structure (from the loaders): dataset.json keys, listed files that do not exist, ISIC ids,
  missing lesion/attribute masks;
* content (every file opened): readable (a truncated ``.nii.gz`` fails here), image and label
  shapes and affines agree (``rtol=1e-4``, ``atol=1e-3`` mm, as nnU-Net's integrity check), label
  values within the declared labels, finite intensities, channel count of 4D / multi-file images.

Volumes are read with nibabel (``.nii``/``.nii.gz``) or SimpleITK (other nnU-Net file endings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import isic
from .msd import SegTask, image_files, scan_task
from .problems import DatasetError, Problem

__all__ = ["check_dataset", "check_task", "check_case", "find_datasets", "read_volume", "DatasetReport"]

AFFINE_RTOL, AFFINE_ATOL = 1e-4, 1e-3


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found in one dataset."""

    path: str
    kind: str  # "msd", "nnunetv2", "isic2017", "isic2018", "seg2d", "unknown"
    num_cases: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "num_cases": self.num_cases,
                "problems": [{"path": p.path, "reason": p.reason} for p in self.problems]}


def read_volume(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI (nibabel) or other ITK image (SimpleITK) as ``(array, 4x4 voxel-to-world affine)``.

    The array keeps the file's dtype and axis order ``(X, Y, Z[, C])``; the affine is in mm (RAS for
    NIfTI, converted from ITK's LPS otherwise). Raises :class:`DatasetError` naming the file.
    """
    path = Path(path)
    try:
        if path.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(str(path))
            return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
        import SimpleITK as sitk

        img = sitk.ReadImage(str(path))
        arr = sitk.GetArrayFromImage(img).transpose()  # ITK arrays are (Z, Y, X); make them (X, Y, Z)
        dim = 3 if img.GetDimension() >= 3 else img.GetDimension()
        direction = np.asarray(img.GetDirection()).reshape(img.GetDimension(), img.GetDimension())[:dim, :dim]
        affine = np.eye(4)
        affine[:dim, :dim] = direction * np.asarray(img.GetSpacing()[:dim])
        affine[:dim, 3] = img.GetOrigin()[:dim]
        affine[:2] *= -1  # LPS -> RAS
        return arr, affine
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except Exception as e:  # nibabel/gzip/zlib/ITK raise many types for a broken file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(path, f"cannot read image ({type(e).__name__}: {msg})") from None


def _label_problems(label_path: str, label: np.ndarray, labels: dict[int, str]) -> list[Problem]:
    if label.ndim != 3:
        return [Problem(label_path, f"label must be 3D, got shape {label.shape}")]
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            return [Problem(label_path, "label contains NaN or infinite values")]
        if not np.array_equal(label, np.round(label)):
            return [Problem(label_path, "label contains non-integer values")]
    values = np.unique(label).astype(np.int64)
    unknown = [int(v) for v in values if int(v) not in labels]
    if unknown:
        return [Problem(label_path, f"label value(s) {unknown} not declared in dataset.json labels {sorted(labels)}")]
    return []


def _image_problems(path: str, image: np.ndarray, expect_channels: int | None) -> list[Problem]:
    problems = []
    if expect_channels is None:  # one 3D volume per file
        if image.ndim != 3:
            problems.append(Problem(path, f"expected a 3D image, got shape {image.shape}"))
    elif image.ndim != 4 or image.shape[3] != expect_channels:
        problems.append(Problem(path, f"expected a 4D image with {expect_channels} channels last, got shape {image.shape}"))
    if np.issubdtype(image.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            problems.append(Problem(path, f"{bad} voxel(s) are NaN or infinite"))
    return problems


def _geometry_problems(path: str, shape, affine, ref_path: str, ref_shape, ref_affine) -> list[Problem]:
    if tuple(shape[:3]) != tuple(ref_shape[:3]):
        return [Problem(path, f"spatial shape {tuple(shape[:3])} differs from {Path(ref_path).name} {tuple(ref_shape[:3])}")]
    if not np.allclose(affine, ref_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        worst = float(np.max(np.abs(affine - ref_affine)))
        return [Problem(path, f"affine differs from {Path(ref_path).name} (max abs difference {worst:.4g})")]
    return []


def check_case(task: SegTask, record: dict) -> list[Problem]:
    """Open every file of one record of ``task`` and check it (see module docstring)."""
    files = image_files(record)
    expect_channels = task.num_channels if task.four_d else None
    problems: list[Problem] = []
    volumes = []
    for f in files:
        try:
            image, affine = read_volume(f)
        except DatasetError as e:
            problems.append(e.problem)
            continue
        problems += _image_problems(f, image, expect_channels)
        volumes.append((f, image.shape, affine))
    label_path = record.get("label")
    if label_path is not None:
        try:
            label, label_affine = read_volume(label_path)
        except DatasetError as e:
            return problems + [e.problem]
        problems += _label_problems(label_path, label, task.labels)
        volumes.insert(0, (label_path, label.shape, label_affine))
    if volumes:
        ref = volumes[0]
        for f, shape, affine in volumes[1:]:
            problems += _geometry_problems(f, shape, affine, *ref)
    return problems


def check_task(path, progress: bool = True) -> DatasetReport:
    """Check one MSD / nnU-Net v2 task folder: structure, then every training and test case."""
    task, problems = scan_task(path)
    kind = task.layout if task is not None else "unknown"
    report = DatasetReport(str(path), kind, problems=list(problems))
    if task is None:
        return report
    records = task.training + task.test
    report.num_cases = len(records)
    for record in tqdm(records, desc=f"check {Path(path).name}", unit="case", disable=not progress, leave=False):
        report.problems += check_case(task, record)
    return report


def check_isic_dataset(path, year: int | None = None, progress: bool = True) -> DatasetReport:
    """Check an ISIC 2017/2018 folder: names, pairs, then every image and mask."""
    year = year or isic.detect_isic_year(path)
    task = 2 if year is not None and _has_task2(Path(path), year) else 1
    records, problems = isic.scan_isic(path, year=year, task=task)
    report = DatasetReport(str(path), f"isic{year}" if year else "unknown", len(records), list(problems))
    for record in tqdm(records, desc=f"check {Path(path).name}", unit="image", disable=not progress, leave=False):
        report.problems += isic.check_isic_record(record)
    return report


def check_seg2d_dataset(path, progress: bool = True) -> DatasetReport:
    """Check a 2D segmentation folder (``images/`` + ``masks/``): pairs, sizes, mask values, then
    every image decoded."""
    from .seg2d import check_seg2d_files, scan_seg2d

    records, _, problems = scan_seg2d(path)
    report = DatasetReport(str(path), "seg2d", len(records), list(problems))
    report.problems += check_seg2d_files(records)
    return report


def _has_task2(root: Path, year: int) -> bool:
    layout = isic.ISIC_LAYOUTS[year]
    return (root / layout.task2_dir).is_dir()


def find_datasets(path) -> list[tuple[str, Path]]:
    """Datasets at or below ``path`` (depth <= 3) as ``(kind, folder)``: ``"task"``, ``"isic"`` or ``"seg2d"``."""
    path = Path(path)
    found: list[tuple[str, Path]] = []

    def visit(folder: Path, depth: int) -> None:
        if (folder / "dataset.json").is_file():
            found.append(("task", folder))
            return
        if isic.detect_isic_year(folder) is not None:
            found.append(("isic", folder))
            return
        if (folder / "images").is_dir() and (folder / "masks").is_dir():
            found.append(("seg2d", folder))
            return
        if depth == 0:
            return
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            visit(sub, depth - 1)

    if path.is_dir():
        visit(path, 3)
    return found


def check_dataset(path, progress: bool = True) -> list[DatasetReport]:
    """Check every dataset found at or below ``path``. A path holding none gives one report saying so."""
    path = Path(path)
    if not path.exists():
        return [DatasetReport(str(path), "unknown", problems=[Problem(str(path), "path does not exist")])]
    if path.is_file() and path.name == "dataset.json":
        path = path.parent
    datasets = find_datasets(path)
    if not datasets:
        reason = ("no dataset found: expected a folder with dataset.json (MSD TaskNN_Name / nnU-Net DatasetNNN_Name) "
                  "or ISIC 2017/2018 folders (e.g. ISIC2018_Task1-2_Training_Input) or a 2D segmentation folder "
                  "(images/ + masks/)")
        return [DatasetReport(str(path), "unknown", problems=[Problem(str(path), reason)])]
    checks = {"task": check_task, "isic": lambda p, progress: check_isic_dataset(p, progress=progress),
              "seg2d": check_seg2d_dataset}
    return [checks[kind](p, progress) for kind, p in datasets]
