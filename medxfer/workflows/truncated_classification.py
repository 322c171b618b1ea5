"""Helpers of ``bundles/seg2d_transfer/configs/truncated_classifier.yaml`` (and its paper preset
``truncated_paper.yaml``): image classification with a truncated pretrained encoder (SPEC section 8;
:mod:`medxfer.networks.truncated`), trained and scored with the truncated-transfer protocol (Peng et
al. 2021) and reported as AUROC and AUPRC (:mod:`medxfer.metrics.classification`).

The protocol (paper section 3; values the paper does not give are taken from the authors' code,
PL97/TTL, and marked "code"):

* Adam, lr 1e-5, batches of 64, 200 epochs, 224x224 inputs, the network's every layer trained.
* After every epoch the validation AUPRC (macro mean over classes) is computed; when it has not
  improved for ``plateau_patience`` epochs (code: 5) the learning rate is halved
  (``torch.optim.lr_scheduler.ReduceLROnPlateau(mode="max", factor=0.5)`` stepped by MONAI's
  ``LrScheduleHandler``), and the network with the best validation AUPRC is kept (MONAI
  ``CheckpointSaver(save_key_metric=True)``, ``best.pt``).
* That best-validation network is scored once on a separate test set (``test_root``, or a
  ``test_fraction`` held out of ``data_root``), never seen by training or model selection.
* The whole run is repeated ``repeats`` times (paper: 3) with seeds ``seed, seed + 1, ...``; the
  report gives each repeat and the mean and standard deviation (``numpy.std``, ddof 0) of every
  score.

Tasks: ``multiclass`` (one label per image; cross-entropy; softmax scores, one-vs-rest AUROC /
AUPRC per class) reads a class-per-folder ``data_root``; ``multilabel`` (CheXpert-style: several
findings per image; ``torch.nn.BCEWithLogitsLoss``; sigmoid scores, AUROC / AUPRC per finding)
reads a CSV (:func:`multilabel_datalists`: CheXpert's ``Path`` column + one column per finding,
1 / 0 / -1 uncertain / blank; uncertain labels become 1, "U-Ones", blanks 0, as the authors' code).
``class_weights: inverse_frequency`` weighs class c by ``n_max / n_c`` (positives per class in the
training split), as the code's CheXpert / HAM10000 weights: ``CrossEntropyLoss(weight=...)`` or
``BCEWithLogitsLoss(pos_weight=...)``.

Remaining deviations, on purpose or for lack of information:

* The splits are stratified by class (``monai.data.partition_dataset_classes``; multi-label:
  random, ``partition_dataset``) and the same in every repeat; the paper's COVID-19 split is by
  date and the code reads a fixed CSV split per repeat.
* The code steps the scheduler and picks the best model on the validation *loss* and stops once
  the lr falls below 1e-6; the paper says validation AUPRC and 200 epochs, which is the default
  here (``plateau_metric: auroc`` and ``stop_below_lr: 1.0e-6`` come closer to the code's early stop).
* Augmentation is the bundle's (``medxfer.transforms.seg2d.classification_transforms``: flips,
  rotation up to 15 degrees, scaling), not the paper's "slight random rotation" (the code:
  random resized crop + horizontal flip); evaluation resizes the whole image (the code: resize 256,
  centre crop 224).
* AUPRC defaults to the code's trapezoidal area (``auprc_method: trapezoid``); the step-wise
  average precision is ``auprc_method: average_precision``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader, Dataset, partition_dataset, partition_dataset_classes
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (CheckpointSaver, IgniteMetricHandler, LrScheduleHandler, StatsHandler, ValidationHandler,
                            from_engine)
from monai.transforms import Activationsd, Compose, EnsureTyped
from monai.utils import set_determinism

from medxfer.data.image_folder import load_image_folder
from medxfer.data.preflight import check_image_records
from medxfer.jsonfile import write_json
from medxfer.metrics.classification import AUPRC_METHODS, RankingMetric, classification_report
from medxfer.networks.truncated import HEADS, TruncatedClassifier
from medxfer.transfer.bank import ModelBank
from medxfer.transfer.weights import truncated_encoder_weights
from medxfer.transforms.seg2d import classification_transforms

__all__ = ["TASKS", "CHEXPERT_FINDINGS", "truncated_classifier", "folder_datalists", "multilabel_datalists",
           "datalists", "truncated_transforms", "class_weights", "classification_loss", "evaluate_classifier",
           "run_protocol"]

#: ``multiclass`` (softmax / cross-entropy) or ``multilabel`` (sigmoid / binary cross-entropy per output).
TASKS = ("multiclass", "multilabel")
#: CheXpert's 14 observation columns, in the order of its CSV files.
CHEXPERT_FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                     "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                     "Pleural Other", "Fracture", "Support Devices")
_UNCERTAIN = {"ones": 1.0, "zeros": 0.0}


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return task


def truncated_classifier(arch: str, level, num_classes: int, bank_root=None, init_entry: str | None = None,
                         weights_file=None, in_channels: int = 3, dropout: float = 0.0, output_dir=None,
                         head: str = "flatten", image_size=224) -> TruncatedClassifier:
    """A :class:`~medxfer.networks.truncated.TruncatedClassifier` (``level``: 1..4 or a paper cut
    such as ``"Res-T1"``; ``head``: ``flatten`` for ``image_size`` inputs, or ``gap``) with
    pretrained encoder weights from a bank entry (e.g. a ``resnet50_attention_unet`` encoder
    pretrained by ``pretrain_encoder``: its ``encoder.*`` keys are MONAI ResNet50 keys), a file
    (torchvision / MONAI keys), or neither (random initialisation). Weights go through the one
    weight path (:func:`~medxfer.transfer.weights.truncated_encoder_weights`, mode ``encoder_only``:
    every kept layer is fine-tuned; what the cut dropped is skipped and reported); the report goes
    to ``output_dir/transfer_report.json``."""
    if init_entry is not None and weights_file is not None:
        raise ValueError("give init_entry (with bank_root) or weights_file, not both")
    network = TruncatedClassifier(arch, level, num_classes, in_channels, dropout, head=head, image_size=image_size)
    weights = weights_file
    if init_entry is not None:
        if bank_root is None:
            raise ValueError("init_entry needs bank_root")
        weights = ModelBank.open(bank_root).load_state_dict(init_entry)
    if weights is not None:
        report = truncated_encoder_weights(network, weights)
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(output_dir) / "transfer_report.json", report.to_dict())
    return network


# --- data ----------------------------------------------------------------------------------------

def _fractions(val_fraction: float, test_fraction: float) -> list[float]:
    v, t = float(val_fraction), float(test_fraction)
    if not (0 < v < 1 and 0 <= t < 1 and v + t < 1):
        raise ValueError(f"val_fraction ({v}) must be in (0, 1), test_fraction ({t}) in [0, 1), and their sum < 1")
    return [1 - v - t, v, t]


def folder_datalists(data_root, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                     test_root=None) -> dict:
    """``{"train", "val", "test", "classes"}`` of a class-per-folder dataset, split per class
    (``monai.data.partition_dataset_classes``, seeded). ``test_root``: a separate class-per-folder
    test set with the same classes (then ``test_fraction`` must be 0 or is ignored: nothing of
    ``data_root`` is held out for testing)."""
    records, classes = load_image_folder(data_root)
    if test_root is not None:
        test, test_classes = load_image_folder(test_root)
        if test_classes != classes:
            raise ValueError(f"{test_root}: test classes {test_classes} differ from {data_root}'s {classes}")
        test_fraction = 0.0
    ratios = _fractions(val_fraction, test_fraction)
    parts = partition_dataset_classes(records, [r["label"] for r in records], ratios=ratios, shuffle=True, seed=seed)
    train, val = parts[0], parts[1]
    test = test if test_root is not None else parts[2]
    if not test:
        raise ValueError(f"{data_root}: no test images (give test_fraction > 0 or a test_root)")
    check_image_records(data_root, train + val + (test if test_root is None else []))
    if test_root is not None:
        check_image_records(test_root, test)
    return {"train": train, "val": val, "test": test, "classes": classes}


def _label(value: str, uncertain: float, where: str) -> float:
    value = value.strip()
    if value == "":
        return 0.0                      # not mentioned -> negative (authors' code: fillna(0))
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not 1 / 0 / -1 / blank") from None
    if v == -1:
        return uncertain
    if v not in (0.0, 1.0):
        raise ValueError(f"{where}: label {value!r} is not 1 / 0 / -1 / blank")
    return v


def multilabel_datalists(csv_file, image_root=None, classes: Sequence[str] | None = None, uncertain: str = "ones",
                         val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
                         path_column: str = "Path") -> dict:
    """``{"train", "val", "test", "classes"}`` of a CheXpert-style multi-label CSV.

    Each row: ``path_column`` (relative to ``image_root``, default the CSV's folder) and one
    column per finding with 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned,
    = 0). ``classes``: the finding columns to use (default: CheXpert's 14 when all are present,
    else every column after the first); ``uncertain``: ``ones`` (U-Ones, the authors' code) or
    ``zeros``. Records ``{"id", "image", "label": [0/1 per class]}``; a seeded random split
    (``monai.data.partition_dataset``).
    """
    csv_file = Path(csv_file)
    if uncertain not in _UNCERTAIN:
        raise ValueError(f"uncertain must be one of {list(_UNCERTAIN)}, got {uncertain!r}")
    if not csv_file.is_file():
        raise FileNotFoundError(f"{csv_file}: no such label file")
    with open(csv_file, newline="") as f:
        rows = list(csv.DictReader(f))
        header = list(rows[0]) if rows else []
    if not rows:
        raise ValueError(f"{csv_file}: no rows")
    if path_column not in header:
        raise ValueError(f"{csv_file}: no {path_column!r} column (columns: {header})")
    if classes is None:
        classes = list(CHEXPERT_FINDINGS) if set(CHEXPERT_FINDINGS) <= set(header) else \
            [c for c in header if c != path_column]
    missing = [c for c in classes if c not in header]
    if missing:
        raise ValueError(f"{csv_file}: no columns {missing} (columns: {header})")
    root = Path(image_root) if image_root is not None else csv_file.parent
    u = _UNCERTAIN[uncertain]
    records = [{"id": row[path_column], "image": str(root / row[path_column]),
                "label": [_label(row[c], u, f"{csv_file} line {i + 2} column {c!r}") for c in classes]}
               for i, row in enumerate(rows)]
    parts = partition_dataset(records, ratios=_fractions(val_fraction, test_fraction), shuffle=True, seed=seed)
    if not parts[2]:
        raise ValueError(f"{csv_file}: no test images (give test_fraction > 0)")
    check_image_records(root, records)
    return {"train": parts[0], "val": parts[1], "test": parts[2], "classes": list(classes)}


def datalists(task: str, data_root=None, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
              test_root=None, csv_file=None, image_root=None, classes=None, uncertain: str = "ones") -> dict:
    """:func:`folder_datalists` (``multiclass``, ``data_root``) or :func:`multilabel_datalists`
    (``multilabel``, ``csv_file``)."""
    if _check_task(task) == "multiclass":
        if data_root is None:
            raise ValueError("task multiclass needs data_root (a class-per-folder dataset)")
        return folder_datalists(data_root, val_fraction, test_fraction, seed, test_root)
    if csv_file is None:
        raise ValueError("task multilabel needs csv_file (CheXpert-style labels)")
    return multilabel_datalists(csv_file, image_root, classes, uncertain, val_fraction, test_fraction, seed)


def truncated_transforms(mode: str, image_size, task: str = "multiclass") -> Compose:
    """The bundle's classification chain; a multi-label ``label`` becomes a float32 vector."""
    chain = classification_transforms(mode, image_size)
    if _check_task(task) == "multilabel" and mode != "infer":
        return Compose([chain, EnsureTyped("label", dtype=torch.float32, track_meta=False)])
    return chain


# --- loss ----------------------------------------------------------------------------------------

def class_weights(records: Sequence[dict], num_classes: int, task: str, kind: str | None = "inverse_frequency"):
    """``None`` (``kind`` None) or, for ``inverse_frequency``, ``n_max / n_c`` per class (``n_c``:
    images of class c, multi-label: positives of finding c, in ``records``) as a float32 tensor.
    A class without images is an error (its weight would be infinite)."""
    if kind is None:
        return None
    if kind != "inverse_frequency":
        raise ValueError(f"class_weights must be null or 'inverse_frequency', got {kind!r}")
    if _check_task(task) == "multiclass":
        counts = np.bincount([int(r["label"]) for r in records], minlength=num_classes).astype(np.float64)
    else:
        counts = np.asarray([r["label"] for r in records], dtype=np.float64).reshape(-1, num_classes).sum(0)
    if (counts == 0).any():
        raise ValueError(f"class_weights: classes {np.nonzero(counts == 0)[0].tolist()} have no training images")
    return torch.as_tensor(counts.max() / counts, dtype=torch.float32)


def classification_loss(task: str, weights: torch.Tensor | None = None) -> torch.nn.Module:
    """``CrossEntropyLoss(weight=weights)`` (multiclass, integer labels) or
    ``BCEWithLogitsLoss(pos_weight=weights)`` (multilabel, 0/1 float labels per output)."""
    if _check_task(task) == "multiclass":
        return torch.nn.CrossEntropyLoss(weight=weights)
    return torch.nn.BCEWithLogitsLoss(pos_weight=weights)


# --- evaluation ----------------------------------------------------------------------------------

def _activation(task: str) -> Activationsd:
    return Activationsd("pred", softmax=task == "multiclass", sigmoid=task == "multilabel")


@torch.no_grad()
def evaluate_classifier(network: torch.nn.Module, records: Sequence[dict], class_names: Sequence[str], image_size,
                        output_dir, device="cpu", task: str = "multiclass", auprc_method: str = "average_precision",
                        batch_size: int = 16, num_workers: int = 0) -> dict:
    """Scores of every record's image (softmax for ``multiclass``, sigmoid per finding for
    ``multilabel``) -> AUROC and AUPRC per class and macro mean
    (:func:`medxfer.metrics.classification.classification_report`), and the accuracy (multiclass:
    arg-max; multi-label: mean over findings of score > 0.5, the code's logit > 0); written to
    ``output_dir/classification_metrics.json`` with the per-image scores."""
    if not records:
        raise ValueError("no records to evaluate")
    task = _check_task(task)
    loader = DataLoader(Dataset(list(records), truncated_transforms("eval", image_size, task)), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers)
    network = network.to(device).eval()
    scores = []
    for batch in loader:
        logits = network(batch["image"].to(device)).float()
        scores.append((torch.softmax(logits, 1) if task == "multiclass" else torch.sigmoid(logits)).cpu().numpy())
    scores = np.concatenate(scores)
    if task == "multiclass":
        labels = np.asarray([int(r["label"]) for r in records])
        truth = np.eye(len(class_names), dtype=np.int64)[labels]
        accuracy = float((scores.argmax(1) == labels).mean())
    else:
        truth = np.asarray([r["label"] for r in records], dtype=np.int64)
        labels = truth
        accuracy = float(((scores > 0.5) == truth).mean())
    report = classification_report(truth, scores, class_names, auprc_method=auprc_method)
    report["accuracy"] = accuracy
    report["task"] = task
    report["images"] = [{"id": r["id"], "label": lab.tolist() if task == "multilabel" else int(lab),
                         "scores": s.tolist()} for r, lab, s in zip(records, labels, scores)]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(output_dir) / "classification_metrics.json", report)
    return report


