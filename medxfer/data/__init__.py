"""Datasets: loaders for the published layouts, k-fold splits, validation and generated data.

* :mod:`.msd` — MSD ``TaskNN_Name`` and nnU-Net v2 ``DatasetNNN_Name`` folders (3D and 4D).
* :mod:`.isic` — ISIC 2017 / 2018 Task 1 (lesion) and Task 2 (attribute) folders.
* :mod:`.splits` — seeded k-fold splits in nnU-Net's ``splits_final.json`` format.
* :mod:`.validate` — ``medxfer check-data``: every problem as ``<file>: <reason>``.
* :mod:`.volumes` — one NIfTI / ITK volume file as an array and its affine (nibabel / SimpleITK).
* :mod:`.image_folder` — class-per-folder 2D images (ImageNet train layout) for encoder pretraining.
* :mod:`.seg2d` — 2D segmentation folders (``images/`` + ``masks/`` + optional ``labels.json``).
* :mod:`.synth` — generators writing the same layouts (``medxfer synth msd|isic|classes|seg2d``).
"""

from .image_folder import load_image_folder, scan_image_folder
from .isic import check_isic_record, detect_isic_year, load_isic, scan_isic
from .msd import SegTask, load_msd_datalist, load_task, scan_task
from .problems import DatasetError, Problem
from .seg2d import load_seg2d, scan_seg2d
from .splits import apply_split, load_splits, make_kfold_splits, save_splits

__all__ = [
    "DatasetError", "Problem", "SegTask", "load_task", "scan_task", "load_msd_datalist",
    "load_isic", "scan_isic", "check_isic_record", "detect_isic_year",
    "load_image_folder", "scan_image_folder", "load_seg2d", "scan_seg2d",
    "make_kfold_splits", "save_splits", "load_splits", "apply_split",
]
