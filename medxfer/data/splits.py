"""Seeded k-fold splits, saved as JSON in nnU-Net's ``splits_final.json`` format.

The file is a list with one object per fold, ``[{"train": [case ids], "val": [case ids]}, ...]``,
exactly what nnU-Net v2 reads from ``nnUNet_preprocessed/DatasetNNN_Name/splits_final.json``,
so one split file serves both medxfer bundles and nnU-Net. Every case is in exactly one
validation fold; fold sizes differ by at most one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medxfer.jsonfile import write_json

from .problems import DatasetError, read_json

__all__ = ["make_kfold_splits", "save_splits", "load_splits", "apply_split", "fold_records", "holdout_split"]


def _ids_of(cases: Iterable) -> list[str]:
    ids = [c["id"] if isinstance(c, dict) else str(c) for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"case ids must be unique, duplicated: {dup[:5]}")
    return ids


def make_kfold_splits(cases: Sequence, n_folds: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """Shuffle case ids with ``numpy.random.default_rng(seed)`` and cut them into ``n_folds`` folds.

    Args:
        cases: case ids, or records with an ``"id"`` key (as the loaders return).
        n_folds: number of folds, 2 <= n_folds <= number of cases.
        seed: shuffling seed; the same ids and seed always give the same folds, independent of
            the order the ids come in (they are sorted first).

    Returns:
        ``[{"train": [...], "val": [...]}] * n_folds``, ids sorted inside each list.
    """
    ids = sorted(_ids_of(cases))
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(ids) < n_folds:
        raise ValueError(f"cannot make {n_folds} folds from {len(ids)} cases")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, n_folds)
    out = []
    for k in range(n_folds):
        val = {ids[i] for i in folds[k]}
        out.append({"train": [i for i in ids if i not in val], "val": sorted(val)})
    return out


def save_splits(splits: list[dict], path, overwrite: bool = False) -> Path:
    """Write splits as JSON. An existing file is kept unless ``overwrite`` (it may be the user's).

    The file appears atomically (:func:`medxfer.jsonfile.write_json`: a full disk or a kill
    leaves the previous file or none) and, without ``overwrite``, exclusively: of several
    processes saving at once (the ranks of a multi-GPU run) one wins, the others get
    ``FileExistsError`` and can read the complete file.
    """
    path = Path(path)
    message = f"{path}: split file exists; pass overwrite=True (--overwrite) to replace it"
    if path.exists() and not overwrite:
        raise FileExistsError(message)
    try:
        return write_json(path, splits, exclusive=not overwrite)
    except FileExistsError:
        raise FileExistsError(message) from None


def load_splits(path) -> list[dict[str, list[str]]]:
    """Read and check a split file written by :func:`save_splits` or by nnU-Net."""
    path = Path(path)
    data = read_json(path, "split file not found")
    if not isinstance(data, list) or not data:
        raise DatasetError(path, "a split file is a non-empty list of {'train': [...], 'val': [...]}")
    for k, fold in enumerate(data):
        if not isinstance(fold, dict) or not isinstance(fold.get("train"), list) or not isinstance(fold.get("val"), list):
            raise DatasetError(path, f"fold {k} must be an object with 'train' and 'val' lists")
        overlap = set(fold["train"]) & set(fold["val"])
        if overlap:
            raise DatasetError(path, f"fold {k}: case(s) both in train and val: {sorted(overlap)[:5]}")
    return data


def apply_split(records: Sequence[dict], splits: list[dict], fold: int) -> tuple[list[dict], list[dict]]:
    """Records of fold ``fold`` as ``(train, val)``; every id in the split must exist in ``records``."""
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold must be in 0..{len(splits) - 1}, got {fold}")
    by_id = {r["id"]: r for r in records}
    unknown = [i for i in splits[fold]["train"] + splits[fold]["val"] if i not in by_id]
    if unknown:
        raise ValueError(f"fold {fold} names case(s) not in the dataset: {unknown[:5]}")
    return [by_id[i] for i in splits[fold]["train"]], [by_id[i] for i in splits[fold]["val"]]


def fold_records(records: Sequence[dict], fold: int = 0, n_folds: int = 5, seed: int = 0,
                 splits_file=None) -> tuple[list[dict], list[dict]]:
    """``(train, val)`` records of one fold, with the folds kept in ``splits_file``.

    The folds come from ``splits_file`` when it exists (ours or nnU-Net's ``splits_final.json``);
    otherwise seeded k-fold splits of ``records`` are made and saved there, so every later run
    (resume, evaluate, other folds, other stages) uses the same cases. Of several processes saving
    at once (multi-GPU ranks) one wins and the others read its file.
    """
    if splits_file is not None and Path(splits_file).exists():
        splits = load_splits(splits_file)
    else:
        splits = make_kfold_splits(records, n_folds=n_folds, seed=seed)
        if splits_file is not None:
            try:
                save_splits(splits, splits_file)
            except FileExistsError:
                splits = load_splits(splits_file)
    return apply_split(records, splits, fold)


def holdout_split(records: Sequence[dict], fraction: float, seed: int = 0, stream: int = 0,
                  what: str = "hold-out") -> tuple[list[dict], list[dict]]:
    """Seeded ``(kept, held_out)`` split of ``records`` (order kept inside each part): ``round(fraction
    * n)`` records held out, at least one and at most ``n - 1``. ``stream`` separates the random
    streams of different uses of one seed (``default_rng([seed, stream])``)."""
    if not 0 < fraction < 1:
        raise ValueError(f"{what} fraction must be in (0, 1), got {fraction}")
    if len(records) < 2:
        raise ValueError(f"need at least 2 images to hold some out ({what}), got {len(records)}")
    n_out = min(len(records) - 1, max(1, round(fraction * len(records))))
    order = np.random.default_rng([seed, stream]).permutation(len(records))
    out = set(order[:n_out].tolist())
    return [r for i, r in enumerate(records) if i not in out], [r for i, r in enumerate(records) if i in out]
