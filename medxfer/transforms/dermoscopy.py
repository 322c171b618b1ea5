"""Dermoscopy (2D RGB, ISIC) preprocessing chains for TATL (SPEC section 6).

All steps are MONAI dictionary transforms over the records of :func:`medxfer.data.isic.load_isic`
(``{"image": jpg, "lesion": png, "attribute_<name>": png, ...}``):

1. load with PIL, **rows first**: ``PILReader(reverse_indexing=False)`` + ``EnsureChannelFirstd``
   gives the image ``(3, H, W)`` and each mask ``(1, H, W)``, ``H`` the image height. (MONAI's
   default ``PILReader`` swaps the two spatial axes, giving ``(C, W, H)``, "consistent with ITK";
   we keep the numpy / PIL row-column order so that ``out[:, r, c]`` is the pixel at row ``r``,
   column ``c`` of the file.) Images are converted to RGB, masks to 8-bit gray by PIL;
2. masks to 0/1 (any non-zero value is foreground, as in :mod:`medxfer.metrics.isic_task2`:
   ISIC masks are 0/255), image from 0..255 to 0..1;
3. resize to ``size`` (default 384 x 512, H x W; the paper's "386" is not divisible by 32):
   bilinear for the image, with MONAI's anti-aliasing (Gaussian smoothing before shrinking, so
   fine patterns such as pigment networks do not alias; about 2 s for a 3000 x 4000 image on
   2 CPU threads, deterministic, so cache it with ``CacheDataset`` / ``PersistentDataset``, or
   pass ``anti_aliasing=False`` for plain bilinear as in cv2 / Keras pipelines);
   ``nearest-exact`` for the masks (pixel centres map like bilinear's, so masks stay aligned with
   the image; torch's plain ``nearest`` is shifted by up to half a source pixel);
4. training only, on image and masks together (same random draw): flips (vertical and
   horizontal, each with probability ``prob``), one affine with rotation (+-``rotate_deg``), shift
   (+-``shift`` of the size) and zoom (1 +- ``zoom`` per axis, as Keras' ``zoom_range``), bilinear
   for the image, nearest for the masks, zero (black / background) padding; then on the image
   only brightness (``x * (1 + f)``, ``|f| <= brightness``) and contrast (scaling about the image
   mean, ``|f| <= contrast``), clipped back to 0..1. These are the augmentations the paper lists
   (rotation, flip, shift, brightness, zoom; section 5.7, Table 9); the ranges are ours;
5. per-channel normalisation ``(x - mean[c]) / std[c]`` on the 0..1 scale. Default: ImageNet
   statistics (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), which the ImageNet-pretrained
   EfficientNet-b0 encoder of TATL was trained with; :func:`dermoscopy_channel_stats` computes a
   dataset's own statistics ("centering and normalizing the pixel density per channel", paper
   section 5.2) to pass instead.

``mode="eval"`` runs steps 1-3 and 5 (no augmentation) and keeps the masks (validation loss at the training
resolution); ``mode="infer"`` loads the image only. Resizing is recorded in the MetaTensor, so
``monai.transforms.Invertd`` takes a prediction back to the original image size (SPEC section 6:
"final mask rescaled to the original size").

Evaluation at 256 x 256 (ISIC challenge, TATL section 5.2): predicted and ground-truth masks of an
image are **both resized to 256 x 256** (aspect ratio not kept), and the TP / FP / FN pixel counts
are taken at that size (then summed over the images of a fold by
:class:`medxfer.metrics.isic_task2.FoldScorer`). :func:`resize_for_scoring` does it for arrays
(prediction at any resolution, binary or probabilities); :func:`scoring_transforms` loads
ground-truth masks straight from the files at 256 x 256 (one resampling, not two).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from monai.data import PILReader
from monai.transforms import (
    AsDiscreted,
    Compose,
    ConcatItemsd,
    Lambdad,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    Resized,
    ScaleIntensityRanged,
    SpatialCrop,
)

from medxfer.transforms.lesion_crop import Box

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TRAIN_SIZE",
    "SCORING_SIZE",
    "dermoscopy_transforms",
    "scoring_transforms",
    "resize_for_scoring",
    "dermoscopy_channel_stats",
    "image_reader",
    "mask_reader",
    "CropToBoxd",
    "union_mask",
]

#: ImageNet per-channel (R, G, B) mean and standard deviation on the 0..1 scale (torchvision's values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Training resolution (H, W) of TATL (SPEC section 6).
TRAIN_SIZE = (384, 512)
#: Side of the square at which ISIC Task 2 scores are computed.
SCORING_SIZE = 256
_MODES = ("train", "eval", "infer")


def _to_rgb(img):
    """PIL converter: any image to 3-channel RGB (grayscale / RGBA / palette JPEGs and PNGs)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_gray(img):
    """PIL converter: any mask to single-channel 8-bit (``1`` -> 0/255, RGB -> luminance)."""
    return img if img.mode == "L" else img.convert("L")


