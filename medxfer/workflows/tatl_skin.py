"""Helpers the ``bundles/tatl_skin`` configs call: datalists, networks per stage, the cross-validation run.

TATL (Nguyen et al., sections 4-5; SPEC section 6) trains seven kinds of networks per fold:

====================  ============================  ======================  =====================
network               target                        input                   initialisation
====================  ============================  ======================  =====================
Segment-Net (stage 1)  Task 1 lesion mask           whole image             ImageNet encoder
agnostic (stage 2)    union of the attribute masks  Segment-Net crop        ImageNet encoder
target (stage 3)      one attribute                 Segment-Net crop        stage 2 (freeze / NF)
====================  ============================  ======================  =====================

each of stages 2-3 in U-shape (``unet_effb0``) and Link-shape (``linknet_effb0``); the prediction
averages the two shapes' probabilities. The decoder stages follow section 4.1 (``decoder_block:
paper``: x2 up-sampling + two 3x3 convs, skip added / concatenated) or medxfer's earlier blocks
(``linknet``; :func:`medxfer.transfer.tatl.tatl_arch_kwargs`). At inference the union map is the
stage-2 segmenters' averaged prediction (``union: stage2``, the paper's Fig. 9) or the OR of the
attribute masks (``or_stage3``; :mod:`medxfer.transfer.tatl_inference`). One network is trained by ``configs/train.yaml`` (MONAI
``SupervisedTrainer`` + early stopping on a tuning split); :func:`run_cross_validation` runs that
config for every network of every fold in stage order and scores the held-out fold.

Leaving stages out gives the paper's Table 3 ablations: without stage 1 the networks see whole
images, without stage 2 the target segmenters start from the ImageNet encoder (or random weights).

Data per fold: the k-fold split of all images (``splits.json``, nnU-Net format) gives the test fold;
a seeded ``tune_fraction`` of the remaining images is held out for early stopping and checkpoint
choice (the test fold never influences training). The Segment-Net of a fold is trained on the
fold's training images only, and its boxes (``boxes.json``) crop every image of the fold.

Run layout (``output_dir``)::

    tatl_run.json                 settings of the run (a rerun with other settings is refused)
    splits.json                   the folds
    fold_<k>/segment_net/model.pt, boxes.json (+ boxes_done.json)
    fold_<k>/agnostic_<arch>/model.pt
    fold_<k>/target_<attribute>_<arch>/model.pt   (+ transfer_report.json, metrics, done.json)
    fold_<k>/scores.json          per attribute TP / FP / FN, Jaccard, Dice on the test fold (+ scores_done.json)
    cv_scores.json / .csv / .png  mean and std over folds (ISIC 2018 Task 2 rule)

A killed run resumes (:func:`run_cross_validation`): the ``done.json`` / ``*_done.json`` markers
are written atomically after what they mark and record what it was made from (settings and the
sha256 of the input files), so finished units are kept and half-finished ones redone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medxfer.atomic import atomic_path, atomic_write_text
from medxfer.data.image_folder import image_files
from medxfer.data.isic import ISIC_LAYOUTS, check_mask_sizes, detect_isic_year, load_isic
from medxfer.data.preflight import check_image_files, check_isic_records
from medxfer.data.problems import DatasetError, raise_if_problems, read_json
from medxfer.data.splits import fold_records, holdout_split
from medxfer.device import resolve_device
from medxfer.jsonfile import write_json
from medxfer.metrics.isic_task2 import FoldScorer, summarize_folds
from medxfer.transfer.tatl import DECODER_BLOCKS, TATL_ARCHS, TATL_MODES, load_trained, segment_net_boxes
from medxfer.transfer.tatl_inference import UNION_MODES, TatlPredictor, write_prediction
from medxfer.transforms.dermoscopy import (IMAGENET_MEAN, IMAGENET_STD, TRAIN_SIZE, dermoscopy_transforms,
                                           resize_for_scoring, scoring_transforms)
from medxfer.transforms.lesion_crop import load_boxes, save_boxes
from medxfer.workflows.bundle import run_bundle

__all__ = ["STAGES", "TatlSettings", "isic_year", "target_masks", "fold_predictor", "tatl_datalists", "stage_transforms", "tuning_score", "network_dir",
           "run_cross_validation", "evaluate_run", "write_cv_report", "inference_images", "inference_datalist",
           "run_decoder_block", "inference_evaluator", "run_inference"]

logger = logging.getLogger("medxfer.workflows")

#: 1 = Segment-Net crop, 2 = attribute-agnostic segmenter, 3 = target segmenters (always on).
STAGES = (1, 2, 3)


def isic_year(data_root) -> int:
    """The ISIC release (2017 or 2018) of the dataset at ``data_root``; DatasetError if neither."""
    year = detect_isic_year(data_root)
    if year is None:
        expected = " or ".join(layout.image_dir for layout in ISIC_LAYOUTS.values())
        raise DatasetError(data_root, f"not an ISIC 2017/2018 dataset folder (expected a folder {expected})")
    return year


def target_masks(target: str, year: int) -> tuple[list[str], bool]:
    """Record keys of the masks a network learns, and whether they are united.

    ``target``: ``"lesion"`` (Segment-Net, Task 1 mask), ``"union"`` (stage 2: OR of all attribute
    masks of the year) or an attribute name of the year (stage 3).
    """
    attributes = ISIC_LAYOUTS[year].attributes
    if target == "lesion":
        return ["lesion"], False
    if target == "union":
        return [f"attribute_{a}" for a in attributes], True
    if target in attributes:
        return [f"attribute_{target}"], False
    raise ValueError(f"target must be 'lesion', 'union' or an ISIC {year} attribute ({', '.join(attributes)}), "
                     f"got {target!r}")


def tatl_datalists(data_root, fold: int = 0, n_folds: int = 5, seed: int = 0, splits_file=None,
                   boxes_file=None, tune_fraction: float = 0.1) -> dict[str, list[dict]]:
    """``{"train", "tune", "test"}`` records of one fold (see module docstring).

    With ``boxes_file`` (stage 1 output, :func:`medxfer.transforms.lesion_crop.save_boxes`) every record gets
    its lesion box under ``"box"``; an image without a box raises DatasetError naming the file.
    """
    records = load_isic(data_root, task=2)
    raise_if_problems(check_mask_sizes(records))
    check_isic_records(data_root, records)  # every file of the folds decoded and checked (cached)
    train, test = fold_records(records, fold, n_folds, seed, splits_file)
    train, tune = holdout_split(train, tune_fraction, seed, stream=1, what="early-stopping (tune_fraction)")
    lists = {"train": train, "tune": tune, "test": test}
    if boxes_file is not None:
        boxes = load_boxes(boxes_file)
        for name, items in lists.items():
            missing = [r["id"] for r in items if r["id"] not in boxes]
            if missing:
                raise DatasetError(boxes_file, f"no lesion box for {len(missing)} image(s) of the fold, e.g. {missing[0]}")
            lists[name] = [{**r, "box": boxes[r["id"]].to_dict()} for r in items]
    return lists


def stage_transforms(mode: str, target: str, year: int, working_size: Sequence[int] = TRAIN_SIZE, crop: bool = False,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, **augment):
    """Dermoscopy chain of one network: image ``(3, H, W)`` and its target as ``label`` ``(1, H, W)``.

    ``crop``: records are cropped to their ``"box"`` first (stages 2-3 after stage 1).
    """
    mask_keys, union = target_masks(target, year)
    return dermoscopy_transforms(mode, size=working_size, mean=mean, std=std, mask_keys=mask_keys, label_key="label",
                                 union=union, box_key="box" if crop else None, **augment)


def tuning_score(loss):
    """Per-batch ``1 - loss(logits, label)`` for MONAI's ``IgniteMetricHandler(loss_fn=...)``: the
    soft Tversky-Jaccard overlap of the tuning images, higher = better, so the evaluator's best
    metric, ``CheckpointSaver`` and ``EarlyStopHandler`` all read it the usual way. Always defined
    (smoothed), also on tuning images without the attribute, unlike a pooled Jaccard (0/0)."""
    def score(y_pred, y):
        return 1.0 - loss(y_pred, y)

    return score


def network_dir(fold_dir, stage: str, arch: str | None = None, attribute: str | None = None) -> Path:
    """Folder of one network of a fold: ``segment_net``, ``agnostic_<arch>``, ``target_<attr>_<arch>``."""
    if stage == "segment_net":
        return Path(fold_dir) / "segment_net"
    if stage == "agnostic":
        return Path(fold_dir) / f"agnostic_{arch}"
    if stage == "target":
        return Path(fold_dir) / f"target_{attribute}_{arch}"
    raise ValueError(f"stage must be segment_net, agnostic or target, got {stage!r}")


@dataclass
class TatlSettings:
    """Everything that defines a TATL cross-validation run (saved as ``tatl_run.json``).

    Attributes:
        stages: enabled stages, a subset of ``(1, 2, 3)`` containing 3 (Table 3 ablations).
        arches: shapes of stages 2-3 (default U and Link, averaged at inference).
        tatl_mode: stage-3 initialisation from stage 2, ``freeze`` (TATL-Freeze) or ``non_freeze``.
        imagenet_weights: local EfficientNet-b0 ImageNet weights file, or None (random encoder init,
            the "w/o ImageNet" ablation).
        working_size: training / inference resolution ``(H, W)`` (paper 384x512).
        offset: Segment-Net box margin in working pixels (paper 40).
        n_folds, seed, tune_fraction: the folds and the early-stopping hold-out.
        max_epochs, patience, batch_size, learning_rate, momentum: SGD training of every network.
        mean, std: per-channel normalisation (ImageNet statistics by default).
        threshold: probability threshold of the final masks.
        decoder_block: ``paper`` (TATL section 4.1 decoder stages, default) or ``linknet`` (medxfer's
            blocks before issue 17; a ``tatl_run.json`` without this key is such a run).
        segment_net: an already trained Segment-Net ``model.pt`` (U-shape effb0, e.g. trained once
            on all of ISIC Task 1 as in the paper) used for every fold instead of training one per
            fold on the fold's training images. Its lesion masks may include the test folds' images
            (the paper's setting); the per-fold default does not.
    """

    stages: tuple[int, ...] = STAGES
    arches: tuple[str, ...] = TATL_ARCHS
    tatl_mode: str = "freeze"
    imagenet_weights: str | None = None
    working_size: tuple[int, int] = TRAIN_SIZE
    offset: float = 40
    n_folds: int = 5
    seed: int = 0
    tune_fraction: float = 0.1
    max_epochs: int = 40
    patience: int = 10
    batch_size: int = 8
    learning_rate: float = 0.01
    momentum: float = 0.9
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    threshold: float = 0.5
    segment_net: str | None = None
    year: int | None = field(default=None)
    decoder_block: str = "paper"

    def __post_init__(self):
        self.stages = tuple(sorted({int(s) for s in self.stages}))
        if 3 not in self.stages or not set(self.stages) <= set(STAGES):
            raise ValueError(f"stages must be a subset of {STAGES} that contains 3 (the target segmenters), "
                             f"got {list(self.stages)}")
        self.arches = tuple(self.arches)
        unknown = [a for a in self.arches if a not in TATL_ARCHS]
        if not self.arches or unknown:
            raise ValueError(f"arches must be a non-empty subset of {TATL_ARCHS}, got {list(self.arches)}")
        if self.tatl_mode not in TATL_MODES:
            raise ValueError(f"tatl_mode must be one of {TATL_MODES}, got {self.tatl_mode!r}")
        if self.decoder_block not in DECODER_BLOCKS:
            raise ValueError(f"decoder_block must be one of {DECODER_BLOCKS}, got {self.decoder_block!r}")
        self.working_size = tuple(int(s) for s in self.working_size)
        if len(self.working_size) != 2 or any(s % 32 for s in self.working_size):
            raise ValueError(f"working_size must be (H, W), multiples of 32 (EfficientNet-b0), got {self.working_size}")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if self.segment_net is not None:
            self.segment_net = str(Path(self.segment_net).absolute())
            if not Path(self.segment_net).is_file():
                raise FileNotFoundError(f"{self.segment_net}: Segment-Net checkpoint not found")
        if self.imagenet_weights is not None:
            self.imagenet_weights = str(Path(self.imagenet_weights).absolute())
            if not Path(self.imagenet_weights).is_file():
                raise FileNotFoundError(f"{self.imagenet_weights}: ImageNet weights file not found")

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def load(cls, run_dir) -> "TatlSettings":
        path = Path(run_dir) / "tatl_run.json"
        data = read_json(path, "not a TATL run folder (no tatl_run.json); run configs/tatl.yaml first")
        if isinstance(data, dict):
            data.setdefault("decoder_block", "linknet")  # a run from before the setting existed
        try:
            return cls(**data)
        except TypeError as e:
            raise DatasetError(path, f"not a TATL settings file: {e}") from None


def _claim_run_dir(output_dir: Path, settings: TatlSettings) -> None:
    """Write ``tatl_run.json`` (atomically), or check that an existing run has the same settings (resume)."""
    path = output_dir / "tatl_run.json"
    wanted = settings.to_json()
    if path.exists():
        existing = read_json(path, "not a TATL settings file")
        if isinstance(existing, dict):
            existing.setdefault("decoder_block", "linknet")  # a run from before the setting existed
        if existing != wanted:
            changed = sorted(k for k in set(existing) | set(wanted) if existing.get(k) != wanted.get(k))
            raise FileExistsError(f"{path}: this folder holds a TATL run with other settings ({', '.join(changed)}); "
                                  "choose another output_dir")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=1) + "\n")


# --- markers: a unit of the cross-validation is done when its marker says so for the same inputs ---

def _sha256(path) -> str | None:
    """sha256 of a file's bytes (``None`` when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plain(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _marker(path: Path, key) -> dict | None:
    """The JSON marker at ``path`` if it records ``key`` (under ``"for"``), else ``None``: a marker
    from other settings or inputs, or one that cannot be read, is not trusted."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("for") == _plain(key) else None


def _network_key(overrides: dict) -> dict:
    """What one network's ``done.json`` is for: the training overrides (device and progress bars
    left out) with every input file of the run folder replaced by the sha256 of its bytes (the
    splits, the Segment-Net boxes, the stage-2 checkpoint a stage-3 network starts from), so a
    network is retrained when anything it was trained from changed."""
    key = {k: v for k, v in overrides.items() if k not in ("device", "cache_progress")}
    if key.get("decoder_block") == "linknet":
        del key["decoder_block"]  # the markers of runs from before the setting (their networks) stay valid
    for name in ("splits_file", "boxes_file", "init_checkpoint"):
        if key.get(name) is not None:
            key[name] = {"sha256": _sha256(key[name])}
    return _plain(key)


def _train_one(bundle_root, net_dir: Path, overrides: dict, quiet: bool) -> dict:
    """Run ``configs/train.yaml`` for one network unless ``net_dir/done.json`` says it is done for
    the same :func:`_network_key`. A folder without a valid ``done.json`` (a killed training, or
    one of other inputs) is emptied first: the network is trained from scratch, as in an
    uninterrupted run. ``done.json`` is written atomically, last."""
    done = net_dir / "done.json"
    key = _network_key(overrides)
    marker = _marker(done, key)
    if marker is not None and (net_dir / "model.pt").exists():
        return marker
    if net_dir.exists():
        logger.warning("%s: unfinished network (killed?) trained again from scratch", net_dir)
        shutil.rmtree(net_dir)
    run_bundle(str(bundle_root), ["train"], quiet=quiet, output_dir=str(net_dir), **overrides)
    if not (net_dir / "model.pt").exists():
        raise RuntimeError(f"{net_dir}: training finished without a model.pt checkpoint")
    summary = {"for": _network_key(overrides), "checkpoint": str(net_dir / "model.pt"), "sha256": _sha256(net_dir / "model.pt"),
               **_training_summary(net_dir)}
    atomic_write_text(done, json.dumps(summary, indent=1) + "\n")
    return summary


def _training_summary(net_dir: Path) -> dict:
    """Epochs run and the best tuning round from :class:`medxfer.handlers.MetricHistory`'s ``history.json``."""
    path = net_dir / "history.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {"epochs_run": data.get("epochs_run"), "best": data.get("best")}


