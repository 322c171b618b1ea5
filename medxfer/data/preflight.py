"""Checks at the door of every workflow: the ``medxfer check-data`` checks on exactly the cases a run
will use, before any training, scoring or prediction starts.

A workflow's datalist function (``fold_datalists``, ``inference_datalist``, ``tatl_datalists``,
``seg2d_datalists``, ``target_cases``, ...) calls one of:

=========================  ==========================================================================
:func:`check_task_records`   MSD / nnU-Net cases: :func:`medxfer.data.msd.inspect_case` (the checks of
                             :func:`~medxfer.data.msd.check_case`), then, with the plans, the resampled
                             size against the memory, and the all-background rule
:func:`check_volume_records` images of no task (an inference folder / file): the same checks, any
                             channel count
:func:`check_isic_records`   ISIC images and masks: :func:`medxfer.data.isic.check_isic_record`
:func:`check_seg2d_records`  2D segmentation images: :func:`medxfer.data.seg2d.check_seg2d_files`
                             (the masks are decoded by the loader itself, every time)
:func:`check_image_records`  class-per-folder pretraining images: decoded completely, as
                             :func:`~medxfer.data.seg2d.check_seg2d_files` (a truncated JPEG fails here,
                             not in a DataLoader worker hours later)
=========================  ==========================================================================

The first problem is raised as one :class:`~medxfer.data.problems.DatasetError` naming the file and
counting the others (:func:`~medxfer.data.problems.raise_if_problems`).

**Cache.** A record that passed is remembered in ``<dataset>/medxfer_checked.json`` (beside
``medxfer_plans.json``) under its files' ``(path, size, mtime_ns)`` and the check's context (kind,
declared labels, channels, :data:`CHECKS_VERSION`), with the facts later checks need (spatial shape,
spacing, channels, foreground). A rerun stats the files and reads nothing else; a changed file (new
size or mtime) is checked again. Failed records are not cached (the run stops on them anyway). The
first check of a large set costs one full read of every file (ISIC 2018: ~2,600 images and their
masks; a class-per-folder pretraining set: every image decoded once), with a progress bar. The
file is written atomically (:func:`medxfer.atomic.atomic_write_text`); a read-only dataset folder (or
any other OS error while writing it) only costs the cache, silently (logged at DEBUG). Chosen over a
content hash: hashing reads every byte, which is what the cache is there to avoid.

**Limits.** Header plausibility (spacing, shape) lives in :mod:`medxfer.data.msd`
(:data:`~medxfer.data.msd.SPACING_RANGE_MM`, :data:`~medxfer.data.msd.MAX_AXIS_VOXELS`,
:data:`~medxfer.data.msd.MAX_FILE_VOXELS`), so ``check-data`` refuses the same headers. With the
plans, one case resampled to ``target_spacing`` (image channels + label, float32) must fit in
:data:`MEMORY_FRACTION` of the physical memory (:func:`physical_memory`): the preprocessing holds
the input, the resampled output and the label at once. When all cases together exceed it, a
WARNING says that caching them all (``CacheDataset``, ``cache_rate`` 1) will not fit.

**All background.** A labelled case without a foreground voxel is logged as a WARNING naming its
label file (negative cases exist, e.g. KiTS); when every training case of the run is background the
run has nothing to learn (validation Dice 0 with exit 0) and it is an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from medxfer.atomic import atomic_write_text

from .isic import check_isic_record
from .msd import SegTask, image_files, inspect_case
from .problems import Problem, raise_if_problems
from .seg2d import check_seg2d_files

__all__ = ["CACHE_FILE", "CHECKS_VERSION", "MEMORY_FRACTION", "check_task_records", "check_volume_records",
           "check_isic_records", "check_seg2d_records", "check_image_records", "check_image_files", "physical_memory",
           "resampled_shape", "memory_problems"]

logger = logging.getLogger("medxfer.data")

#: Cache of passed records, in the dataset folder.
CACHE_FILE = "medxfer_checked.json"
#: Raised whenever a check changes what it accepts: older cache entries are then checked again.
CHECKS_VERSION = 1
#: Share of the physical memory one resampled case (image channels + label, float32) may take.
MEMORY_FRACTION = 0.5

#: A progress bar is shown when at least this many records are checked (a first run on a large set).
PROGRESS_FROM = 50

_WARNED: set[str] = set()  # label files already warned about in this process (datalists are built twice)


def physical_memory() -> int | None:
    """Bytes of memory this process may use: the physical memory (``os.sysconf``), or the cgroup v2
    limit of a container (``/sys/fs/cgroup/memory.max``) when that is lower; ``None`` where the
    platform tells neither."""
    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        total = None
    try:
        limit = int(Path("/sys/fs/cgroup/memory.max").read_text().strip())  # "max" (no limit) -> ValueError
    except (OSError, ValueError):
        limit = None
    known = [m for m in (total, limit) if m]
    return min(known) if known else None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# --- the cache -----------------------------------------------------------------------------------

class _Cache:
    """``medxfer_checked.json`` of one dataset folder: ``{"version", "entries": {key: {"stat", "facts"}}}``."""

    def __init__(self, root: Path, enabled: bool = True):
        self.root = root
        self.path = root / CACHE_FILE
        self.entries: dict = {}
        self.changed = False
        self.enabled = enabled
        if not enabled:
            return
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and data.get("version") == CHECKS_VERSION and isinstance(data.get("entries"), dict):
                self.entries = data["entries"]
        except (OSError, ValueError):  # none yet, unreadable or not JSON: start empty (it is only a cache)
            pass

    def name(self, path) -> str:
        """``path`` relative to the dataset folder when inside it (a copied folder keeps its cache)."""
        path = Path(path).absolute()
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    @staticmethod
    def stat(files: Sequence[str]) -> list | None:
        try:
            return [[st.st_size, st.st_mtime_ns] for st in (os.stat(f) for f in files)]
        except OSError:  # a missing file: the check itself reports it
            return None

    def get(self, key: str, stat) -> dict | None:
        entry = self.entries.get(key)
        if stat is not None and isinstance(entry, dict) and entry.get("stat") == stat:
            return entry.get("facts") or {}
        return None

    def put(self, key: str, stat, facts) -> None:
        if stat is not None:
            self.entries[key] = {"stat": stat, "facts": facts}
            self.changed = True

    def save(self) -> None:
        if not self.changed or not self.enabled:
            return
        try:
            atomic_write_text(self.path, json.dumps({"version": CHECKS_VERSION, "entries": self.entries}) + "\n")
        except OSError as err:  # read-only dataset, full disk: no cache, same checks next time
            logger.debug("check cache not written (%s)", err)


def _checked(root, kind: str, context, records: Sequence[dict], files_of: Callable[[dict], list[str]],
             check: Callable[[dict], tuple[list[Problem], dict | None]], what: str,
             cache: bool = True) -> tuple[list[Problem], list[dict | None]]:
    """Run ``check`` on every record not in the cache of ``root``; returns ``(problems, facts per record)``.
    ``cache=False``: check every record, write no cache file."""
    cache = _Cache(Path(str(root)).absolute(), enabled=cache)
    prefix = json.dumps([kind, context], sort_keys=True)
    problems: list[Problem] = []
    facts: list[dict | None] = []
    todo = []
    for record in records:
        files = files_of(record)
        key = prefix + "|" + "|".join(cache.name(f) for f in files)
        stat = cache.stat(files)
        hit = cache.get(key, stat)
        facts.append(hit)
        if hit is None:
            todo.append((len(facts) - 1, record, key, stat))
    if todo:
        logger.info("checking %d %s of %s (first use or changed files; results kept in %s)", len(todo), what, root,
                    cache.path.name)
    for index, record, key, stat in tqdm(todo, desc=f"check {Path(str(root)).name}", unit="file", leave=False,
                                         disable=len(todo) < PROGRESS_FROM):
        found, fact = check(record)
        if found:
            problems += found
        else:
            facts[index] = fact or {}
            cache.put(key, stat, fact or {})
    cache.save()
    return problems, facts


# --- MSD / nnU-Net -------------------------------------------------------------------------------

def _volume_files(record: dict) -> list[str]:
    return image_files(record) + ([record["label"]] if record.get("label") is not None else [])


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> list[int]:
    """Voxels per axis after resampling ``shape`` at ``spacing`` to ``target_spacing`` (same axis order,
    the file's; as ``Spacingd`` after ``Orientationd("RAS")`` with the plans' file-axis spacing)."""
    return [max(1, math.ceil(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing)]


def memory_problems(records: Sequence[dict], facts: Sequence[dict | None], plans: dict,
                    memory: int | None = None) -> list[Problem]:
    """One problem per case whose resampled float32 image channels + label exceed
    :data:`MEMORY_FRACTION` of ``memory`` (default :func:`physical_memory`); a WARNING when all cases
    together do (caching them all will not fit)."""
    memory = memory if memory is not None else physical_memory()
    target = plans.get("target_spacing") if isinstance(plans, dict) else None
    if not memory or not target:
        return []
    limit = MEMORY_FRACTION * memory
    problems, total = [], 0.0
    for record, fact in zip(records, facts):
        if not fact or "shape" not in fact:
            continue
        shape = resampled_shape(fact["shape"], fact["spacing"], target)
        arrays = int(fact.get("channels", 1)) + (1 if record.get("label") is not None else 0)
        size = float(np.prod(shape, dtype=np.float64)) * arrays * 4
        total += size
        if size > limit:
            problems.append(Problem(image_files(record)[0], (
                f"resampled to the plans' target spacing {list(target)} mm this case is {'x'.join(map(str, shape))} voxels "
                f"x {arrays} array(s) = {_gib(size)} float32, more than {MEMORY_FRACTION:.0%} of this machine's "
                f"{_gib(memory)} memory; check its header spacing {[round(s, 4) for s in fact['spacing']]} mm and the "
                "plans' target_spacing")))
    if not problems and total > limit and len(records) > 1:
        logger.warning("the %d cases of this run take %s after resampling, more than %.0f%% of this machine's %s "
                       "memory: caching them all (CacheDataset, cache_rate 1) will not fit; lower cache_rate",
                       len(records), _gib(total), 100 * MEMORY_FRACTION, _gib(memory))
    return problems


def _foreground_check(records: Sequence[dict], facts: Sequence[dict | None], train_records: Sequence[dict]) -> list[Problem]:
    """WARNING per labelled case without foreground; a problem when every training case is background."""
    by_label = {r.get("label"): f for r, f in zip(records, facts) if r.get("label") is not None}
    for label, fact in by_label.items():
        if fact and fact.get("foreground") is False and label not in _WARNED:
            _WARNED.add(label)
            logger.warning("%s: label has no foreground voxel (a background-only case)", label)
    labelled = [r["label"] for r in train_records if r.get("label") is not None]
    if labelled and all(by_label.get(p) and by_label[p].get("foreground") is False for p in labelled):
        others = f", nor do the other {len(labelled) - 1} training case(s) of this run" if len(labelled) > 1 else ""
        return [Problem(labelled[0], f"label has no foreground voxel{others}: nothing to learn (wrong label files, "
                                     "or label values?)")]
    return []


def check_task_records(task: SegTask, records: Sequence[dict], plans: dict | None = None,
                       train_records: Sequence[dict] | None = None, memory: int | None = None) -> list[dict | None]:
    """Check the cases ``records`` of ``task`` a run will use; :class:`DatasetError` for the first problem.

    Args:
        plans: the run's plans; with them every case's resampled size is checked against the memory.
        train_records: the training cases among ``records`` (default: every labelled one): an error
            when all of them are background. Pass ``[]`` to skip the rule (inference images).
        memory: bytes the memory check assumes (default: :func:`physical_memory`).

    Returns:
        per record, its facts (see :func:`medxfer.data.msd.inspect_case`).
    """
    expect = task.num_channels if task.four_d else None
    context = {"labels": {str(k): v for k, v in sorted(task.labels.items())}, "channels": expect}
    problems, facts = _checked(task.root, "msd", context, records, _volume_files,
                               lambda r: inspect_case(r, task.labels, expect), "case(s)")
    raise_if_problems(problems)
    problems = memory_problems(records, facts, plans, memory) if plans else []
    problems += _foreground_check(records, facts, records if train_records is None else train_records)
    raise_if_problems(problems)
    return facts


def check_volume_records(root, records: Sequence[dict], plans: dict | None = None,
                         memory: int | None = None) -> list[dict | None]:
    """Images of no task (``[{"image": path}]``, e.g. an inference folder): the checks of
    :func:`check_task_records` with any channel count (3D, or 4D channels last); cached in ``root``."""
    problems, facts = _checked(root, "volume", None, records, _volume_files,
                               lambda r: inspect_case(r, None, None, any_channels=True), "image(s)")
    raise_if_problems(problems)
    raise_if_problems(memory_problems(records, facts, plans, memory) if plans else [])
    return facts


# --- 2D ------------------------------------------------------------------------------------------

def _isic_files(record: dict) -> list[str]:
    files = [str(record["image"])] if "image" in record else []
    if "lesion" in record:
        files.append(str(record["lesion"]))
    return files + [str(p) for p in record.get("attributes", {}).values()]


def check_isic_records(root, records: Sequence[dict]) -> None:
    """:func:`medxfer.data.isic.check_isic_record` on every record (image decodes and is RGB, masks
    decode, are 8-bit single-channel 0/255 and have the image's size); cached in ``root``."""
    problems, _ = _checked(root, "isic", None, records, _isic_files, lambda r: (check_isic_record(r), {}), "image(s)")
    raise_if_problems(problems)


def _decoded(record: dict) -> tuple[list[Problem], dict]:
    return check_seg2d_files([record]), {}


def check_seg2d_records(root, records: Sequence[dict]) -> None:
    """:func:`medxfer.data.seg2d.check_seg2d_files` (every image decoded completely) on ``records``;
    cached in ``root``. Mask sizes and values are checked by the loader (:func:`~medxfer.data.seg2d.scan_seg2d`)."""
    problems, _ = _checked(root, "seg2d", None, records, lambda r: [str(r["image"])], _decoded, "image(s)")
    raise_if_problems(problems)


def check_image_records(root, records: Sequence[dict]) -> None:
    """Class-per-folder pretraining images decoded completely (as :func:`check_seg2d_records`);
    cached in ``root``."""
    problems, _ = _checked(root, "image", None, records, lambda r: [str(r["image"])], _decoded, "image(s)")
    raise_if_problems(problems)


def check_image_files(paths: Sequence) -> None:
    """Images to predict (a file or a folder's images, e.g. 2D inference inputs) decoded completely,
    as :func:`check_image_records`. Not cached: the cache file would land among the user's images,
    which the 2D loaders refuse as a stray file (and decoding a few inputs is cheap next to predicting)."""
    paths = [Path(p) for p in paths]
    if paths:
        problems, _ = _checked(paths[0].parent, "image", None, [{"image": str(p)} for p in paths],
                               lambda r: [str(r["image"])], _decoded, "image(s)", cache=False)
        raise_if_problems(problems)
