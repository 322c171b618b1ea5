"""Helpers the ``bundles/msd_seg3d`` configs call: device, plans, datalists, datasets, transfer.

The bundle configs stay declarative (they read like SPEC section 3); the decisions that need
code — planning a task on first use, seeded folds saved beside the run, joint label spaces for
multi-task pretraining, loading a bank entry with a transfer mode — live here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from monai.data import CacheDataset
from monai.transforms import Compose, MapLabelValued

from medxfer.atomic import atomic_write_text
from medxfer.data.msd import load_task
from medxfer.data.preflight import check_task_records, check_volume_records
from medxfer.data.problems import DatasetError, read_json
from medxfer.data.splits import fold_records
from medxfer.jsonfile import json_safe, write_json
from medxfer.networks import build_network, fit_patch
from medxfer.planning.nnunet import load_plans, plan_task
from medxfer.transfer.bank import BankError, ModelBank, entry_layout
from medxfer.transfer.bank_import import nnunet_finetune_command
from medxfer.transfer.weights import NoMatchingWeights, init_from_checkpoint, parse_mode, resize_position_embeddings
from medxfer.transforms.msd import msd_transforms
from medxfer.transforms.preprocessing import preprocessing_kind

__all__ = ["default_num_workers", "task_plans", "fold_datalists", "inference_datalist", "class_names",
           "source_datasets", "joint_labels", "load_bank_network", "ensure_empty_output",
           "preprocessing_summary", "sources_preprocessing", "bank_entry_name", "save_run_plans", "RUN_FILE",
           "save_run_record", "read_run_record", "run_setting", "check_run_overrides", "bank_entry_network",
           "finetune_plans"]

logger = logging.getLogger("medxfer.workflows")


def default_num_workers(device) -> int:
    """DataLoader workers for ``device``: 0 on CPU, ``min(4, cpu_count)`` with CUDA.

    On a CPU run the workers compete with the compute threads for the same cores; measured on
    2 cores (UNet, 48x48x16 patches, ``scripts/bench/msd_seg3d.py`` setup): 0.091 s/iteration with
    no workers, 0.12 s with 2 persistent workers, 0.18 s with 2 workers restarted every epoch.
    """
    import os

    return 0 if torch.device(device).type == "cpu" else min(4, os.cpu_count() or 1)


def task_plans(data_root, plans_file: str | None = None, patch_size: Sequence[int] | None = None,
               arch: str | None = None, arch_kwargs: dict | None = None) -> dict:
    """Plans of a task: read ``plans_file`` (default ``<task>/medxfer_plans.json``), or run nnU-Net
    planning (:func:`medxfer.planning.nnunet.plan_task`) and write it there when it does not exist.

    ``patch_size`` (voxels, file-axis order), when given, overrides the planned patch — e.g. to
    share one patch between the tasks of a model bank, or tiny patches in tests. With ``arch`` the
    patch is then rounded up to a size the network accepts (:func:`medxfer.networks.registry.fit_patch`).
    """
    path = Path(plans_file) if plans_file else Path(str(data_root)) / "medxfer_plans.json"
    if path.exists():
        plans = load_plans(path)
    elif data_root is None:
        raise DatasetError(path, "plans file not found (a trained model keeps the plans.json it was trained with)")
    else:
        logger.info("no plans at %s: planning %s with nnU-Net (written there, edit by hand if needed)", path, data_root)
        task = load_task(data_root)  # the door check first: a bad case must not surface as a planning error
        check_task_records(task, task.training)
        try:
            plans = plan_task(data_root, out=path)
        except FileExistsError:  # another process (multi-GPU rank) planned it meanwhile
            plans = load_plans(path)
    if patch_size is not None:
        plans = dict(plans, patch_size=[int(p) for p in patch_size])
    if arch is not None:

        fitted = fit_patch(arch, plans["patch_size"], arch_kwargs)
        if fitted != list(plans["patch_size"]):
            logger.info("patch %s rounded up to %s for %s", plans["patch_size"], fitted, arch)
            plans = dict(plans, patch_size=fitted)
    return plans


def fold_datalists(data_root, fold: int = 0, n_folds: int = 5, seed: int = 0, splits_file=None,
                   plans: dict | None = None) -> tuple[list, list]:
    """``(train, val)`` records of one fold of the task's training cases.

    The folds come from ``splits_file`` when it exists (our JSON or nnU-Net's ``splits_final.json``);
    otherwise seeded k-fold splits are made and saved there, so every later run (resume, evaluate,
    other folds) uses the same cases. Both lists pass the door checks first
    (:func:`medxfer.data.preflight.check_task_records`: the ``check-data`` checks, cached; with
    ``plans`` also the resampled size against the memory; not every training case background).
    """
    task = load_task(data_root)
    train, val = fold_records(task.training, fold, n_folds, seed, splits_file)
    check_task_records(task, train + val, plans=plans, train_records=train)
    return train, val


def inference_datalist(input_path) -> list[dict]:
    """Images to segment: an MSD/nnU-Net task folder (its ``test`` list), a folder of ``.nii(.gz)``
    files, or a single file. Returns ``[{"image": path}]``, checked at the door (readable, plausible
    header, finite: :mod:`medxfer.data.preflight`)."""
    path = Path(input_path)
    if path.is_file():
        records = [{"image": str(path)}]
        check_volume_records(path.parent, records)
        return records
    if (path / "dataset.json").exists():
        task = load_task(path)
        records = [{"image": r["image"]} for r in task.test]
        check_task_records(task, records, train_records=[])
        return records
    if not path.is_dir():
        raise DatasetError(path, "input not found (expected a task folder, a folder of NIfTI files or one file)")
    files = sorted(p for p in path.iterdir() if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith("._"))
    if not files:
        raise DatasetError(path, "no .nii/.nii.gz images in this folder")
    records = [{"image": str(p)} for p in files]
    check_volume_records(path, records)
    return records


def class_names(plans: dict) -> dict[int, str]:
    """``{index: name}`` of the task's labels (background included) from the plans."""
    return {int(k): v for k, v in plans["labels"].items()}


def preprocessing_summary(plans: dict) -> dict:
    """The part of the plans a bank entry records: the task, orientation, spacing, patch, channels
    and each channel's normalisation with its numbers (CT: clip percentiles, mean, std)."""
    return {"task": plans.get("task"), "orientation": "RAS", "target_spacing": plans["target_spacing"],
            "patch_size": plans["patch_size"], "channels": plans.get("channels"),
            "normalization": [n.get("scheme") for n in plans["normalization"]],
            "normalization_numbers": [dict(n) for n in plans["normalization"]]}


def sources_preprocessing(source_roots: Sequence, patch_size: Sequence[int]) -> dict:
    """Preprocessing of a pretraining run's bank entries: ``kind: target_plans`` (a medxfer model is
    fine-tuned and scored on the target's own plans, :mod:`medxfer.transforms.preprocessing`) with
    what it was trained on: one task -> its :func:`preprocessing_summary`; several ->
    ``{"patch_size", "tasks": {task: summary}}`` (each task keeps its own plans)."""
    summaries = [preprocessing_summary(task_plans(r, patch_size=patch_size)) for r in source_roots]
    if len(summaries) == 1:
        return {"kind": "target_plans", **summaries[0]}
    return {"kind": "target_plans", "patch_size": [int(p) for p in patch_size],
            "tasks": {s["task"]: s for s in summaries}}


def ensure_empty_output(output_dir, overwrite: bool = False, pattern: str = "*.nii.gz") -> Path:
    """Refuse to write predictions into a folder that already holds some (unless ``overwrite``)."""
    out = Path(output_dir)
    existing = sorted(out.glob(pattern)) if out.exists() else []
    if existing and not overwrite:
        raise FileExistsError(f"{out}: already holds {len(existing)} prediction(s) such as {existing[0].name}; "
                              "choose another output_dir or set overwrite true")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --- multi-task pretraining ------------------------------------------------------------------

def joint_labels(source_roots: Sequence) -> dict[int, str]:
    """One label space for several source tasks: background 0, then every task's foreground labels
    in order, named ``<TaskName>/<label>`` (pretraining on Liver + Pancreas: 1 liver, 2 cancer,
    3 pancreas, 4 cancer). A single task keeps its own indices and names."""
    tasks = [load_task(r) for r in source_roots]
    if len(tasks) == 1:
        return dict(tasks[0].labels)
    joint = {0: "background"}
    for task in tasks:
        for index in sorted(k for k in task.labels if k != 0):
            joint[len(joint)] = f"{task.root.name}/{task.labels[index]}"
    return joint


def source_datasets(source_roots: Sequence, mode: str, patch_size: Sequence[int], fold: int = 0,
                    n_folds: int = 5, seed: int = 0, splits_dir=None, cache_rate: float = 1.0,
                    num_workers: int = 0, num_samples: int = 2) -> torch.utils.data.ConcatDataset:
    """Training (``mode="train"``) or validation (``"eval"``) cases of several source tasks as one
    dataset, each task preprocessed with its own plans at a shared ``patch_size`` and its labels
    mapped into :func:`joint_labels`. All tasks must have the same number of channels."""
    tasks = [load_task(r) for r in source_roots]
    channels = {t.root.name: t.num_channels for t in tasks}
    if len(set(channels.values())) > 1:
        raise ValueError(f"source tasks must have the same number of input channels, got {channels}")
    datasets, offset = [], 0
    for task in tasks:
        plans = task_plans(task.root, patch_size=patch_size)
        split_file = Path(splits_dir) / f"splits_{task.root.name}.json" if splits_dir else None
        train, val = fold_datalists(task.root, fold, n_folds, seed, split_file, plans=plans)
        chain = msd_transforms(plans, mode=mode, num_samples=num_samples)
        if len(tasks) > 1:
            fg = sorted(k for k in task.labels if k != 0)
            chain = Compose([chain, MapLabelValued("label", orig_labels=fg, target_labels=[offset + i + 1 for i in range(len(fg))])])
            offset += len(fg)
        datasets.append(CacheDataset(train if mode == "train" else val, chain, cache_rate=cache_rate,
                                     num_workers=num_workers, progress=False))
    return torch.utils.data.ConcatDataset(datasets)


# --- fine-tuning from a bank entry -----------------------------------------------------------

def load_bank_network(bank_root, entry: str, in_channels: int, out_channels: int, patch_size: Sequence[int],
                      mode: str = "all_but_head", report_file=None, allow_partial: bool = False) -> torch.nn.Module:
    """Network of model-bank ``entry`` (its arch and arch kwargs) for the target task's channels and
    patch, initialised with a transfer mode (SPEC section 4).

    ``mode="scratch"`` takes only the architecture from the entry. The mode's contract is checked
    (:func:`medxfer.transfer.weights.init_from_checkpoint`): a shortfall, e.g. a 2-channel entry
    on a 1-channel task, is a one-line error listing the first mismatched keys unless
    ``allow_partial`` (the bundle's ``allow_partial`` id; then logged at WARNING); weights of which
    nothing fits (``bank.yaml``'s arch / arch_kwargs are not those of the weights) are always a
    :class:`~medxfer.transfer.bank.BankError`. The one-line report is logged and, with
    ``report_file``, every key saved as JSON. (A UNETR entry fine-tuned at another patch gets its
    position embeddings resampled first, so they load in full.)
    """
    parse_mode(mode)
    bank = ModelBank.open(bank_root)
    bank_entry = bank.get(entry)
    network = build_network(bank_entry.arch, in_channels, out_channels, patch_size, **bank_entry.arch_kwargs)
    state = {} if mode == "scratch" else bank.load_state_dict(entry)
    resized = False
    if bank_entry.arch == "unetr" and state:  # another patch = another ViT token grid: resample the embeddings
        vit_patch = int(network.patch_size[0]) if hasattr(network, "patch_size") else 16
        state, resized = resize_position_embeddings(state, [p // vit_patch for p in bank_entry.patch_size],
                                                    [p // vit_patch for p in patch_size])
    try:
        report = init_from_checkpoint(network, state, mode, entry_layout(bank_entry, network),
                                      source=str(bank.checkpoint_path(entry)),
                                      allow_partial=allow_partial)
    except NoMatchingWeights as e:
        raise BankError(e.path, f"bank.yaml says entry {entry!r} is arch {bank_entry.arch!r} with arch_kwargs "
                                f"{bank_entry.arch_kwargs}; the weights look like a different network ({e.reason})") from None
    report.position_embeddings_resized = resized
    recipe = nnunet_finetune_command(bank_entry, bank.root)
    if recipe and mode != "scratch":  # the same start, with nnU-Net's own trainer and preprocessing
        logger.info("%s", recipe)
    if report_file:
        atomic_write_text(report_file, json.dumps({"entry": entry, **report.to_dict()}, indent=2) + "\n")
    return network


def finetune_plans(bank_root, entry: str | None, plans: dict) -> dict:
    """The plans a fine-tuning run from bank ``entry`` uses: the target's ``plans`` for a medxfer
    entry (the CC-FV protocol: re-planned on the target); for an entry that expects its own
    preprocessing (a zoo bundle's transforms, nnU-Net's preprocessing; issue 14) the target's plans
    carrying that ``preprocessing`` (its files as absolute paths, so the run folder's plans.json
    works from anywhere) and the entry's patch, so training, validation, evaluation and inference
    prepare the target the way the model was trained
    (:func:`medxfer.transforms.preprocessing.plans_transforms`)."""
    if not entry:
        return plans
    bank = ModelBank.open(bank_root)
    bank_entry = bank.get(entry)
    if preprocessing_kind(bank_entry.preprocessing) == "target_plans":
        return plans
    pre = dict(bank_entry.preprocessing)
    for key in ("plans", "dataset_json"):  # nnunet: files copied into the bank
        if key in pre:
            pre[key] = str((bank.root / pre[key]).resolve())
    return {**plans, "preprocessing": pre, "patch_size": [int(p) for p in bank_entry.patch_size],
            "preprocessing_of": entry}


def bank_entry_name(arch: str, source_roots: Sequence) -> str:
    """``<arch>_<Task>[+<Task>...]``, the bank entry prefix of a pretraining run."""
    return f"{arch}_" + "+".join(Path(str(r)).resolve().name for r in source_roots)


def save_run_plans(plans: dict, output_dir) -> Path:
    """Copy the plans a run uses to ``<output_dir>/plans.json`` (inference needs them next to the
    weights). A run folder holding other plans is refused: it belongs to another experiment."""

    out = Path(output_dir) / "plans.json"
    text = json.dumps(plans, indent=2) + "\n"
    if out.exists() and json.loads(out.read_text()) != json.loads(text):
        raise FileExistsError(f"{out}: this output_dir holds a run with different plans; choose another output_dir")
    atomic_write_text(out, text)  # a kill or a full disk never leaves half a plans file
    return out


# --- the run record (run.json) ---------------------------------------------------------------

#: File of a training run folder that describes it (beside plans.json, model.pt, splits.json).
RUN_FILE = "run.json"

#: Record fields that define the trained network: a run folder holding another value is refused.
NETWORK_FIELDS = ("arch", "arch_kwargs", "in_channels", "out_channels", "patch_size", "labels", "transfer")

#: Settings whose paths are recorded absolute (a run is evaluated from another working folder).
_PATH_SETTINGS = ("data_root", "source_roots", "bank_root", "init_checkpoint", "plans_file")


def _plain(obj):
    """JSON form of ``obj`` (tuples -> lists, numpy scalars -> numbers), for comparisons with a file."""
    return json.loads(json.dumps(json_safe(obj)))


def _absolute(value):
    if isinstance(value, (list, tuple)):
        return [_absolute(v) for v in value]
    return str(Path(str(value)).resolve()) if isinstance(value, (str, Path)) and value else value


def read_run_record(run_dir) -> dict | None:
    """``<run_dir>/run.json`` (``None`` when the folder has none: a run of an older version, or a
    model folder assembled by hand); :class:`DatasetError` naming the file when it is unreadable."""
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    return read_json(path)


def _transfer_record(transfer) -> dict | None:
    """The transfer source as recorded: bank root (absolute), entry, mode, plus the entry's arch,
    epoch and sha256 from the bank manifest; or an init checkpoint (absolute path)."""
    if not transfer:
        return None
    record = {k: v for k, v in dict(transfer).items() if v is not None}
    for key in ("bank_root", "init_checkpoint"):
        if key in record:
            record[key] = _absolute(record[key])
    if record.get("bank_root") and record.get("bank_entry"):
        entry = ModelBank.open(record["bank_root"]).get(record["bank_entry"])
        record.update(entry_arch=entry.arch, entry_arch_kwargs=_plain(entry.arch_kwargs), entry_epoch=entry.epoch,
                      entry_source=list(entry.source), entry_sha256=entry.sha256)
    return _plain(record)


def _check_rebuilds(record: dict, network: torch.nn.Module, path: Path) -> None:
    """ValueError when ``record``'s arch / kwargs / channels / patch would not rebuild ``network``
    (same tensor names and shapes): the record must describe the network that is trained. Built
    on the meta device (no memory, no random draws); networks that cannot be built there are not
    checked."""
    trained = {k: tuple(v.shape) for k, v in getattr(network, "module", network).state_dict().items()}
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            rebuilt = build_network(record["arch"], record["in_channels"], record["out_channels"],
                                    record["patch_size"], **record["arch_kwargs"])
    except Exception as e:  # noqa: BLE001 - e.g. SwinUNETR calls .item() while building: not checkable on meta
        logger.debug("run record not checked against the network (%s: %s)", type(e).__name__, e)
        return
    rebuilt = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if rebuilt != trained:
        diff = sorted(set(rebuilt) ^ set(trained)) or sorted(k for k in trained if rebuilt[k] != trained[k])
        raise ValueError(f"{path}: arch {record['arch']!r} with arch_kwargs {record['arch_kwargs']} does not rebuild "
                         f"the network this run trains (first differing tensors: {diff[:3]}); the arch / arch_kwargs "
                         "passed contradict the network (a bank entry's architecture is the entry's)")


def save_run_record(output_dir, arch: str, arch_kwargs: dict | None, in_channels: int, out_channels: int,
                    roi_size: Sequence[int], plans: dict, class_names: dict, transfer: dict | None = None,
                    settings: dict | None = None, network: torch.nn.Module | None = None,
                    workflow: str = "msd_seg3d/train") -> Path:
    """Write ``<output_dir>/run.json``, which makes the run folder self-describing.

    It holds what evaluate / inference / export need to rebuild the network without repeating
    any option: ``arch``, ``arch_kwargs``, ``in_channels``, ``out_channels``, ``patch_size``, the
    plans (``plans.json`` beside it, with task and spacing repeated here), ``labels``, the
    ``transfer`` source (bank root + entry + mode with the entry's arch and sha256, or an init
    checkpoint; ``null`` from scratch) and the ``settings`` that define the run (data root, fold,
    seed, epochs, ...). With ``network`` the record is checked to rebuild it (tensor names and
    shapes). A folder holding a run of another network is refused (FileExistsError, one line);
    the same run (a resume, a longer ``max_epochs``) updates its settings. Written atomically.
    """
    path = Path(output_dir) / RUN_FILE
    record = {"workflow": workflow, "arch": arch, "arch_kwargs": _plain(dict(arch_kwargs or {})),
              "in_channels": int(in_channels), "out_channels": int(out_channels),
              "patch_size": [int(p) for p in roi_size], "labels": {str(k): v for k, v in dict(class_names).items()},
              "transfer": _transfer_record(transfer), "plans_file": "plans.json", "task": plans.get("task"),
              "target_spacing": _plain(plans.get("target_spacing")),
              "settings": _plain({k: _absolute(v) if k in _PATH_SETTINGS else v for k, v in dict(settings or {}).items()}),
              "model": "model.pt: best validation checkpoint (network state dict; model.json says which epoch, or "
                       "that it holds the final weights when no validation ran)"}
    if network is not None:
        _check_rebuilds(record, network, path)
    existing = read_run_record(output_dir)
    if existing is not None:
        changed = [k for k in NETWORK_FIELDS if existing.get(k) != record[k]]
        if changed:
            k = changed[0]
            raise FileExistsError(f"{path}: this output_dir holds a run with {k} {existing.get(k)!r}, not {record[k]!r}; "
                                  "choose another output_dir")
    write_json(path, record)
    return path


def run_setting(run_dir, key: str, default=None):
    """``key`` of ``<run_dir>/run.json`` (a network field or one of its ``settings``), or
    ``default`` when the folder has no run.json. The configs use it as the default of ``arch``,
    ``arch_kwargs``, ``fold``, ... so that a trained run is evaluated with what it was trained with."""
    record = read_run_record(run_dir)
    if record is None:
        return default
    if key in record:
        return record[key]
    return record.get("settings", {}).get(key, default)


def check_run_overrides(run_dir, yield_to_record: dict | None = None, **values) -> dict:
    """The network settings to use with a trained run: ``values`` (``arch``, ``arch_kwargs``,
    ``patch_size``, ``fold``, ...) checked against ``<run_dir>/run.json``.

    ``None`` means "not given" and takes the recorded value. A value that differs from the record
    is refused with a one-line ValueError naming run.json — unless it equals ``yield_to_record[key]``,
    the config's own default (``inference.yaml``'s ``arch: unet`` is the fallback for a model folder
    without run.json, not a choice). Without run.json the values are returned as given.
    Returns ``{key: value to use}``.
    """
    record = read_run_record(run_dir)
    if record is None:
        return dict(values)
    path = Path(run_dir) / RUN_FILE
    resolved = {}
    for key, value in values.items():
        recorded = record[key] if key in record else record.get("settings", {}).get(key)
        given = _plain(value)
        if given is None or given == _plain(recorded) or (yield_to_record and key in yield_to_record
                                                          and given == _plain(yield_to_record[key])):
            resolved[key] = recorded
        else:
            raise ValueError(f"{path}: the run was trained with {key}={recorded!r}, but {key}={given!r} was passed; "
                             "drop the override (run.json describes the trained network)")
    return resolved


def bank_entry_network(bank_root, entry: str) -> dict:
    """``{"arch", "arch_kwargs"}`` of model-bank ``entry``: a fine-tuning run trains (and records)
    the entry's architecture, so that the patch is fitted to it and run.json describes it."""
    bank_entry = ModelBank.open(bank_root).get(entry)
    return {"arch": bank_entry.arch, "arch_kwargs": dict(bank_entry.arch_kwargs)}