def image_reader() -> PILReader:
    """PIL reader giving ``(H, W, 3)`` RGB arrays (rows first, see module docstring)."""
    return PILReader(converter=_to_rgb, reverse_indexing=False)


def mask_reader() -> PILReader:
    """PIL reader giving ``(H, W)`` 8-bit mask arrays (rows first)."""
    return PILReader(converter=_to_gray, reverse_indexing=False)


def _load(image_key: str | None, mask_keys: Sequence[str]) -> list:
    chain = []
    if image_key is not None:
        chain += [LoadImaged(image_key, reader=image_reader(), image_only=True),
                  EnsureChannelFirstd(image_key, channel_dim=-1)]
    if mask_keys:
        chain += [LoadImaged(mask_keys, reader=mask_reader(), image_only=True),
                  EnsureChannelFirstd(mask_keys, channel_dim="no_channel"),
                  AsDiscreted(mask_keys, threshold=0.5)]  # 0/255 (or 0/1) -> 0/1
    return chain


class CropToBoxd(MapTransform):
    """Crop the image and masks of a record to its lesion box (TATL stage 1 -> stages 2-3).

    ``data[box_key]`` is a :class:`medxfer.transforms.lesion_crop.Box` (or its ``to_dict()``) in
    pixels of the original image, e.g. from the Segment-Net (:func:`medxfer.transfer.tatl.segment_net_boxes`);
    a record without a box (or ``None``) is left whole. ``(C, H, W)`` in, ``(C, box.height,
    box.width)`` out, with MONAI's ``SpatialCrop`` (the crop is recorded in the MetaTensor). A box
    outside the image raises ValueError naming the image file.
    """

    def __init__(self, keys, box_key: str = "box", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key

    def __call__(self, data):
        d = dict(data)
        box = d.get(self.box_key)
        if box is None:
            return d
        box = box if isinstance(box, Box) else Box.from_dict(box)
        cropper = SpatialCrop(roi_start=(box.row0, box.col0), roi_end=(box.row1, box.col1))
        for key in self.key_iterator(d):
            try:
                box.check_inside(tuple(d[key].shape[1:]))
            except ValueError as e:
                source = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{source}: {e}") from None
            d[key] = cropper(d[key])
        return d


def union_mask(attribute_masks) -> np.ndarray | torch.Tensor:
    """Stage-2 target: the union (bitwise OR) of the attribute masks.

    Args:
        attribute_masks: ``(A, H, W)`` (or ``(B, A, H, W)`` with ``A`` on axis 1 for tensors of a
            batch) masks, anything > 0 is foreground.

    Returns:
        ``(1, H, W)`` (``(B, 1, H, W)``) of the same kind, values 0/1 in the input's dtype for
        tensors and ``uint8`` for arrays.
    """
    if isinstance(attribute_masks, torch.Tensor):
        axis = 1 if attribute_masks.dim() == 4 else 0
        return (attribute_masks > 0).any(dim=axis, keepdim=True).to(attribute_masks.dtype)
    masks = np.asarray(attribute_masks)
    if masks.ndim != 3:
        raise ValueError(f"attribute masks must be (A, H, W), got shape {masks.shape}")
    return (masks > 0).any(axis=0, keepdims=True).astype(np.uint8)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive entries, got {size}")
    return size


def dermoscopy_transforms(
    mode: str = "train",
    size: int | Sequence[int] | None = TRAIN_SIZE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    image_key: str = "image",
    mask_keys: str | Sequence[str] = ("lesion",),
    label_key: str | None = None,
    union: bool = False,
    box_key: str | None = None,
    prob: float = 0.5,
    rotate_deg: float = 30.0,
    shift: float = 0.1,
    zoom: float = 0.1,
    brightness: float = 0.2,
    contrast: float = 0.2,
    anti_aliasing: bool = True,
) -> Compose:
    """The dermoscopy chain for ``mode`` in ``{"train", "eval", "infer"}`` (see module docstring).

    Args:
        mode: ``"train"`` (augmented), ``"eval"`` (masks kept, no augmentation) or ``"infer"``
            (image only).
        size: output ``(H, W)`` (an int for a square); None keeps each image's own size.
        mean, std: per-channel (R, G, B) statistics on the 0..1 scale; ImageNet by default, or
            the output of :func:`dermoscopy_channel_stats`.
        image_key: record key of the RGB image file.
        mask_keys: record keys of the mask files (e.g. ``"lesion"`` or ``"attribute_globules"``);
            each becomes a ``(1, H, W)`` float 0/1 tensor. Ignored in ``"infer"`` mode.
        label_key: if given, the masks are also concatenated, in ``mask_keys`` order, into one
            ``(len(mask_keys), H, W)`` tensor under this key (multi-label target for the loss).
        union: with ``label_key``, the label is instead the union (bitwise OR) of the masks,
            ``(1, H, W)`` (:func:`union_mask`, the TATL stage-2 attribute-agnostic target).
        box_key: if given, records carrying a lesion box under this key are cropped to it right
            after loading (:class:`CropToBoxd`; TATL stages 2-3 see the Segment-Net crop).
        prob: probability of each random augmentation (train only).
        rotate_deg, shift, zoom: affine ranges: degrees, fraction of the size, scale +- per axis.
        brightness, contrast: ranges of the intensity factors (0 switches one off).
        anti_aliasing: smooth the image before shrinking it (step 3); masks never are.

    Returns:
        a :class:`monai.transforms.Compose`; call ``.set_random_state(seed)`` for reproducible
        augmentation. Outputs: ``image`` float32 ``(3, H, W)``, normalised; masks float32
        ``(1, H, W)`` in {0, 1}.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'train', 'eval' or 'infer', got {mode!r}")
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got {mean} and {std}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {std}")
    mask_keys = [mask_keys] if isinstance(mask_keys, str) else list(mask_keys or [])
    if mode == "infer":
        mask_keys = []
    if label_key is not None and not mask_keys and mode != "infer":
        raise ValueError("label_key needs at least one mask key")
    keys = [image_key, *mask_keys]

    chain = _load(image_key, mask_keys)
    if box_key is not None:
        chain.append(CropToBoxd(keys, box_key=box_key))
    chain.append(ScaleIntensityRanged(image_key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0))
    if size is not None:
        size = _pair(size)
        chain.append(Resized(keys, spatial_size=size, mode=["bilinear"] + ["nearest-exact"] * len(mask_keys),
                             anti_aliasing=[bool(anti_aliasing)] + [False] * len(mask_keys)))
    if mode == "train":
        chain += [
            RandFlipd(keys, prob=prob, spatial_axis=0),
            RandFlipd(keys, prob=prob, spatial_axis=1),
        ]
        if rotate_deg or shift or zoom:
            spatial = size  # translate range in pixels needs the size; per image if size is None
            chain.append(RandAffined(
                keys,
                prob=prob,
                rotate_range=float(np.deg2rad(rotate_deg)),
                translate_range=None if spatial is None else (shift * spatial[0], shift * spatial[1]),
                scale_range=(zoom, zoom),
                mode=["bilinear"] + ["nearest"] * len(mask_keys),
                padding_mode="zeros",
            ))
        if brightness:
            chain.append(RandScaleIntensityd(image_key, factors=brightness, prob=prob))
        if contrast:
            chain.append(RandScaleIntensityFixedMeand(image_key, factors=contrast, fixed_mean=True, prob=prob))
        if brightness or contrast:
            chain.append(ScaleIntensityRanged(image_key, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True))
    chain.append(NormalizeIntensityd(image_key, subtrahend=mean, divisor=std, channel_wise=True))
    if label_key is not None and mask_keys:
        chain.append(ConcatItemsd(mask_keys, name=label_key, dim=0))
        if union:
            chain.append(Lambdad(label_key, func=union_mask))
    chain.append(EnsureTyped(keys + ([label_key] if label_key is not None and mask_keys else []),
                             dtype=torch.float32, track_meta=True))
    return Compose(chain)


def scoring_transforms(mask_keys: str | Sequence[str] = ("lesion",), size: int | Sequence[int] = SCORING_SIZE,
                       label_key: str | None = None) -> Compose:
    """Ground-truth masks loaded from their files at the scoring size (default 256 x 256).

    Each mask becomes float32 ``(1, S, S)`` in {0, 1} (``nearest-exact`` resizing of the original
    file, so one resampling only); ``label_key`` concatenates them as in :func:`dermoscopy_transforms`.
    """
    mask_keys = [mask_keys] if isinstance(mask_keys, str) else list(mask_keys)
    if not mask_keys:
        raise ValueError("scoring_transforms needs at least one mask key")
    chain = _load(None, mask_keys)
    chain.append(Resized(mask_keys, spatial_size=_pair(size), mode="nearest-exact"))
    if label_key is not None:
        chain.append(ConcatItemsd(mask_keys, name=label_key, dim=0))
    chain.append(EnsureTyped(mask_keys + ([label_key] if label_key else []), dtype=torch.float32))
    return Compose(chain)


def resize_for_scoring(mask, size: int | Sequence[int] = SCORING_SIZE, threshold: float | None = None) -> np.ndarray:
    """A mask (or stack of masks) at the ISIC scoring size, as booleans.

    Args:
        mask: ``(H, W)`` or ``(C, H, W)`` array / tensor (a MetaTensor is fine).
        size: output side (square, default 256) or ``(H, W)``.
        threshold: None: ``mask`` is binary (anything > 0 is foreground: bool, 0/1 or 0/255) and is
            resized with ``nearest-exact``. A number: ``mask`` holds probabilities, resized
            bilinearly (smoother borders than resizing a thresholded mask), then ``>= threshold``.

    Returns:
        bool numpy array ``(S, S)`` or ``(C, S, S)`` (same number of dimensions as ``mask``).
    """
    x = torch.as_tensor(np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask))
    if x.ndim not in (2, 3):
        raise ValueError(f"mask must be (H, W) or (C, H, W), got shape {tuple(x.shape)}")
    squeeze = x.ndim == 2
    x = x[None, None] if squeeze else x[None]
    out_size = _pair(size)
    if threshold is None:
        y = torch.nn.functional.interpolate((x > 0).to(torch.float32), size=out_size, mode="nearest-exact") > 0.5
    else:
        y = torch.nn.functional.interpolate(x.to(torch.float32), size=out_size, mode="bilinear",
                                            align_corners=False) >= threshold
    y = y[0, 0] if squeeze else y[0]
    return y.numpy()


def dermoscopy_channel_stats(records: Iterable[dict], image_key: str = "image",
                             size: int | Sequence[int] | None = TRAIN_SIZE,
                             anti_aliasing: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (R, G, B) mean and standard deviation of a dataset on the 0..1 scale.

    Every image is loaded as by :func:`dermoscopy_transforms` and, if ``size`` is given, resized
    to it first, so each image weighs the same and the statistics are those of what the network
    sees. Compute them on the training images of a fold only, and pass them as ``mean`` / ``std``.
    """
    chain = _load(image_key, [])
    chain.append(ScaleIntensityRanged(image_key, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0))
    if size is not None:
        chain.append(Resized(image_key, spatial_size=_pair(size), mode="bilinear", anti_aliasing=anti_aliasing))
    load = Compose(chain)
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for record in records:
        x = np.asarray(load({image_key: record[image_key]})[image_key], dtype=np.float64).reshape(3, -1)
        total += x.sum(axis=1)
        total_sq += (x * x).sum(axis=1)
        count += x.shape[1]
    if count == 0:
        raise ValueError("no images to compute channel statistics from")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
