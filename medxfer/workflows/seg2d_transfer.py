"""Helpers the ``bundles/seg2d_transfer`` configs call (thesis chapters 2 and 4; SPEC sections 7-8).

Workflow of checkpoint selection for 2D segmentation transfer:

1. ``pretrain_encoder``: an encoder (of ``unet2d``, ``resnet50_attention_unet`` or ``swin_unet``)
   with a classification head (:class:`medxfer.networks.seg2d.EncoderClassifier`) is trained on a
   labelled class-per-folder image set; checkpoints at chosen epochs go into a model bank (same
   manifest as the 3D bank). Optionally the online rule (:class:`medxfer.handlers.RobustnessEarlyStopping`)
   scores robustness on the target images and stops at its first local maximum.
2. ``select_checkpoint``: every bank checkpoint and the random-init encoder are scored on the
   training images of the fine-tuning fold without fine-tuning (:func:`select_checkpoint`):
   robustness (thesis eq. 4.2, the authors' colour jitter, second-to-last encoder level, unpooled
   for full fine-tuning; :func:`~medxfer.transferability.robustness.robustness_options`) and the
   feature-based estimators on the encoder's last two levels; the highest robustness is the
   selection; TIS is reported when fine-tuned Dice is given.
3. ``train``: the segmentation network initialised from a checkpoint (encoder) and fine-tuned,
   ``encoder_only`` or ``decoder_only`` (frozen encoder); recipe ``thesis`` (section 2.4: 150 epochs,
   SGD momentum 0.9, weight decay 1e-4, poly decay 0.9 per step, :func:`thesis_dice_loss`,
   rotations U[0, pi]) or ``medxfer_v1`` (the recipe before issue 17).
4. ``evaluate`` / ``inference``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.transforms import Activationsd, AsDiscreted, Compose
from monai.utils import convert_to_tensor
from PIL import Image

from medxfer.atomic import atomic_path, atomic_write_text
from medxfer.data.image_folder import image_files, load_image_folder
from medxfer.data.preflight import check_image_files, check_image_records, check_seg2d_records
from medxfer.data.problems import DatasetError, read_json
from medxfer.data.seg2d import load_seg2d, read_mask
from medxfer.data.splits import fold_records, holdout_split
from medxfer.device import resolve_device
from medxfer.handlers import BankCheckpointer, RobustnessEarlyStopping
from medxfer.handlers.bank_saver import finished_pretraining
from medxfer.jsonfile import write_json
from medxfer.metrics.segmentation import case_metrics, summarize_cases
from medxfer.networks import arch_layout, build_network
from medxfer.networks.truncated import TruncatedSegmenter
from medxfer.transfer.bank import ModelBank
from medxfer.transfer.weights import load_pretrained, read_checkpoint, truncated_encoder_weights
from medxfer.transferability.evaluate import evaluate_estimators, table_from_files, write_report
from medxfer.transferability.features import SamplingConfig
from medxfer.transferability.robustness import robustness_options
from medxfer.transferability.score import ScoringTarget, score_into, score_target, seg2d_key, write_scores
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD
from medxfer.transforms.seg2d import seg2d_transforms, unnormalized_images

__all__ = ["SEG2D_TRANSFER_MODES", "classification_datalists", "seg2d_datalists", "is_binary", "seg_out_channels",
           "seg2d_network", "selection_records", "target_images", "online_selection_handlers", "RANDOM_INIT", "pretraining_settings", "run_pretraining",
           "score_checkpoints", "select_checkpoint",
           "discrete_postprocessing", "save_run_info", "Seg2DRun", "logits_to_mask", "sigmoid_with_background", "thesis_dice_loss",
           "inference_network", "inference_datalist", "MaskWriter", "evaluate_seg2d", "predict_folder"]

logger = logging.getLogger("medxfer.workflows")

#: The transfer modes (:data:`medxfer.transfer.weights.TRANSFER_MODES`) downstream 2D training offers:
#: ``encoder_only`` (thesis "full fine-tuning", every layer trains), ``decoder_only`` (encoder frozen),
#: ``full`` (head included, for a checkpoint of the same segmentation network), ``scratch``.
SEG2D_TRANSFER_MODES = ("encoder_only", "decoder_only", "full", "scratch")


def classification_datalists(data_root, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """``{"train", "val", "classes"}`` of a class-per-folder pretraining set (seeded hold-out)."""

    records, classes = load_image_folder(data_root)
    train, val = holdout_split(records, val_fraction, seed, stream=2, what="validation (val_fraction)")
    check_image_records(data_root, train + val)  # every image decoded once (cached): no truncated JPEG mid-run
    return {"train": train, "val": val, "classes": classes}


def seg2d_datalists(data_root, fold: int = 0, n_folds: int = 5, seed: int = 0, splits_file=None) -> dict:
    """``{"train", "val", "labels"}`` of fold ``fold`` of a 2D segmentation folder (splits kept in
    ``splits_file``)."""

    records, labels = load_seg2d(data_root)
    train, val = fold_records(records, fold, n_folds, seed, splits_file)
    check_seg2d_records(data_root, train + val)  # every image decoded once (cached)
    return {"train": train, "val": val, "labels": labels}


def is_binary(labels) -> bool:
    """Two classes (background + one): sigmoid output with one channel."""
    return len(labels) == 2


def seg_out_channels(labels) -> int:
    """1 for a binary target (sigmoid), else the number of classes incl. background (softmax)."""
    return 1 if is_binary(labels) else len(labels)


def seg2d_network(arch: str, labels, image_size, init_entry: str | None = None, bank_root=None,
                  init_checkpoint=None, transfer_mode: str = "encoder_only", output_dir=None,
                  arch_kwargs: dict | None = None, allow_partial: bool = False) -> torch.nn.Module:
    """The downstream segmentation network (any registered 2D arch), initialised from a pretrained encoder.

    The encoder comes from bank entry ``init_entry`` of ``bank_root`` or from a checkpoint file
    (e.g. ``robust_selected.pt`` of the online rule). ``transfer_mode`` is one of the transfer
    modes of :mod:`medxfer.transfer.weights`: ``encoder_only`` (the thesis' "full fine-tuning":
    the encoder loaded, every layer trained), ``decoder_only`` (encoder loaded and frozen), ``full``
    (every matching key, head included), ``scratch`` (nothing loaded). Truncated ResNet50 /
    DenseNet121 segmenters read the encoder with their own key naming (levels the cut dropped are
    skipped and listed). A pretraining encoder classifier's ``classifier`` is skipped by design.
    The mode's contract is checked (every encoder tensor for ``encoder_only`` / ``decoder_only``,
    every tensor for ``full``): a shortfall is a one-line error listing the first mismatched keys
    unless ``allow_partial`` (the bundle's ``allow_partial`` id; then logged at WARNING). The
    per-key report goes to ``output_dir/transfer_report.json``.
    """
    if transfer_mode not in SEG2D_TRANSFER_MODES:
        raise ValueError(f"transfer_mode must be one of {list(SEG2D_TRANSFER_MODES)}, got {transfer_mode!r}")
    network = build_network(arch, 3, seg_out_channels(labels), image_size, **dict(arch_kwargs or {}))
    if transfer_mode == "scratch":
        return network
    truncated = isinstance(network, TruncatedSegmenter)
    if init_entry is not None:
        bank = ModelBank.open(bank_root)
        entry = bank.get(init_entry)
        if not truncated and entry.arch != arch:
            raise ValueError(f"bank entry {init_entry!r} is a {entry.arch} encoder, the network is {arch}")
        if arch == "truncated_resnet50" and entry.arch != "resnet50_attention_unet":
            raise ValueError(f"bank entry {init_entry!r} is a {entry.arch} encoder; truncated_resnet50 needs a "
                             "ResNet50 (resnet50_attention_unet) encoder")
        weights, source = bank.load_state_dict(init_entry), str(bank.checkpoint_path(init_entry))
    elif init_checkpoint is not None:
        weights, source = init_checkpoint, str(init_checkpoint)
    else:
        raise ValueError(f"transfer_mode {transfer_mode!r} needs init_entry (with bank_root) or init_checkpoint; "
                         "use transfer_mode 'scratch' to train from random weights")
    if truncated:
        report = truncated_encoder_weights(network, weights, transfer_mode, allow_partial=allow_partial, source=source)
    else:
        layout = arch_layout(arch, network)
        # the classifier of a pretraining EncoderClassifier entry is dropped by design, not unknown
        layout = replace(layout, cut_off=[*layout.cut_off, "classifier"])
        report = load_pretrained(network, weights, layout, transfer_mode, allow_partial=allow_partial, source=source)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(output_dir) / "transfer_report.json", report.to_dict())
    return network


def selection_records(data_root, fold: int | None = None, n_folds: int = 5, split_seed: int = 0, splits_file=None,
                      max_cases: int | None = None) -> tuple[list[dict], dict]:
    """``(records, labels)`` of the target images checkpoint selection scores (offline and online).

    ``fold`` not None: the *training* images of that fold of the downstream fine-tuning (the split
    :func:`seg2d_datalists` makes with the same ``fold``, ``n_folds``, ``split_seed``, read from
    ``splits_file`` when it exists), so selection never looks at the validation images; ``None``:
    every image of the folder. ``max_cases`` keeps the first ones; ``None`` (or 0) keeps them all
    (thesis: the whole target training set)."""
    records, labels = load_seg2d(data_root)
    if fold is not None:
        records, _ = fold_records(records, int(fold), int(n_folds), int(split_seed), splits_file)
    if max_cases:
        records = records[:int(max_cases)]
    check_seg2d_records(data_root, records)  # every image decoded once (cached)
    return records, labels


def target_images(data_root, image_size, max_images: int | None = None, fold: int | None = None, n_folds: int = 5,
                  split_seed: int = 0, splits_file=None) -> torch.Tensor:
    """``(N, 3, H, W)`` target images in ``[0, 1]`` for the robustness score: the images of
    :func:`selection_records` (every image of the folder, or of the fine-tuning fold's training part)."""
    records, _ = selection_records(data_root, fold, n_folds, split_seed, splits_file, max_images)
    return unnormalized_images(records, image_size)


def online_selection_handlers(enabled: bool, network, arch: str, target_root, image_size, output_dir,
                              epochs=None, max_images: int | None = None, seed: int = 0, mean=None, std=None,
                              robustness: dict | None = None, transfer_mode: str = "encoder_only",
                              fold: int | None = None, n_folds: int = 5, split_seed: int = 0, splits_file=None) -> list:
    """``[RobustnessEarlyStopping]`` for the pretraining trainer when ``enabled`` (else ``[]``).

    ``robustness``: the bundle's settings (:func:`~medxfer.transferability.robustness.robustness_options`:
    jitter, pooled, distance, margin; ``pooled`` null follows ``transfer_mode``); the images are
    :func:`target_images` of ``fold`` (``None``: the whole folder) -- with the same settings
    ``select_checkpoint`` measures the same numbers offline."""
    if not enabled:
        return []
    if target_root is None:
        raise ValueError("online selection needs target_root (the target segmentation images)")
    options = _robustness_options(robustness, transfer_mode)
    images = target_images(target_root, image_size, max_images, fold, n_folds, split_seed, splits_file)
    return [RobustnessEarlyStopping(network, arch_layout(arch, network).penultimate_encoder, images,
                                    normalize=(mean or IMAGENET_MEAN, std or IMAGENET_STD), epochs=epochs,
                                    output_dir=output_dir, seed=seed, mode="color", **options)]


def pretraining_settings(datalists: dict, **settings) -> dict:
    """What an encoder pretraining is for (the marker key of
    :class:`medxfer.handlers.BankCheckpointer`): ``settings`` (arch, epochs, ...) plus the
    pretraining images: the classes and the sha256 of the sorted relative image paths of the
    training and validation lists (cheap: no image read, even for an ImageNet copy)."""
    paths = sorted(str(r["image"]) for part in ("train", "val") for r in datalists[part])
    common = os.path.commonpath(paths) if paths else ""
    digest = hashlib.sha256("\n".join(os.path.relpath(p, common) for p in paths).encode()).hexdigest()
    return {**settings, "data": {"classes": list(datalists["classes"]), "images": digest, "n": len(paths)}}


def run_pretraining(trainer, bank_saver: BankCheckpointer) -> None:
    """``trainer.run()`` unless this pretraining finished before with the same settings: its bank
    entries and marker (:func:`medxfer.handlers.bank_saver.finished_pretraining`) say so; then
    nothing is trained again. A half-finished one (killed) is redone from scratch by the
    ``bank_saver`` (its entries removed at the start); ``overwrite_bank`` redoes a finished one."""
    saver = bank_saver
    if not saver.overwrite and saver.settings is not None:
        marker = finished_pretraining(saver.bank_root, saver.name, saver.settings)
        if marker is not None:
            logger.info("pretraining %s finished before with these settings (entries %s): not trained again",
                        saver.name, ", ".join(marker["entries"]))
            return
    trainer.run()


# ----------------------------------------------------------------------------------------------
# Offline selection

#: Bank entry name suffix of the randomly initialised encoder scored as an offline candidate.
RANDOM_INIT = "random_init"


def _selection_target(data_root, records: list[dict], labels: dict, size, robustness: dict) -> ScoringTarget:
    """The selection images as a :class:`~medxfer.transferability.score.ScoringTarget`: labelled
    cases through the evaluation chain (feature estimators) and the same images in ``[0, 1]``
    (robustness, with the settings ``robustness``), as :func:`medxfer.transferability.score.seg2d_target`
    builds them for a folder."""
    chain = seg2d_transforms("eval", size, labels)
    cases = []
    for r in records:
        item = chain(r)
        cases.append({"id": r["id"], "image": torch.as_tensor(np.asarray(item["image"])),
                      "label": np.asarray(item["label"]).astype(np.int64)})
    return ScoringTarget(str(data_root), cases, list(size), unnormalized_images(records, size), "color",
                         (IMAGENET_MEAN, IMAGENET_STD), robustness_batch=4, robustness=robustness)


def _random_init_bank(bank_root, out_dir, seed: int) -> Path:
    """A one-entry-per-architecture bank under ``out_dir`` holding the randomly initialised
    encoder(s) of the architectures in ``bank_root`` (``<arch>_random_init``, epoch 0; the
    registry's initialisation after ``torch.manual_seed(seed)``). Rebuilt identically each time."""
    bank = ModelBank.open(bank_root)
    tiny = ModelBank.open(out_dir, create=True, description="random-init candidates of checkpoint selection")
    seen = set()
    for name in bank.names():
        e = bank.get(name)
        key = json.dumps([e.arch, e.arch_kwargs, e.in_channels, e.out_channels, list(e.patch_size)], sort_keys=True,
                         default=str)
        if key in seen:
            continue
        seen.add(key)
        entry_name = f"{e.arch}_{RANDOM_INIT}" + (f"_{len(seen)}" if len(seen) > 1 else "")
        torch.manual_seed(int(seed))
        network = build_network(e.arch, e.in_channels, e.out_channels, list(e.patch_size), **e.arch_kwargs)
        if entry_name in tiny.names() and tiny.get(entry_name).sha256 and \
                all(torch.equal(a, b) for a, b in zip(tiny.load_state_dict(entry_name).values(),
                                                      network.state_dict().values())):
            continue
        tiny.add(entry_name, network, arch=e.arch, in_channels=e.in_channels, out_channels=e.out_channels,
                 patch_size=list(e.patch_size), arch_kwargs=e.arch_kwargs, epoch=0, overwrite=True,
                 notes=f"random initialisation (seed {seed}) of {name}'s architecture")
    return Path(out_dir)


def _robustness_options(robustness: dict | None, transfer_mode: str) -> dict:
    """The bundle's ``robustness`` settings checked (:func:`robustness_options`; ``pooled`` null
    follows the planned ``transfer_mode``): the :attr:`ScoringTarget.robustness` of the selection."""
    return robustness_options(**dict(robustness or {}), transfer_mode=transfer_mode)


def _score_candidates(bank_root, target_root, output_dir, image_size, estimators, max_cases, seed, device, fold,
                      n_folds, split_seed, splits_file, robustness, transfer_mode, random_init, progress) -> list[dict]:
    """Rows of every candidate (the bank's entries; with ``random_init`` first the random-init
    encoder(s), epoch 0) on the selection images, into ``output_dir``: every estimator, robustness
    with the bundle's settings included, in the one scoring loop
    (:func:`~medxfer.transferability.score.score_into`, resumable per model), one bank at a time."""
    size = [int(image_size)] * 2 if np.isscalar(image_size) else [int(v) for v in image_size]
    output_dir = Path(output_dir)
    records, labels = selection_records(target_root, fold, n_folds, split_seed, splits_file, max_cases)
    options = _robustness_options(robustness, transfer_mode)
    key = {**seg2d_key(target_root, size, None), "cases": [r["id"] for r in records]}
    target = None

    def make_target() -> ScoringTarget:
        nonlocal target
        if target is None:
            target = _selection_target(target_root, records, labels, size, options)
        return target

    banks = [Path(bank_root)]
    if random_init:
        banks.insert(0, _random_init_bank(bank_root, output_dir / "random_init" / "bank", seed))
    rows = []
    for bank in banks:
        where = output_dir if bank == Path(bank_root) else output_dir / "random_init"
        names = ModelBank.open(bank).names()
        # score_into's own scores.json is rewritten below with every candidate: keep this bank's rows
        got, _ = score_into(where, bank, make_target, key, list(estimators), SamplingConfig(seed=seed), device=device,
                            seed=seed, overwrite=True, progress=progress, robustness=options,
                            meta={"bank_root": str(bank), "target": str(target_root), "estimators": list(estimators)})
        rows += [r for r in got if r["model"] in names]
    write_scores(rows, output_dir, {"bank_root": str(bank_root), "target": str(target_root),
                                    "estimators": list(estimators), "cases": [r["id"] for r in records],
                                    "fold": fold, "random_init": bool(random_init),
                                    "robustness": json.loads(json.dumps(robustness or {}, default=str))})
    return rows


def score_checkpoints(bank_root, target_root, image_size: int = 224, estimators: Sequence[str] = (
        "robustness", "ccfv", "logme", "gbc", "transrate"), entries: Sequence[str] | None = None, device=None,
        max_cases: int | None = None, seed: int = 0, progress: bool = True, fold: int | None = None,
        n_folds: int = 5, split_seed: int = 0, splits_file=None, robustness: dict | None = None,
        transfer_mode: str = "encoder_only") -> list[dict]:
    """Scores of every encoder checkpoint of the bank on the 2D target (offline selection), no files
    written, every estimator in the one scoring loop (:func:`medxfer.transferability.score.score_target`).

    Images: :func:`selection_records` (``fold`` None: every image of the folder; ``max_cases``
    None: all of them). Robustness: colour-jittered images in ``[0, 1]``, normalised like the
    pretraining, the second-to-last encoder level, ``robustness`` settings as
    :func:`~medxfer.transferability.robustness.robustness_options` (default: the authors' jitter,
    cosine distance, margin 0.5, unpooled for ``encoder_only`` fine-tuning). The feature-based
    estimators (CC-FV, LogME, GBC, TransRate) read the encoder's last two levels at sampled pixels
    (an encoder checkpoint has no decoder; LEEP / NCE need a segmentation head and are refused)."""
    size = [int(image_size)] * 2 if np.isscalar(image_size) else [int(v) for v in image_size]
    records, labels = selection_records(target_root, fold, n_folds, split_seed, splits_file, max_cases)
    target = _selection_target(target_root, records, labels, size, _robustness_options(robustness, transfer_mode))
    return score_target(bank_root, target, list(estimators), SamplingConfig(seed=seed), entries, device, progress, seed)


def select_checkpoint(bank_root, target_root, output_dir, image_size: int = 224,
                      estimators: Sequence[str] = ("robustness", "ccfv", "logme", "gbc", "transrate"),
                      select_by: str = "robustness", start_epoch: int = 0, dice_csv=None, device=None,
                      max_cases: int | None = None, seed: int = 0, fold: int | None = 0, n_folds: int = 5,
                      split_seed: int = 0, splits_file=None, robustness: dict | None = None,
                      transfer_mode: str = "encoder_only", random_init: bool = True) -> dict:
    """Score every candidate (as :func:`score_checkpoints`), pick the one with the highest
    ``select_by`` score among epochs ``>= start_epoch``, write ``scores.csv`` / ``scores.json`` /
    ``selection.json``; with ``dice_csv`` (``model,dice`` of fine-tuned checkpoints) also the
    estimators' weighted tau and TIS (``te_evaluation.*``).

    Candidates: the bank's checkpoints and, with ``random_init`` (default), the randomly initialised
    encoder (``<arch>_random_init``, epoch 0, built in ``output_dir/random_init/bank``): the thesis'
    offline method chooses among every measured checkpoint, "no pretraining" included; only the
    online rule disregards the random init (``start_epoch`` 1 there; 1 here leaves it out too).
    Images: the training part of the fine-tuning ``fold`` (``n_folds``, ``split_seed``,
    ``splits_file`` as the downstream ``train.yaml``; ``fold`` None: the whole folder), all of them
    when ``max_cases`` is None. ``robustness``: :func:`robustness_options` settings.

    The scoring resumes (:func:`medxfer.transferability.score.score_into`, per model, robustness
    settings part of the key): a killed selection run again scores only the models not scored yet;
    scores of other settings in ``output_dir`` are replaced. ``selection.json`` is written last."""
    if select_by not in estimators:
        raise ValueError(f"select_by {select_by!r} must be one of the estimators {list(estimators)}")
    output_dir = Path(output_dir)
    rows = _score_candidates(bank_root, target_root, output_dir, image_size, estimators, max_cases, seed, device,
                             fold, n_folds, split_seed, splits_file, robustness, transfer_mode, random_init, False)
    eligible = [r for r in rows if (r["epoch"] or 0) >= start_epoch and np.isfinite(r.get(select_by, np.nan))]
    if not eligible:
        raise ValueError(f"no checkpoint from epoch {start_epoch} on has a finite {select_by} score")
    best = max(eligible, key=lambda r: r[select_by])
    selection = {"select_by": select_by, "model": best["model"], "epoch": best["epoch"], "score": best[select_by],
                 "start_epoch": start_epoch, "random_init": bool(random_init),
                 "per_estimator": {e: max((r for r in eligible if np.isfinite(r.get(e, np.nan))),
                                          key=lambda r: r[e], default={"model": None})["model"] for e in estimators}}
    if selection["model"].endswith(RANDOM_INIT) or f"_{RANDOM_INIT}_" in selection["model"]:
        selection["note"] = "the random initialisation scores highest: train with transfer_mode scratch"
    if dice_csv is not None:
        scores_file = output_dir / "scores.json"
        with open(dice_csv, newline="") as fh:
            measured = {r.get("model") for r in csv.DictReader(fh)}
        random_rows = [r["model"] for r in rows if r["epoch"] == 0 and RANDOM_INIT in r["model"]]
        if random_rows and not set(random_rows) <= measured:  # no Dice of the random init: leave it out of TIS
            write_scores([r for r in rows if r["model"] not in random_rows], output_dir / "te_scores",
                         {"target": str(target_root), "estimators": list(estimators)})
            scores_file = output_dir / "te_scores" / "scores.json"
        result = evaluate_estimators(table_from_files(scores_file, dice_csv), list(estimators))
        write_report(result, output_dir)
        selection["tis"] = {e: result["mean"][e]["tis"] for e in estimators if e in result.get("mean", {})}
    atomic_write_text(output_dir / "selection.json", json.dumps(selection, indent=1, default=float) + "\n")
    return selection


def discrete_postprocessing(labels):
    """Evaluator postprocessing: binary -> sigmoid > 0.5 (one channel, the foreground); several
    classes -> argmax one-hot (background channel first, left out of the mean Dice)."""

    if is_binary(labels):
        return Compose([Activationsd("pred", sigmoid=True), AsDiscreted("pred", threshold=0.5)])
    n = len(labels)
    return Compose([AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=[n, n])])


#: run.json fields that define the trained network: a folder holding other values is another run.
RUN_NETWORK_FIELDS = ("arch", "arch_kwargs", "labels", "image_size", "transfer")


def _transfer_source(transfer: dict | None) -> dict | None:
    """The transfer source as run.json records it: bank root (absolute) + entry (+ its arch,
    epoch and sha256 from the manifest) or an init checkpoint (absolute), and the mode;
    ``None`` for ``scratch``."""
    transfer = {k: v for k, v in dict(transfer or {}).items() if v is not None}
    if not transfer or transfer.get("mode") == "scratch":
        return None
    if transfer.get("bank_root") and transfer.get("init_entry"):
        bank = ModelBank.open(transfer["bank_root"])
        entry = bank.get(transfer["init_entry"])
        transfer.update(bank_root=str(Path(transfer["bank_root"]).resolve()), entry_arch=entry.arch,
                        entry_epoch=entry.epoch, entry_sha256=entry.sha256)
    elif isinstance(transfer.get("init_checkpoint"), (str, Path)):
        transfer["init_checkpoint"] = str(Path(transfer["init_checkpoint"]).resolve())
    elif "init_checkpoint" in transfer:  # weights passed in memory
        transfer["init_checkpoint"] = "<state dict>"
    return json.loads(json.dumps(transfer))


def save_run_info(output_dir, arch: str, labels, image_size, arch_kwargs: dict | None = None,
                  transfer: dict | None = None, settings: dict | None = None) -> Path:
    """``run.json`` of a training run: evaluate / inference read it, so they need only the folder.

    Holds the network (``arch``, ``arch_kwargs``, 3 input channels, ``out_channels``,
    ``image_size``), the classes (``labels``), the ``transfer`` source (``init_entry`` of
    ``bank_root`` with the entry's sha256, or ``init_checkpoint``, and the mode; ``null`` from
    scratch) and the run's ``settings`` (data root, fold, seeds, epochs, ...). A folder holding a
    run of another network is refused (FileExistsError, one line). Written atomically.
    """
    path = Path(output_dir) / "run.json"
    record = {"workflow": "seg2d_transfer/train", "arch": arch,
              "arch_kwargs": json.loads(json.dumps(dict(arch_kwargs or {}))), "in_channels": 3,
              "out_channels": seg_out_channels(labels), "labels": {str(k): v for k, v in dict(labels).items()},
              "image_size": json.loads(json.dumps(image_size)), "transfer": _transfer_source(transfer),
              "settings": json.loads(json.dumps({k: str(Path(v).resolve()) if k == "data_root" and v else v
                                                 for k, v in dict(settings or {}).items()}, default=str)),
              "model": "model.pt: best validation checkpoint (network state dict; model.json says which epoch, or "
                       "that it holds the final weights when no validation ran)"}
    if path.exists():
        existing = read_json(path)
        changed = [k for k in RUN_NETWORK_FIELDS if k in existing and existing[k] != record[k]]
        if changed:
            raise FileExistsError(f"{path}: this output_dir holds a run with {changed[0]} {existing[changed[0]]!r}, "
                                  f"not {record[changed[0]]!r}; choose another output_dir")
    write_json(path, record)
    return path


class Seg2DRun:
    """A trained ``train.yaml`` run folder: its network (``model.pt``, weights only) and classes."""

    def __init__(self, run_dir, device=None, checkpoint: str = "model.pt"):
        self.run_dir = Path(run_dir)
        info = read_json(self.run_dir / "run.json", "not a seg2d_transfer training folder (no run.json)")
        self.arch, self.image_size = info["arch"], info["image_size"]
        self.labels = {int(k): v for k, v in info["labels"].items()}
        self.device = resolve_device(device)
        self.network = build_network(self.arch, 3, seg_out_channels(self.labels), self.image_size,
                                     **info.get("arch_kwargs", {}))
        self.network.load_state_dict(read_checkpoint(self.run_dir / checkpoint))
        self.network.to(self.device).eval()

    @torch.no_grad()
    def predict(self, image_path) -> np.ndarray:
        """``(H, W)`` uint8 label indices at the image's own size: logits at ``image_size`` resized
        bilinearly back to ``(H, W)``, then sigmoid > 0.5 (binary) or argmax."""
        x = seg2d_transforms("infer", self.image_size)({"image": str(image_path)})["image"]
        x = convert_to_tensor(x, track_meta=False)[None].to(self.device)
        return logits_to_mask(self.network(x)[0], image_path, is_binary(self.labels))


def logits_to_mask(logits: torch.Tensor, image_path, binary: bool) -> np.ndarray:
    """``(C, h, w)`` logits of one image -> ``(H, W)`` uint8 label indices at the size of the image
    file: resized bilinearly (``align_corners=False``), then sigmoid > 0.5 (binary) or argmax."""
    with Image.open(image_path) as img:
        width, height = img.size
    logits = torch.nn.functional.interpolate(torch.as_tensor(logits)[None].float(), size=(height, width),
                                             mode="bilinear", align_corners=False)[0]
    if binary:
        return (torch.sigmoid(logits[0]) > 0.5).to(torch.uint8).cpu().numpy()
    return logits.argmax(0).to(torch.uint8).cpu().numpy()


def sigmoid_with_background(logits: torch.Tensor) -> torch.Tensor:
    """``(B, 1, ...)`` binary logits -> ``(B, 2, ...)`` ``[1 - sigmoid, sigmoid]`` (thesis section 2.4:
    the background's probability of a binary network is ``1 - y^_1``), MONAI ``DiceLoss``'s
    ``other_act`` for the thesis loss (eq. 2.10, background included)."""
    p = torch.sigmoid(logits)
    return torch.cat([1.0 - p, p], dim=1)


class _BinaryWithBackground(torch.nn.Module):
    """A MONAI loss on ``[1 - sigmoid, sigmoid]`` of one-channel logits and ``[1 - y, y]`` of a 0/1
    label (MONAI's ``DiceLoss`` checks the channels before its ``other_act``, so the two channels
    are made here)."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = (target > 0).to(logits.dtype)
        return self.loss(sigmoid_with_background(logits), torch.cat([1.0 - target, target], dim=1))


def thesis_dice_loss(binary: bool) -> torch.nn.Module:
    """The thesis' downstream loss (eq. 2.10): the mean over every class, background included, of
    the squared-denominator Dice loss (eq. 1.10, smoothing 1e-5 as the authors), computed along the
    batch: MONAI ``DiceLoss(include_background=True, squared_pred=True, batch=True)`` on softmax
    probabilities (several classes, one-hot label) or, binary, on ``[1 - sigmoid, sigmoid]``."""
    if binary:
        return _BinaryWithBackground(DiceLoss(include_background=True, squared_pred=True, batch=True,
                                              smooth_nr=1e-5, smooth_dr=1e-5))
    return DiceLoss(include_background=True, to_onehot_y=True, softmax=True, squared_pred=True, batch=True,
                    smooth_nr=1e-5, smooth_dr=1e-5)


def inference_network(run_dir, arch=None, arch_kwargs=None, image_size=None, labels=None) -> dict:
    """The network settings of ``inference.yaml``: ``{"arch", "arch_kwargs", "image_size", "labels"}``.

    Values given in the config win; the ones left ``null`` come from ``run_dir/run.json`` when the
    folder is a training run, else train.yaml's defaults (``resnet50_attention_unet``, ``{}``, 224,
    binary ``{0: background, 1: foreground}``). A given value contradicting ``run.json`` is refused
    (one line): the weights would not fit the network."""
    given = {"arch": arch, "arch_kwargs": arch_kwargs, "image_size": image_size, "labels": labels}
    defaults = {"arch": "resnet50_attention_unet", "arch_kwargs": {}, "image_size": 224,
                "labels": {0: "background", 1: "foreground"}}
    info = Path(run_dir) / "run.json" if run_dir is not None else None
    recorded = read_json(info, "") if info is not None and info.is_file() else {}
    out = {}
    for key, value in given.items():
        if key == "labels" and value is not None:
            value = {int(k): v for k, v in dict(value).items()}
        have = recorded.get(key)
        if key == "labels" and have is not None:
            have = {int(k): v for k, v in have.items()}
        if value is not None and have is not None and json.loads(json.dumps(value)) != json.loads(json.dumps(have)):
            raise ValueError(f"{info}: the run was trained with {key} {have!r}, not {value!r}; leave {key} unset")
        out[key] = value if value is not None else (have if have is not None else defaults[key])
    return out


def inference_datalist(input_path, output_dir, overwrite: bool = False) -> list[dict]:
    """``[{"image": path}]`` of every image of ``input_path`` (a file or a folder), after the door
    check (an unreadable image is named before any prediction); a prediction already in
    ``output_dir`` (``<stem>.png``) is refused unless ``overwrite``."""
    images = image_files(input_path)
    check_image_files(images)
    existing = [Path(output_dir) / f"{p.stem}.png" for p in images if (Path(output_dir) / f"{p.stem}.png").exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: exists; pass overwrite=True (--overwrite true) to replace predictions")
    return [{"image": str(p)} for p in images]


class MaskWriter:
    """Evaluator postprocessing of ``inference.yaml``: each image's logits -> its mask at the
    image's own size (:func:`logits_to_mask`), written atomically as ``<output_dir>/<stem>.png``
    (label indices; 0/255 for a binary network). MONAI's ``Invertd`` + ``SaveImaged`` would do the
    resize and the writing too (the exported zoo bundle uses them); this keeps the masks identical
    to :meth:`Seg2DRun.predict` and never leaves half a file under the final name."""

    def __init__(self, output_dir, binary: bool):
        self.output_dir, self.binary = Path(output_dir), bool(binary)

    def __call__(self, item: dict) -> dict:
        image_path = item["image"].meta["filename_or_obj"]
        mask = logits_to_mask(item["pred"], image_path, self.binary)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.output_dir / f"{Path(image_path).stem}.png") as tmp:
            Image.fromarray(mask * (255 if self.binary else 1), mode="L").save(tmp, format="PNG")
        return item


def evaluate_seg2d(run_dir, data_root, output_dir=None, fold: int = 0, device=None) -> dict:
    """Per-image Dice and HD95 (pixels) of every foreground class on the run's validation fold, at
    the original image size (:mod:`medxfer.metrics.segmentation` conventions: empty vs empty is
    NaN and left out of the means). Writes ``metrics.csv`` / ``metrics.json`` into ``output_dir``
    (default ``<run_dir>/evaluation``)."""


    run = Seg2DRun(run_dir, device)
    lists = seg2d_datalists(data_root, fold, splits_file=run.run_dir / "splits.json")
    if lists["labels"] != run.labels:
        raise DatasetError(data_root, f"classes {lists['labels']} differ from the run's {run.labels}")
    rows = []
    for record in lists["val"]:
        pred = run.predict(record["image"])
        gt = read_mask(record["label"], run.labels)
        rows.append({"case": record["id"], **case_metrics(torch.as_tensor(pred), torch.as_tensor(gt), [1.0, 1.0],
                                                          run.labels)})
    out = Path(output_dir) if output_dir else run.run_dir / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_cases(rows)
    with atomic_path(out / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(out / "metrics.json", {"cases": rows, "summary": summary, "fold": fold,
                                      "hd95_unit": "pixels of the original image"})
    return summary


def predict_folder(run_dir, input_path, output_dir, device=None, overwrite: bool = False) -> list[Path]:
    """Masks of every image of ``input_path`` (a file or a folder) as ``<output_dir>/<stem>.png``:
    label indices, 0/255 for a binary run. Existing files are refused unless ``overwrite``."""


    images = image_files(input_path)
    check_image_files(images)  # the door check: an unreadable image is named before any prediction
    output_dir = Path(output_dir)
    targets = [output_dir / f"{p.stem}.png" for p in images]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: exists; pass overwrite=True (--overwrite true) to replace predictions")
    run = Seg2DRun(run_dir, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    scale = 255 if is_binary(run.labels) else 1
    for image, target in zip(images, targets):
        with atomic_path(target) as tmp:  # never half a mask under the final name
            Image.fromarray(run.predict(image) * scale, mode="L").save(tmp, format="PNG")
    return targets