# --- the protocol --------------------------------------------------------------------------------

def _optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    defined = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not defined:
        return float("nan"), float("nan")
    return float(np.mean(defined)), float(np.std(defined))


def _summary(reports: list[dict], class_names: Sequence[str]) -> dict:
    out = {}
    for key in ("auroc", "auprc", "accuracy"):
        out[key], out[key + "_std"] = _mean_std([r[key] for r in reports])
    out["per_class"] = {}
    for name in class_names:
        entry = {}
        for key in ("auroc", "auprc"):
            entry[key], entry[key + "_std"] = _mean_std([r["per_class"][str(name)][key] for r in reports])
        out["per_class"][str(name)] = entry
    return out


def run_protocol(arch: str, level, datalists: dict, output_dir, task: str = "multiclass", image_size=224,
                 head: str = "flatten", dropout: float = 0.0, repeats: int = 3, seed: int = 0, max_epochs: int = 200,
                 batch_size: int = 64, learning_rate: float = 1e-5, optimizer: str = "adam",
                 weight_decay: float = 0.0, plateau_metric: str = "auprc", plateau_factor: float = 0.5,
                 plateau_patience: int = 5, stop_below_lr: float | None = None,
                 auprc_method: str = "trapezoid", weights: str | None = None, bank_root=None,
                 init_entry: str | None = None, weights_file=None, device="cpu", amp: bool = False,
                 num_workers: int = 0, cache_rate: float = 1.0) -> dict:
    """Train and test ``repeats`` truncated classifiers with the paper's protocol (module docstring).

    Per repeat ``r`` (seed ``seed + r``, ``output_dir/repeat_<r>/``): a fresh network
    (:func:`truncated_classifier`, the same pretrained weights), a MONAI ``SupervisedTrainer`` with a
    ``ValidationHandler`` running a ``SupervisedEvaluator`` after every epoch whose key metric is the
    validation ``plateau_metric`` (``auprc`` / ``auroc``, macro,
    :class:`~medxfer.metrics.classification.RankingMetric`); the evaluator steps
    ``ReduceLROnPlateau(mode="max", factor=plateau_factor, patience=plateau_patience)`` and saves
    the best network (``best.pt``); the final one is ``model.pt``. The best network is then scored
    on ``datalists["test"]`` (:func:`evaluate_classifier`).

    Returns (and writes to ``output_dir/classification_metrics.json``): the mean / std over
    repeats of ``auroc``, ``auprc``, ``accuracy`` and per class, ``repeats`` (per repeat: seed,
    best epoch, best validation score, test scores, folder, ``history``: per epoch the validation
    score and the lr after the schedule's step), the settings; with one repeat, also
    that repeat's whole report (per-image ``images`` included).
    """
    task = _check_task(task)
    if plateau_metric not in ("auprc", "auroc"):
        raise ValueError(f"plateau_metric must be 'auprc' or 'auroc', got {plateau_metric!r}")
    if auprc_method not in AUPRC_METHODS:
        raise ValueError(f"auprc_method must be one of {list(AUPRC_METHODS)}, got {auprc_method!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {list(HEADS)}, got {head!r}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for split in ("train", "val", "test"):
        if not datalists.get(split):
            raise ValueError(f"the {split} split is empty")
    output_dir = Path(output_dir)
    class_names = [str(c) for c in datalists["classes"]]
    num_classes = len(class_names)
    device = torch.device(device)
    train_ds = CacheDataset(datalists["train"], truncated_transforms("train", image_size, task), cache_rate=cache_rate,
                            num_workers=num_workers or None)
    val_ds = CacheDataset(datalists["val"], truncated_transforms("eval", image_size, task), cache_rate=cache_rate,
                          num_workers=num_workers or None)
    loss_weights = class_weights(datalists["train"], num_classes, task, weights)
    metric_name = f"val_{plateau_metric}"
    reports, runs = [], []
    for r in range(int(repeats)):
        run_dir = output_dir / f"repeat_{r}"
        run_dir.mkdir(parents=True, exist_ok=True)
        set_determinism(seed=seed + r)
        network = truncated_classifier(arch, level, num_classes, bank_root, init_entry, weights_file, dropout=dropout,
                                       output_dir=run_dir, head=head, image_size=image_size).to(device)
        opt = _optimizer(optimizer, network.parameters(), learning_rate, weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=plateau_factor,
                                                               patience=plateau_patience)
        train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                  drop_last=len(train_ds) > batch_size)
        val_loader = DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        best, history = {"epoch": 0, "score": float("-inf")}, []
        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=val_loader, network=network, postprocessing=_activation(task),
            key_val_metric={metric_name: IgniteMetricHandler(RankingMetric(plateau_metric, auprc_method),
                                                             output_transform=from_engine(["pred", "label"]))},
            val_handlers=[
                LrScheduleHandler(scheduler, print_lr=False, epoch_level=True,
                                  step_transform=lambda engine: engine.state.metrics[metric_name]),
                CheckpointSaver(str(run_dir), {"network": network}, save_key_metric=True, key_metric_filename="best.pt"),
            ], amp=amp)
        trainer = SupervisedTrainer(
            device=device, max_epochs=max_epochs, train_data_loader=train_loader, network=network, optimizer=opt,
            loss_function=classification_loss(task, None if loss_weights is None else loss_weights.to(device)),
            train_handlers=[ValidationHandler(interval=1, validator=evaluator, epoch_level=True),
                            StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True))],
            amp=amp)

        @evaluator.on(Events.EPOCH_COMPLETED)
        def _track(engine, best=best, trainer=trainer, history=history, opt=opt):
            score = engine.state.metrics[metric_name]  # runs after the lr schedule stepped on it
            history.append({"epoch": trainer.state.epoch, metric_name: float(score), "lr": opt.param_groups[0]["lr"]})
            if score > best["score"]:
                best.update(epoch=trainer.state.epoch, score=float(score))

        if stop_below_lr is not None:
            @trainer.on(Events.EPOCH_COMPLETED)
            def _stop(engine, opt=opt):
                if opt.param_groups[0]["lr"] < stop_below_lr:
                    engine.terminate()

        trainer.run()
        torch.save(network.state_dict(), run_dir / "model.pt")
        best_file = run_dir / "best.pt"
        if best_file.is_file():  # else no validation score was defined (NaN): the final network is tested
            network.load_state_dict(torch.load(best_file, map_location=device, weights_only=True))
        report = evaluate_classifier(network, datalists["test"], class_names, image_size, run_dir, device, task,
                                     auprc_method, batch_size=batch_size, num_workers=num_workers)
        reports.append(report)
        runs.append({"repeat": r, "seed": seed + r, "best_epoch": best["epoch"], metric_name: best["score"],
                     "tested": "best.pt" if best_file.is_file() else "model.pt", "auroc": report["auroc"],
                     "auprc": report["auprc"], "accuracy": report["accuracy"], "dir": str(run_dir),
                     "history": history})
    summary = {**(reports[0] if len(reports) == 1 else {}), **_summary(reports, class_names)}
    if len(reports) == 1:  # one repeat: its own per-class numbers (with prevalence, n_positive) stay
        summary["per_class"] = {k: {**reports[0]["per_class"][k], **v} for k, v in summary["per_class"].items()}
    summary.update(repeats=runs, task=task, auprc_method=auprc_method, n_test=len(datalists["test"]),
                   settings={"arch": arch, "level": level, "head": head, "image_size": image_size,
                             "max_epochs": max_epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                             "optimizer": optimizer, "plateau_metric": plateau_metric,
                             "plateau_factor": plateau_factor, "plateau_patience": plateau_patience,
                             "stop_below_lr": stop_below_lr, "class_weights": weights, "seed": seed})
    write_json(output_dir / "classification_metrics.json", summary)
    return summary
