"""CT / MR preprocessing chains for MSD tasks, built from the plans of :mod:`medxfer.planning`.

All steps are MONAI dictionary transforms (SPEC section 3):

1. ``LoadImaged`` + ``EnsureChannelFirstd`` -> ``(C, X, Y, Z)``;
2. ``Orientationd("RAS")``;
3. ``Spacingd(pixdim=plans["target_spacing"])`` — bilinear for images, nearest for labels;
4. normalisation per channel from the plans:
   * CT (nnU-Net ``CTNormalization``): clip to the foreground 0.5 / 99.5 percentiles, then
     ``(x - mean) / std``. Written as one ``ScaleIntensityRanged`` mapping ``a_min -> (a_min - mean)
     / std`` and ``a_max -> (a_max - mean) / std`` with ``clip=True``, which is exactly that formula;
   * MR (``ZScoreNormalization``): per-image z-score, ``NormalizeIntensityd(channel_wise=True)``;
5. ``CropForegroundd`` on the body (CT: above -500 HU; MR: above 0), ``allow_smaller=True``
   (a body that touches the border is not padded with invented voxels);
6. training only: pad to the patch, ``RandCropByPosNegLabeld`` (positive:negative 1:1) at the
   plans' patch size, flips on every axis, in-plane 90-degree rotations when the patch is square
   in-plane, intensity scale and shift.

Evaluation/inference chains stop after step 5, so ``Invertd`` can map predictions back to the
original file geometry.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    SpatialPadd,
    Spacingd,
)

__all__ = ["msd_transforms", "train_augmentation", "normalization_transforms", "body_foreground", "RAS_LABELS", "CT_BODY_HU"]

#: Axis labels passed explicitly to ``Orientationd`` (MONAI warns its default will change).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: Voxels above this many HU are body (air is -1000, lung about -850).
CT_BODY_HU = -500.0


def body_foreground(x) -> np.ndarray:
    """MR foreground for cropping: voxels where any channel is above 0 (CT: :func:`ct_body_foreground`)."""
    return (x > 0).any(axis=0, keepdims=True) if x.ndim > 3 else x > 0


def ct_body_foreground(x):
    """CT foreground for cropping: voxels above :data:`CT_BODY_HU` (air and the table's air excluded)."""
    return x > CT_BODY_HU


def normalization_transforms(plans: dict, keys: str | Sequence[str] = "image") -> list[MapTransform]:
    """Per-channel intensity normalisation of the plans as MONAI transforms (see module docstring)."""
    norms = plans["normalization"]
    schemes = {n["scheme"] for n in norms}
    if len(norms) > 1 and len(schemes) > 1:
        raise ValueError(f"mixed normalisation schemes across channels are not supported: {sorted(schemes)}")
    scheme = norms[0]["scheme"]
    if scheme == "CT":
        if len(norms) != 1:
            raise ValueError("CT normalisation is defined for single-channel CT")
        n = norms[0]
        low, high, mean, std = float(n["clip"][0]), float(n["clip"][1]), float(n["mean"]), float(n["std"])
        return [ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=(low - mean) / std, b_max=(high - mean) / std, clip=True)]
    if scheme == "zscore":
        return [NormalizeIntensityd(keys, nonzero=False, channel_wise=True)]
    if scheme == "none":
        return []
    raise ValueError(f"unsupported normalisation scheme {scheme!r}")


def train_augmentation(patch_size: Sequence[int], image_key: str = "image", label_key: str = "label",
                       num_samples: int = 2, pos: float = 1.0, neg: float = 1.0) -> list[MapTransform]:
    """Step 6 of the module doc: pad to the patch, ``RandCropByPosNegLabeld``, flips, in-plane
    rotations (square in-plane patch), intensity scale / shift. Also the training tail after a bank
    entry's own preprocessing (:func:`medxfer.transforms.preprocessing.plans_transforms`)."""
    keys = [image_key, label_key]
    patch = [int(p) for p in patch_size]
    chain = [
        SpatialPadd(keys, spatial_size=patch),
        RandCropByPosNegLabeld(keys, label_key=label_key, spatial_size=patch, pos=pos, neg=neg,
                               num_samples=num_samples, image_key=image_key, image_threshold=-np.inf),
        *[RandFlipd(keys, prob=0.5, spatial_axis=a) for a in range(3)],
    ]
    if patch[0] == patch[1]:
        chain.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
    return chain + [RandScaleIntensityd(image_key, factors=0.1, prob=0.5),
                    RandShiftIntensityd(image_key, offsets=0.1, prob=0.5)]


def msd_transforms(plans: dict, mode: str = "train", image_key: str = "image", label_key: str | None = "label",
                   num_samples: int = 2, pos: float = 1.0, neg: float = 1.0) -> Compose:
    """The MSD preprocessing chain for ``mode`` in ``{"train", "eval", "infer"}``.

    ``eval`` keeps the label (validation with metrics); ``infer`` loads the image only.
    """
    if mode not in ("train", "eval", "infer"):
        raise ValueError(f"mode must be 'train', 'eval' or 'infer', got {mode!r}")
    with_label = mode != "infer" and label_key is not None
    keys = [image_key, label_key] if with_label else [image_key]
    interp = ("bilinear", "nearest") if with_label else ("bilinear",)
    ct = plans["normalization"][0]["scheme"] == "CT"
    chain = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        EnsureTyped(keys, dtype=None, track_meta=True),
        Orientationd(keys, axcodes="RAS", labels=RAS_LABELS),
        Spacingd(keys, pixdim=plans["target_spacing"], mode=interp),
        CropForegroundd(keys, source_key=image_key, select_fn=ct_body_foreground if ct else body_foreground,
                        allow_smaller=True),
        *normalization_transforms(plans, image_key),
    ]
    if mode == "train":
        chain += train_augmentation(plans["patch_size"], image_key, label_key, num_samples, pos, neg)
    return Compose(chain)