def _adopt_segment_net(checkpoint, net_dir: Path, device) -> None:
    """Copy a given trained Segment-Net into the fold (the run folder stays self-contained); it must
    load as a U-shape effb0 (checked before copying). Copied atomically; ``done.json`` (recording
    the source file's sha256) last."""
    key = {"copied_from": {"sha256": _sha256(checkpoint)}}
    if _marker(net_dir / "done.json", key) is not None and (net_dir / "model.pt").exists():
        return
    load_trained("unet_effb0", checkpoint, device)  # a wrong file fails here, naming it
    net_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(net_dir / "model.pt") as tmp:
        shutil.copyfile(checkpoint, tmp)
    atomic_write_text(net_dir / "done.json", json.dumps({"for": _plain(key), "checkpoint": str(net_dir / "model.pt"),
                                                         "copied_from": str(checkpoint)}, indent=1) + "\n")


def _boxes_key(net_dir: Path, settings: TatlSettings, splits_file: Path) -> dict:
    """What ``boxes.json`` is for: the Segment-Net's bytes, the folds and the box settings."""
    return {"segment_net": _sha256(net_dir / "model.pt"), "splits": _sha256(splits_file),
            "working_size": list(settings.working_size), "offset": settings.offset, "threshold": settings.threshold,
            "mean": list(settings.mean), "std": list(settings.std)}


