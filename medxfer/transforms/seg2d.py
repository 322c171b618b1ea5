"""Preprocessing of 2D images for the thesis' networks (SPEC section 7): pretraining classification
and downstream segmentation, as MONAI dictionary transforms.

Both chains load with PIL rows first (:func:`medxfer.transforms.dermoscopy.image_reader`, RGB
conversion: a grey image becomes 3 identical channels, which the ImageNet-style encoders expect),
scale 0..255 to 0..1, resize to ``size`` (bilinear with anti-aliasing for the image, nearest for
masks), augment in ``"train"`` mode (same draw for image and mask; ``augment``: ``"thesis"`` =
thesis section 2.4, a rotation by an angle uniform in ``[0, pi]`` (MONAI ``RandRotated``, every
image, zero padding, as the authors' ``RandomRotation`` with ``p=1``) and a flip of the rows with
probability 1/2 (their ``RandomFlip(vertical=True)``); ``"medxfer_v1"`` = medxfer's chain before
issue 17: flips of both axes and a small rotation / zoom, ``RandAffined``, each with ``prob``)
and normalise per channel (ImageNet statistics by default, as the thesis' encoders were pretrained
with). Masks become label indices: a binary dataset's 0/255 masks map to 0/1
(:func:`medxfer.data.seg2d.mask_to_index`).

``mode="infer"`` loads the image only; the resize is recorded in the MetaTensor, so
``monai.transforms.Invertd`` brings a prediction back to the image's own size.
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    NormalizeIntensityd,
    RandAffined,
    RandFlipd,
    RandRotated,
    Resized,
    ScaleIntensityRanged,
)

from medxfer.data.seg2d import mask_to_index
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD, _pair, image_reader, mask_reader

__all__ = ["SEG2D_AUGMENTATIONS", "classification_transforms", "seg2d_transforms", "unnormalized_images"]

_MODES = ("train", "eval", "infer")
#: ``augment=`` of :func:`seg2d_transforms`: the thesis' downstream augmentation, or medxfer's before issue 17.
SEG2D_AUGMENTATIONS = ("thesis", "medxfer_v1")


def _image_chain(size, anti_aliasing: bool = True) -> list:
    return [LoadImaged("image", reader=image_reader(), image_only=True),
            EnsureChannelFirstd("image", channel_dim=-1),
            ScaleIntensityRanged("image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
            Resized("image", spatial_size=_pair(size), mode="bilinear", anti_aliasing=anti_aliasing)]


def _augment(keys: Sequence[str], modes: Sequence[str], prob: float) -> list:
    return [RandFlipd(keys, prob=prob, spatial_axis=0), RandFlipd(keys, prob=prob, spatial_axis=1),
            RandAffined(keys, prob=prob, rotate_range=float(np.deg2rad(15)), scale_range=(0.1, 0.1),
                        mode=list(modes), padding_mode="zeros")]


def _thesis_augment(keys: Sequence[str], modes: Sequence[str]) -> list:
    """Thesis section 2.4: rotation by ``U[0, pi]`` (always) and a row flip with probability 1/2.
    The thesis' IDRiD-only colour jitter during training is not part of it (see the model card)."""
    return [RandRotated(keys, range_x=(0.0, float(np.pi)), prob=1.0, keep_size=True, mode=list(modes),
                        padding_mode="zeros"),
            RandFlipd(keys, prob=0.5, spatial_axis=0)]


def classification_transforms(mode: str = "train", size: int | Sequence[int] = 224, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, prob: float = 0.5) -> Compose:
    """Pretraining chain: ``{"image": file, "label": class index}`` -> image ``(3, H, W)`` float32
    normalised, label int64 scalar."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    chain = _image_chain(size)
    if mode == "train":
        chain += _augment(["image"], ["bilinear"], prob)
    chain.append(NormalizeIntensityd("image", subtrahend=list(mean), divisor=list(std), channel_wise=True))
    chain.append(EnsureTyped("image", dtype=torch.float32))
    if mode != "infer":
        chain.append(EnsureTyped("label", dtype=torch.int64, track_meta=False))
    return Compose(chain)


def _to_index(mask, labels):
    """Mask values -> label indices (picklable, for DataLoader workers)."""
    index = mask_to_index(np.asarray(mask), labels)
    return mask.new_tensor(index) if isinstance(mask, torch.Tensor) else index


def seg2d_transforms(mode: str = "train", size: int | Sequence[int] = 224, labels: Mapping[int, str] | None = None,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, prob: float = 0.5, augment: str = "thesis") -> Compose:
    """Segmentation chain: ``{"image", "label": mask file}`` -> image ``(3, H, W)`` float32
    normalised and label ``(1, H, W)`` float32 label indices (0..K; 0/255 binary masks -> 0/1).

    Args:
        labels: the dataset's ``{value: name}`` (:func:`medxfer.data.seg2d.load_seg2d`); two
            entries = binary (every non-zero mask value is foreground).
        augment: ``"thesis"`` (default) or ``"medxfer_v1"`` (module docstring); ``prob`` is the
            probability of each ``"medxfer_v1"`` augmentation.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if augment not in SEG2D_AUGMENTATIONS:
        raise ValueError(f"augment (the train recipe) must be one of {list(SEG2D_AUGMENTATIONS)}, got {augment!r}")
    chain = _image_chain(size)
    if mode != "infer":
        if labels is None:
            raise ValueError("seg2d_transforms needs the dataset labels for train / eval")
        labels = dict(labels)
        chain += [LoadImaged("label", reader=mask_reader(), image_only=True),
                  EnsureChannelFirstd("label", channel_dim="no_channel"),
                  Lambdad("label", func=partial(_to_index, labels=labels)),
                  Resized("label", spatial_size=_pair(size), mode="nearest-exact")]
        if mode == "train":
            keys, modes = ["image", "label"], ["bilinear", "nearest"]
            chain += _thesis_augment(keys, modes) if augment == "thesis" else _augment(keys, modes, prob)
    chain.append(NormalizeIntensityd("image", subtrahend=list(mean), divisor=list(std), channel_wise=True))
    keys = ["image"] + (["label"] if mode != "infer" else [])
    chain.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(chain)


def unnormalized_images(records, size: int | Sequence[int] = 224, max_images: int | None = None) -> torch.Tensor:
    """``(N, 3, H, W)`` images in ``[0, 1]`` (no normalisation), for the robustness score's colour
    jitter (:func:`medxfer.transforms.jitter.color_jitter`); the first ``max_images`` records."""
    chain = Compose(_image_chain(size))
    records = list(records)[:max_images] if max_images else list(records)
    if not records:
        raise ValueError("no images to load")
    return torch.stack([torch.as_tensor(np.asarray(chain({"image": r["image"]})["image"]), dtype=torch.float32)
                        for r in records])
