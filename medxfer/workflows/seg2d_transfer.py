"""Helpers the ``bundles/seg2d_transfer`` configs call (thesis chapters 2 and 4; SPEC sections 7-8).

Workflow of checkpoint selection for 2D segmentation transfer:

1. ``pretrain_encoder``: an encoder (of ``unet2d``, ``resnet50_attention_unet`` or ``swin_unet``)
   with a classification head (:class:`medxfer.networks.seg2d.EncoderClassifier`) is trained on a
   labelled class-per-folder image set; checkpoints at chosen epochs go into a model bank (same
   manifest as the 3D bank). Optionally the online rule (:class:`medxfer.handlers.RobustnessEarlyStopping`)
   scores robustness on the target images and stops at its first local maximum.
2. ``select_checkpoint``: every bank checkpoint is scored on the target segmentation set without
   fine-tuning (:func:`score_checkpoints`): robustness (thesis eq. 4.2, colour jitter of the target
   images, second-to-last encoder level) and the feature-based estimators on the encoder's last two
   levels; the highest robustness is the selection; TIS is reported when fine-tuned Dice is given.
3. ``train``: the segmentation network initialised from a checkpoint (encoder) and fine-tuned,
   ``full`` or ``decoder_only`` (frozen encoder); Dice loss over classes (sigmoid for a binary
   target, softmax for several classes), SGD momentum 0.9, weight decay 1e-4, poly decay 0.9.
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
from medxfer.transferability.score import score_into, score_target, seg2d_key, seg2d_target
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD
from medxfer.transforms.seg2d import seg2d_transforms, unnormalized_images

__all__ = ["SEG2D_TRANSFER_MODES", "classification_datalists", "seg2d_datalists", "is_binary", "seg_out_channels",
           "seg2d_network", "target_images", "online_selection_handlers", "pretraining_settings", "run_pretraining",
           "score_checkpoints", "select_checkpoint",
           "discrete_postprocessing", "save_run_info", "Seg2DRun", "evaluate_seg2d", "predict_folder"]

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


def target_images(data_root, image_size, max_images: int = 16) -> torch.Tensor:
    """``(N, 3, H, W)`` target images in ``[0, 1]`` for the robustness score (first ``max_images``
    of a 2D segmentation folder, or of a class-per-folder set)."""
    records, _ = load_seg2d(data_root)
    check_seg2d_records(data_root, records[:max_images])
    return unnormalized_images(records, image_size, max_images)


def online_selection_handlers(enabled: bool, network, arch: str, target_root, image_size, output_dir,
                              epochs=None, max_images: int = 16, seed: int = 0, mean=None, std=None) -> list:
    """``[RobustnessEarlyStopping]`` for the pretraining trainer when ``enabled`` (else ``[]``)."""
    if not enabled:
        return []
    if target_root is None:
        raise ValueError("online selection needs target_root (the target segmentation images)")
    images = target_images(target_root, image_size, max_images)
    return [RobustnessEarlyStopping(network, arch_layout(arch, network).penultimate_encoder, images,
                                    normalize=(mean or IMAGENET_MEAN, std or IMAGENET_STD), epochs=epochs,
                                    output_dir=output_dir, seed=seed, mode="color")]


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


def score_checkpoints(bank_root, target_root, image_size: int = 224, estimators: Sequence[str] = (
        "robustness", "ccfv", "logme", "gbc", "transrate"), entries: Sequence[str] | None = None, device=None,
        max_cases: int | None = 16, seed: int = 0, progress: bool = True) -> list[dict]:
    """Scores of every encoder checkpoint of the bank on the 2D target (offline selection): the one
    scoring loop, :func:`medxfer.transferability.score.score_target`, on
    :func:`~medxfer.transferability.score.seg2d_target`.

    Robustness: colour-jittered target images in ``[0, 1]``, normalised like the pretraining, the
    second-to-last encoder level, pooled (thesis chapter 4). The feature-based estimators
    (CC-FV, LogME, GBC, TransRate) read the encoder's last two levels at sampled pixels (an encoder
    checkpoint has no decoder; LEEP / NCE need a segmentation head and are refused for it).
    """
    return score_target(bank_root, seg2d_target(target_root, image_size, max_cases), estimators,
                        SamplingConfig(seed=seed), entries, device, progress, seed)


def select_checkpoint(bank_root, target_root, output_dir, image_size: int = 224,
                      estimators: Sequence[str] = ("robustness", "ccfv", "logme", "gbc", "transrate"),
                      select_by: str = "robustness", start_epoch: int = 1, dice_csv=None, device=None,
                      max_cases: int | None = 16, seed: int = 0) -> dict:
    """Score the bank (as :func:`score_checkpoints`), pick the checkpoint with the highest ``select_by``
    score among epochs ``>= start_epoch`` (random init excluded, thesis section 4.2), write
    ``scores.csv`` / ``scores.json`` / ``selection.json``; with ``dice_csv`` (``model,dice`` of
    fine-tuned checkpoints) also the estimators' weighted tau and TIS (``te_evaluation.*``).

    The scoring resumes (:func:`medxfer.transferability.score.score_into`): a killed selection run
    again scores only the checkpoints not scored yet; scores of other settings in ``output_dir``
    are replaced. ``selection.json`` is written last."""
    if select_by not in estimators:
        raise ValueError(f"select_by {select_by!r} must be one of the estimators {list(estimators)}")
    output_dir = Path(output_dir)
    # resumable (score_into): models scored before for the same inputs are read back, not scored again
    rows, _ = score_into(output_dir, bank_root, lambda: seg2d_target(target_root, image_size, max_cases),
                         seg2d_key(target_root, image_size, max_cases), estimators, SamplingConfig(seed=seed),
                         device=device, seed=seed, overwrite=True,
                         meta={"bank_root": str(bank_root), "target": str(target_root), "estimators": list(estimators)})
    eligible = [r for r in rows if (r["epoch"] or 0) >= start_epoch and np.isfinite(r.get(select_by, np.nan))]
    if not eligible:
        raise ValueError(f"no checkpoint from epoch {start_epoch} on has a finite {select_by} score")
    best = max(eligible, key=lambda r: r[select_by])
    selection = {"select_by": select_by, "model": best["model"], "epoch": best["epoch"], "score": best[select_by],
                 "start_epoch": start_epoch,
                 "per_estimator": {e: max((r for r in eligible if np.isfinite(r.get(e, np.nan))),
                                          key=lambda r: r[e], default={"model": None})["model"] for e in estimators}}
    if dice_csv is not None:
        result = evaluate_estimators(table_from_files(output_dir / "scores.json", dice_csv), list(estimators))
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


        with Image.open(image_path) as img:
            width, height = img.size
        x = seg2d_transforms("infer", self.image_size)({"image": str(image_path)})["image"]
        x = convert_to_tensor(x, track_meta=False)[None].to(self.device)
        logits = torch.nn.functional.interpolate(self.network(x).float(), size=(height, width), mode="bilinear",
                                                 align_corners=False)[0]
        if is_binary(self.labels):
            return (torch.sigmoid(logits[0]) > 0.5).to(torch.uint8).cpu().numpy()
        return logits.argmax(0).to(torch.uint8).cpu().numpy()


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