def _fold_key(fold_dir: Path, settings: TatlSettings, data_root, splits_file: Path) -> dict:
    """What a fold's ``scores.json`` is for: the bytes of every network of the fold (and its
    boxes), the folds and the scoring settings."""
    nets = sorted(p for p in fold_dir.iterdir() if p.is_dir() and (p / "model.pt").exists())
    return {"networks": {p.name: _sha256(p / "model.pt") for p in nets}, "boxes": _sha256(fold_dir / "boxes.json"),
            "splits": _sha256(splits_file), "data_root": str(Path(data_root).absolute()),
            "settings": settings.to_json()}


def _fold_scores(fold_dir: Path) -> dict:
    """The per-attribute scores a finished fold evaluation wrote (JSON null back to NaN)."""
    data = read_json(fold_dir / "scores.json", "fold scores not found")
    return {a: {k: (math.nan if v is None and k in ("jaccard", "dice") else v) for k, v in s.items()}
            for a, s in data["attributes"].items()}


def run_cross_validation(bundle_root, data_root, output_dir, settings: TatlSettings | dict,
                         folds: Sequence[int] | None = None, device=None, quiet: bool = True) -> dict:
    """Train every network of every fold in stage order, score each test fold, summarise.

    Args:
        bundle_root: the ``tatl_skin`` bundle folder (its ``configs/train.yaml`` trains each network).
        data_root: ISIC 2017 or 2018 training set in the published layout.
        output_dir: run folder (layout in the module docstring). A killed run, run again,
            resumes: every unit whose marker was written for the same inputs is skipped -- a
            network (``done.json``), a fold's Segment-Net boxes (``boxes_done.json``), a fold's
            evaluation (``scores_done.json``) -- and a half-finished one is redone from scratch
            (seeded, so the result equals an uninterrupted run). Markers are written atomically,
            after what they mark; the report (``cv_scores.*``) is always rewritten last.
        settings: :class:`TatlSettings` (or its fields as a dict).
        folds: folds to run (default all ``settings.n_folds``).
        device: torch device for training and evaluation (default cuda if available).

    Returns:
        the cross-validation summary also written to ``cv_scores.json``.
    """
    from tqdm.auto import tqdm

    settings = settings if isinstance(settings, TatlSettings) else TatlSettings(**settings)
    settings.year = isic_year(data_root)
    attributes = ISIC_LAYOUTS[settings.year].attributes
    output_dir = Path(output_dir).absolute()
    _claim_run_dir(output_dir, settings)
    device = resolve_device(device)
    folds = list(range(settings.n_folds)) if folds is None else [int(f) for f in folds]
    splits_file = output_dir / "splits.json"
    common = {
        "data_root": str(Path(data_root).absolute()), "splits_file": str(splits_file),
        "n_folds": settings.n_folds, "seed": settings.seed, "tune_fraction": settings.tune_fraction,
        "working_size": list(settings.working_size), "max_epochs": settings.max_epochs,
        "patience": settings.patience, "batch_size": settings.batch_size, "learning_rate": settings.learning_rate,
        "momentum": settings.momentum, "mean": list(settings.mean), "std": list(settings.std),
        "imagenet_weights": settings.imagenet_weights, "device": str(device), "cache_progress": not quiet,
        "decoder_block": settings.decoder_block,
    }
    # the folds first (saved in splits.json): every marker records the sha256 of the split it used
    tatl_datalists(data_root, folds[0], settings.n_folds, settings.seed, splits_file, None, settings.tune_fraction)
    plan = []  # (fold, stage, arch, attribute) in training order
    for fold in folds:
        if 1 in settings.stages:
            plan.append((fold, "segment_net", "unet_effb0", None))
        if 2 in settings.stages:
            plan += [(fold, "agnostic", arch, None) for arch in settings.arches]
        plan += [(fold, "target", arch, a) for a in attributes for arch in settings.arches]

    fold_scores = {}
    progress = tqdm(total=len(plan), desc="TATL networks", unit="net")
    for fold in folds:
        fold_dir = output_dir / f"fold_{fold}"
        boxes_file = fold_dir / "boxes.json" if 1 in settings.stages else None
        for _, stage, arch, attribute in [p for p in plan if p[0] == fold]:
            net_dir = network_dir(fold_dir, stage, arch, attribute)
            progress.set_postfix_str(f"fold {fold} {net_dir.name}")
            overrides = {**common, "fold": fold, "arch": arch,
                         "target": {"segment_net": "lesion", "agnostic": "union"}.get(stage, attribute),
                         "boxes_file": None if stage == "segment_net" or boxes_file is None else str(boxes_file)}
            if stage == "target" and 2 in settings.stages:
                overrides.update(init_checkpoint=str(network_dir(fold_dir, "agnostic", arch) / "model.pt"),
                                 tatl_mode=settings.tatl_mode)
            if stage == "segment_net" and settings.segment_net is not None:
                _adopt_segment_net(settings.segment_net, net_dir, device)
            else:
                _train_one(bundle_root, net_dir, overrides, quiet)
            if stage == "segment_net":
                boxes_key = _boxes_key(net_dir, settings, splits_file)
                if not (boxes_file.exists() and _marker(fold_dir / "boxes_done.json", boxes_key) is not None):
                    lists = tatl_datalists(data_root, fold, settings.n_folds, settings.seed, splits_file, None,
                                           settings.tune_fraction)
                    segment_net = load_trained("unet_effb0", net_dir / "model.pt", device)  # decoder from its keys
                    records = lists["train"] + lists["tune"] + lists["test"]
                    boxes = segment_net_boxes(segment_net, records, settings.working_size, settings.offset,
                                              threshold=settings.threshold, mean=settings.mean, std=settings.std)
                    save_boxes(boxes, boxes_file)  # atomic; then its marker
                    atomic_write_text(fold_dir / "boxes_done.json", json.dumps({"for": _plain(boxes_key)}, indent=1) + "\n")
            progress.update(1)
        fold_key = _fold_key(fold_dir, settings, data_root, splits_file)
        if _marker(fold_dir / "scores_done.json", fold_key) is None or not (fold_dir / "scores.json").exists():
            evaluate_fold(output_dir, fold, settings, data_root, device)
            atomic_write_text(fold_dir / "scores_done.json", json.dumps({"for": _plain(fold_key)}, indent=1) + "\n")
        fold_scores[fold] = _fold_scores(fold_dir)  # read back in both cases: a resumed report equals an uninterrupted one
    progress.close()
    return write_cv_report(output_dir, fold_scores, settings)


