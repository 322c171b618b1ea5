"""Dataset validation: ``medxfer check-data PATH``.

Finds every dataset under PATH (an MSD ``TaskNN_Name`` or nnU-Net ``DatasetNNN_Name`` folder with a
dataset.json, an ISIC 2017/2018 folder, or a folder holding several of them) and reports each
problem as ``<file>: <one-line reason>``:

* structure (from the loaders): dataset.json keys, listed files that do not exist, ISIC ids,
  missing lesion/attribute masks;
* content (every file opened): readable (a truncated ``.nii.gz`` fails here), image and label
  shapes and affines agree (``rtol=1e-4``, ``atol=1e-3`` mm, as nnU-Net's integrity check), label
  values within the declared labels, finite intensities, channel count of 4D / multi-file images.

The content checks of one MSD / nnU-Net case are :func:`medxfer.data.msd.check_case` (volumes read by
:func:`medxfer.data.volumes.read_volume`: nibabel for ``.nii``/``.nii.gz``, SimpleITK for other
nnU-Net file endings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import isic
from .msd import check_case, scan_task
from .problems import Problem
from .seg2d import check_seg2d_files, scan_seg2d

__all__ = ["check_dataset", "check_task", "find_datasets", "DatasetReport"]


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