def fold_predictor(run_dir, fold: int = 0, device="cpu", union: str = "stage2", network_defs=None,
                   inferer=None) -> TatlPredictor:
    """The networks of ``fold`` of a :func:`run_cross_validation` run as a
    :class:`~medxfer.transfer.tatl_inference.TatlPredictor` (with the run's settings).

    Args:
        union: ``"stage2"`` (default): the union map is the fold's stage-2 attribute-agnostic
            segmenters' averaged prediction (a run without stage 2 raises, naming the run);
            ``"or_stage3"``: the OR of the attribute masks (stage-2 networks not loaded).
        network_defs: ``{"segment_net" | "agnostic_<arch>" | "target_<arch>": module}``, untrained
            networks the weights are loaded into (copied per network; a bundle's ``*_def``); a
            missing key is built by :func:`medxfer.transfer.tatl.tatl_network` with the decoder the
            checkpoint was trained with.
        inferer: ``inferer(x, network)`` for every network (MONAI ``Inferer``); default ``network(x)``.
    """
    settings = TatlSettings.load(run_dir)
    fold_dir = Path(run_dir) / f"fold_{fold}"
    if not fold_dir.is_dir():
        raise FileNotFoundError(f"{fold_dir}: no such fold in the run")
    if union not in UNION_MODES:
        raise ValueError(f"union must be one of {UNION_MODES}, got {union!r}")
    if union == "stage2" and 2 not in settings.stages:
        raise ValueError(f"{run_dir}: this run has no stage 2 (stages {list(settings.stages)}), so no "
                         "attribute-agnostic segmenter for the union map; use union 'or_stage3' (--union or_stage3)")
    defs = dict(network_defs or {})

    def load(name: str, arch: str, path: Path) -> torch.nn.Module:
        template = defs.get(name)
        return load_trained(arch, path, device, network=None if template is None else copy.deepcopy(template))

    targets = {a: [load(f"target_{arch}", arch, network_dir(fold_dir, "target", arch, a) / "model.pt")
                   for arch in settings.arches]
               for a in ISIC_LAYOUTS[settings.year].attributes}
    agnostic = None
    if union == "stage2":
        agnostic = [load(f"agnostic_{arch}", arch, network_dir(fold_dir, "agnostic", arch) / "model.pt")
                    for arch in settings.arches]
    segment_net = None
    if 1 in settings.stages:
        segment_net = load("segment_net", "unet_effb0", network_dir(fold_dir, "segment_net") / "model.pt")
    return TatlPredictor(targets, segment_net, settings.working_size, settings.offset, settings.mean, settings.std,
                         settings.threshold, device, union_networks=agnostic, union=union, inferer=inferer)


def evaluate_fold(run_dir, fold: int, settings: TatlSettings, data_root, device="cpu") -> dict:
    """Score the test fold with the fold's trained networks at 256x256 (ISIC 2018 Task 2 rule);
    writes ``fold_<k>/scores.json`` and returns ``{attribute: {jaccard, dice, tp, fp, fn, images}}``."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    attributes = ISIC_LAYOUTS[settings.year].attributes
    lists = tatl_datalists(data_root, fold, settings.n_folds, settings.seed, run_dir / "splits.json", None,
                           settings.tune_fraction)
    predictor = fold_predictor(run_dir, fold, device=device, union="or_stage3")  # the union map is not scored
    boxes = {}  # stage 1 already boxed every image of the fold: not run again
    if 1 in settings.stages and (run_dir / f"fold_{fold}" / "boxes.json").exists():
        boxes = load_boxes(run_dir / f"fold_{fold}" / "boxes.json")
    truth = scoring_transforms([f"attribute_{a}" for a in attributes], label_key="label")
    scorer = FoldScorer(attributes)
    for record in tqdm(lists["test"], desc=f"fold {fold} test images", leave=False):
        prediction = predictor.predict(record["image"], box=boxes.get(record["id"]))
        pred = resize_for_scoring(prediction.probabilities, threshold=settings.threshold)
        scorer.add(pred, np.asarray(truth(record)["label"]))
    scores = scorer.scores()
    write_json(run_dir / f"fold_{fold}" / "scores.json", {"fold": fold, "attributes": scores})
    return scores


def evaluate_run(run_dir, data_root, folds: Sequence[int] | None = None, device=None) -> dict:
    """Re-score the test folds of an existing run (``configs/evaluate.yaml``); writes ``cv_scores.*``."""
    settings = TatlSettings.load(run_dir)
    year = isic_year(data_root)
    settings.year = settings.year or year
    if year != settings.year:
        raise DatasetError(data_root, f"the run was trained on ISIC {settings.year} data")
    device = resolve_device(device)
    run_dir = Path(run_dir)
    if folds is None:
        folds = sorted(int(p.name.split("_")[1]) for p in run_dir.glob("fold_*") if p.is_dir())
    if not folds:
        raise DatasetError(run_dir, "no fold_<k> folder: nothing was trained here")
    scores = {f: evaluate_fold(run_dir, f, settings, data_root, device) for f in folds}
    return write_cv_report(run_dir, scores, settings)


def write_cv_report(run_dir, fold_scores: dict, settings: TatlSettings) -> dict:
    """``cv_scores.json`` (per fold + mean/std), ``cv_scores.csv`` and a bar chart ``cv_scores.png``."""
    import csv

    run_dir = Path(run_dir)
    attributes = list(ISIC_LAYOUTS[settings.year].attributes)
    summary = summarize_folds([fold_scores[f] for f in sorted(fold_scores)])
    report = {"stages": list(settings.stages), "arches": list(settings.arches), "tatl_mode": settings.tatl_mode,
              "imagenet": settings.imagenet_weights is not None, "year": settings.year,
              "folds": {str(f): s for f, s in sorted(fold_scores.items())}, "summary": summary}
    write_json(run_dir / "cv_scores.json", report)
    with atomic_path(run_dir / "cv_scores.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["attribute", "jaccard_mean", "jaccard_std", "dice_mean", "dice_std", "folds"])
        for name in attributes + ["mean"]:
            row = summary.get(name, {})
            writer.writerow([name] + [_fmt(row.get(k)) for k in ("jaccard_mean", "jaccard_std", "dice_mean",
                                                                  "dice_std")] + [row.get("n_folds", "")])
    _plot_cv(run_dir / "cv_scores.png", summary, attributes, settings)
    return report


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _plot_cv(path: Path, summary: dict, attributes: list[str], settings: TatlSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = attributes + ["mean"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.6))
    for k, (metric, colour) in enumerate((("jaccard", "tab:blue"), ("dice", "tab:orange"))):
        means = [summary.get(n, {}).get(f"{metric}_mean", np.nan) for n in names]
        stds = [summary.get(n, {}).get(f"{metric}_std", np.nan) for n in names]
        ax.bar(x + (k - 0.5) * 0.38, np.nan_to_num(means), 0.38, yerr=np.nan_to_num(stds), color=colour,
               label=metric.capitalize(), capsize=3)
    ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (pixels pooled per fold)")
    stages = ", ".join(str(s) for s in settings.stages)
    ax.set_title(f"TATL stages {stages} ({settings.tatl_mode}), ISIC {settings.year}: mean ± std over folds")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Names the ISIC layout and our own inference outputs use for masks: never taken as input images.
MASK_STEMS = ("_segmentation", "_attribute_", "_union", "_overlay", "_superpixels")


def inference_images(input_path) -> list[Path]:
    """RGB image files to predict: one file, or the ``.jpg`` / ``.jpeg`` / ``.png`` files of a folder
    (sorted; mask-like names ``*_segmentation.png`` / ``*_attribute_*.png`` / ``*_union.png`` /
    ``*_overlay.png`` are skipped)."""
    images = image_files(input_path, IMAGE_SUFFIXES, MASK_STEMS)
    check_image_files(images)  # the door check: an unreadable image is named before any network loads
    return images


def inference_datalist(input_path) -> list[dict]:
    """``[{"image": path}]`` of :func:`inference_images` (the inference config's ``dataset``)."""
    return [{"image": str(p)} for p in inference_images(input_path)]


def run_decoder_block(run_dir) -> str:
    """The ``decoder_block`` of the TATL run at ``run_dir`` (``"paper"`` when there is no run there
    yet: a bundle's ``*_def`` then builds the default networks)."""
    if not (Path(run_dir) / "tatl_run.json").is_file():
        return "paper"
    return TatlSettings.load(run_dir).decoder_block


class _InferenceStep:
    """Iteration of :func:`inference_evaluator`: predict each image of the batch, write its files,
    keep its summary (``results``)."""

    def __init__(self, predictor: TatlPredictor, output_dir: Path, overwrite: bool) -> None:
        self.predictor, self.output_dir, self.overwrite = predictor, output_dir, overwrite
        self.results: dict[str, dict] = {}

    def __call__(self, engine, batch) -> dict:
        for image in batch["image"]:
            image = Path(image)
            prediction = self.predictor.predict(image)
            files = write_prediction(prediction, image, self.output_dir, image.stem, overwrite=self.overwrite)
            self.results[image.stem] = {
                "image": str(image.absolute()), "box": prediction.box.to_dict(),
                "attribute_fraction": {a: float(m.mean()) for a, m in zip(prediction.attributes, prediction.masks)},
                "union_fraction": float(prediction.union.mean()), "union": self.predictor.union_mode,
                "files": [str(f) for f in files]}
        return {"images": list(batch["image"])}


def inference_evaluator(predictor: TatlPredictor, dataset, output_dir, overwrite: bool = False, handlers=None,
                        run_dir=None, fold: int | None = None):
    """The TATL inference step as a MONAI ``Evaluator`` (the inference config's ``evaluator``).

    One image per iteration (``dataset`` of ``{"image": path}``); each iteration runs ``predictor``
    and writes the image's masks, union map and overlay (:func:`write_prediction`); when the
    evaluator completes, ``predictions.json`` summarises every image. ``handlers``: MONAI handlers
    (e.g. ``StatsHandler``). Refuses (FileExistsError) an output folder with a ``predictions.json``
    unless ``overwrite``. The MONAI engine itself is reused unchanged; only the iteration (seven
    to thirteen networks, a crop in the middle) is medxfer's.
    """
    from ignite.engine import Events
    from monai.data import DataLoader
    from monai.engines import Evaluator

    output_dir = Path(output_dir)
    summary_file = output_dir / "predictions.json"
    if summary_file.exists() and not overwrite:
        raise FileExistsError(f"{summary_file}: exists; pass overwrite=True (--overwrite true) to replace the predictions")
    step = _InferenceStep(predictor, output_dir, overwrite)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    evaluator = Evaluator(device=predictor.device, val_data_loader=loader, iteration_update=step,
                          val_handlers=handlers, decollate=False)

    @evaluator.on(Events.COMPLETED)
    def _write_summary(engine) -> None:
        summary = {"run_dir": None if run_dir is None else str(Path(run_dir).absolute()), "fold": fold,
                   "networks": predictor.n_networks, "union": predictor.union_mode, "images": step.results}
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(summary_file, summary)
        engine.state.tatl_summary = summary

    return evaluator


def run_inference(run_dir, fold: int, input_path, output_dir, device=None, overwrite: bool = False,
                  union: str = "stage2") -> dict:
    """The TATL inference step on new images with the networks of one fold of a run.

    Writes per image ``<id>_attribute_<name>.png`` (ISIC 2018 naming, 0/255, original size),
    ``<id>_union.png`` (``union``: the stage-2 prediction, default, or ``or_stage3``),
    ``<id>_overlay.png`` and, for all images, ``predictions.json`` (box, attribute pixel fractions,
    whether the Segment-Net found nothing). Returns that summary. The inference config runs the
    same :func:`inference_evaluator`.
    """
    device = resolve_device(device)
    datalist = inference_datalist(input_path)
    summary_file = Path(output_dir) / "predictions.json"
    if summary_file.exists() and not overwrite:  # before any network loads
        raise FileExistsError(f"{summary_file}: exists; pass overwrite=True (--overwrite true) to replace the predictions")
    predictor = fold_predictor(run_dir, fold, device=device, union=union)
    evaluator = inference_evaluator(predictor, datalist, output_dir, overwrite, run_dir=run_dir, fold=fold)
    evaluator.run()
    return evaluator.state.tatl_summary
