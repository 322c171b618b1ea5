"""TATL stage 1: lesion bounding box from the Segment-Net prediction, crop, paste back (SPEC section 6).

Pipeline (Nguyen et al., TATL, section 4.2 "Segment-Net")::

    original image (H, W) --resize--> working resolution (Hw, Ww), e.g. 384x512
      --Segment-Net--> lesion prediction (Hw, Ww)
      --lesion_box--> Box in ORIGINAL coordinates, enlarged by the offset, clipped to the image
      --crop--> crop of the original image: input of stages 2-3 (resized there to their own size)
      --stages 2-3--> attribute masks at the crop's (or any) size
      --paste_back--> (H, W) masks at the original size, zero outside the box

Coordinates. A :class:`Box` is ``(row0, col0, row1, col1)``, half-open ``[row0, row1) x [col0, col1)``,
in pixels of the original image. Resizing follows the pixel-area convention of
``align_corners=False`` resampling: pixel ``i`` of a grid of size ``n`` covers ``[i, i + 1)``, and
the grid spans ``[0, n)`` whatever its size. Working box edges therefore map to original edges by
the factor ``s = H / Hw`` (per axis, usually non-integer: 767 / 384), with **floor for starts and ceil
for ends**, so the mapped box covers every original pixel that overlaps a lesion pixel: the lesion
is never cut by rounding (the box is at most one pixel larger per side than the exact edge). The
arithmetic is exact (:class:`fractions.Fraction`), so no float error moves an edge.

Offset space. The paper (section 4.2) draws "a bounding box with an offset value of 40 pixels in
four directions" around the Segment-Net output and only then "scales it to match the resolution of
the input image"; SPEC section 6 says "enlarged by an offset of 40 px on each side (scaled to the
original image)". Both say the 40 px are pixels of the working resolution (384x512), scaled with the
box: ``offset_space="working"``, the default. The Table 5 ablation (offsets 0..60 px) also only makes
sense at that resolution (40 px of 512 is 8 % of the width; 40 px of a 6000-pixel-wide ISIC original
would be 0.7 %). ``offset_space="original"`` reads the offset as original-image pixels instead (the
mapped lesion box is enlarged by exactly ``offset`` pixels on each side). Both give the same box when
the prediction is already at the original size.

Empty prediction (no pixel above the threshold): ``empty="full"`` (default) returns the whole image
with ``Box.fallback = True`` -- stages 2-3 then see the uncropped image, as without stage 1, rather
than an arbitrary region; ``empty="raise"`` raises ValueError.

Connected components: by default the box bounds **all** foreground pixels, as the paper's box
"around the masks". A lesion that the Segment-Net splits into fragments (regression areas, hair
across the lesion) keeps all its parts; a spurious blob only makes the crop larger, which costs less
than cutting lesion (the reason for the offset in the first place). ``largest_component=True`` keeps
the largest 8-connected component only (``scipy.ndimage.label``), for predictions with far-away
false positives (ruler marks, vignetting).

Box files: :func:`save_boxes` writes ``{image id: Box}`` as JSON (stage 1 output, the crops of
stages 2-3 are reproducible from it), :func:`load_boxes` reads it back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medxfer.atomic import atomic_write_text
from medxfer.data.problems import DatasetError, read_json

__all__ = ["Box", "lesion_box", "crop", "paste_back", "save_boxes", "load_boxes", "OFFSET_SPACES", "PASTE_MODES"]

OFFSET_SPACES = ("working", "original")
PASTE_MODES = ("nearest", "bilinear")


@dataclass(frozen=True)
class Box:
    """Half-open box ``[row0, row1) x [col0, col1)`` in pixels of the original image.

    Attributes:
        row0, col0: first row / column inside the box.
        row1, col1: one past the last row / column.
        fallback: True when the box is the whole image because the prediction was empty.
    """

    row0: int
    col0: int
    row1: int
    col1: int
    fallback: bool = False

    def __post_init__(self):
        for name in ("row0", "col0", "row1", "col1"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"Box.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.row0 < 0 or self.col0 < 0:
            raise ValueError(f"Box starts must be >= 0, got row0={self.row0}, col0={self.col0}")
        if self.row1 <= self.row0 or self.col1 <= self.col0:
            raise ValueError(f"Box must be non-empty (row0 < row1, col0 < col1), got {self.as_tuple()}")

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def width(self) -> int:
        return self.col1 - self.col0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.row0, self.col0, self.row1, self.col1)

    def as_slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices: ``image[..., rows, cols]`` (channel-first) or ``image[rows, cols]``."""
        return slice(self.row0, self.row1), slice(self.col0, self.col1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (ints and a bool), to save beside the predictions."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Box":
        return cls(int(data["row0"]), int(data["col0"]), int(data["row1"]), int(data["col1"]),
                   bool(data.get("fallback", False)))

    def check_inside(self, image_size: Sequence[int]) -> None:
        """ValueError unless the box lies inside an image of size ``(H, W)``."""
        height, width = _size2(image_size, "image_size")
        if self.row1 > height or self.col1 > width:
            raise ValueError(f"box {self.as_tuple()} (row0, col0, row1, col1) is outside the image of size "
                             f"(H, W) = ({height}, {width})")


def _size2(size: Sequence[int], name: str) -> tuple[int, int]:
    try:
        values = tuple(size)
    except TypeError:
        raise ValueError(f"{name} must be (H, W), got {size!r}") from None
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                   for v in values):
        raise ValueError(f"{name} must be two positive integers (H, W), got {size!r}")
    return int(values[0]), int(values[1])


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _foreground(mask, threshold: float) -> np.ndarray:
    values = _to_numpy(mask)
    if values.ndim == 3 and values.shape[0] == 1:     # MONAI channel-first (1, H, W)
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"the lesion prediction must be (H, W) or (1, H, W), got shape {tuple(values.shape)}")
    if values.dtype == bool:
        return values
    if not (np.issubdtype(values.dtype, np.number)):
        raise ValueError(f"the lesion prediction must be numeric or bool, got dtype {values.dtype}")
    return values > threshold


def _largest_component(foreground: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return foreground
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)       # ties: the first component in raster order


def _as_fraction(value, name: str) -> Fraction:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return Fraction(int(value)) if isinstance(value, (int, np.integer)) else Fraction(float(value))


def lesion_box(mask, threshold: float = 0.5, offset: float = 40, image_size: Sequence[int] | None = None,
               mask_size: Sequence[int] | None = None, *, offset_space: str = "working",
               largest_component: bool = False, empty: str = "full") -> Box:
    """Bounding box of the lesion in the Segment-Net prediction, in original-image pixels.

    Args:
        mask: Segment-Net prediction at the working resolution, ``(Hw, Ww)`` or ``(1, Hw, Ww)``,
            numpy or torch: a bool mask, a 0/1 (or 0/255) mask, or a probability map.
        threshold: foreground is ``mask > threshold`` (bool masks are used as they are). Default 0.5.
        offset: margin added on each of the four sides, in pixels of ``offset_space``. Default 40.
        image_size: original image size ``(H, W)``; default the mask's size (no rescaling).
        mask_size: the working resolution ``(Hw, Ww)`` the prediction should have (e.g. from a
            config); a consistency check only: ValueError if the prediction's shape differs.
        offset_space: ``"working"`` (default; SPEC section 6 and the paper: the box is enlarged at
            the Segment-Net resolution, then scaled to the original) or ``"original"`` (the offset is
            original-image pixels, added after mapping). See the module docstring.
        largest_component: bound the largest 8-connected component only (default: all foreground).
        empty: what an empty prediction gives: ``"full"`` (whole image, ``fallback=True``) or
            ``"raise"`` (ValueError).

    Returns:
        :class:`Box` in original-image pixels, clipped to ``[0, H) x [0, W)``. Starts are rounded
        down and ends up, so the box always covers the mapped lesion.
    """
    if offset_space not in OFFSET_SPACES:
        raise ValueError(f"offset_space must be one of {OFFSET_SPACES}, got {offset_space!r}")
    if empty not in ("full", "raise"):
        raise ValueError(f"empty must be 'full' or 'raise', got {empty!r}")
    margin = _as_fraction(offset, "offset")
    foreground = _foreground(mask, threshold)
    work_h, work_w = foreground.shape
    if mask_size is not None and _size2(mask_size, "mask_size") != (work_h, work_w):
        raise ValueError(f"the prediction has shape {(work_h, work_w)}, expected mask_size {tuple(mask_size)}")
    height, width = (work_h, work_w) if image_size is None else _size2(image_size, "image_size")

    if largest_component:
        foreground = _largest_component(foreground)
    rows = np.flatnonzero(foreground.any(axis=1))
    if rows.size == 0:
        if empty == "raise":
            raise ValueError("the lesion prediction is empty (no pixel above the threshold)")
        return Box(0, 0, height, width, fallback=True)
    cols = np.flatnonzero(foreground.any(axis=0))

    def axis(start: int, stop: int, work: int, orig: int) -> tuple[int, int]:
        scale = Fraction(orig, work)
        if offset_space == "working":
            lo, hi = (start - margin) * scale, (stop + margin) * scale
        else:
            lo, hi = start * scale, stop * scale
            lo, hi = Fraction(math.floor(lo)) - margin, Fraction(math.ceil(hi)) + margin
        return max(0, math.floor(lo)), min(orig, math.ceil(hi))

    row0, row1 = axis(int(rows[0]), int(rows[-1]) + 1, work_h, height)
    col0, col1 = axis(int(cols[0]), int(cols[-1]) + 1, work_w, width)
    return Box(row0, col0, row1, col1)


def _spatial_axes(shape: tuple[int, ...], channel_first: bool | None) -> tuple[int, int]:
    """Axes ``(row, col)`` of an image: (H, W); (C, H, W) or (H, W, C); (B, C, H, W)."""
    ndim = len(shape)
    if ndim == 2:
        return 0, 1
    if ndim == 4:
        if channel_first is False:
            raise ValueError(f"a 4-D image must be (B, C, H, W) (channel first), got shape {shape}")
        return 2, 3
    if ndim != 3:
        raise ValueError(f"image must be (H, W), (C, H, W), (H, W, C) or (B, C, H, W), got shape {shape}")
    if channel_first is None:
        first_small, last_small = shape[0] <= 4, shape[2] <= 4
        if first_small == last_small:
            raise ValueError(f"cannot tell whether image of shape {shape} is (C, H, W) or (H, W, C); "
                             "pass channel_first=True or False")
        channel_first = first_small
    return (1, 2) if channel_first else (0, 1)


def crop(image, box: Box, *, channel_first: bool | None = None):
    """The part of ``image`` inside ``box`` (a view where the input allows it; same type as the input).

    Args:
        image: numpy array or torch tensor, ``(H, W)``, ``(C, H, W)``, ``(H, W, C)`` or ``(B, C, H, W)``.
        box: :class:`Box` in the image's pixels; ValueError if it is not inside the image.
        channel_first: layout of a 3-D image; None guesses it (channels are the axis of size <= 4)
            and raises ValueError when both or neither end could be channels.
    """
    if not isinstance(box, Box):
        raise ValueError(f"box must be a Box, got {type(box).__name__}")
    shape = tuple(image.shape)
    row_axis, col_axis = _spatial_axes(shape, channel_first)
    box.check_inside((shape[row_axis], shape[col_axis]))
    index = [slice(None)] * len(shape)
    index[row_axis], index[col_axis] = box.as_slices()
    return image[tuple(index)]


def _nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output pixel, pixel-centre aligned: ``floor((i + 0.5) * in / out)``
    (torch's ``nearest-exact``), in exact integer arithmetic."""
    return ((2 * np.arange(out_size) + 1) * in_size) // (2 * out_size)


def paste_back(crop_mask, box: Box, image_size: Sequence[int], *, mode: str = "nearest", fill: float = 0):
    """Put a crop-space prediction back into a full-size ``(H, W)`` mask.

    The prediction is resized to the box size (``box.height, box.width``) -- exact copy when it
    already has that size -- written at the box location, and ``fill`` (0) is put elsewhere.

    Args:
        crop_mask: ``(h, w)`` or ``(..., h, w)`` (e.g. one channel per attribute), numpy or torch, at
            the crop's size or any size (the stage 2-3 networks' resolution).
        box: :class:`Box` the crop was taken with; ValueError if it is not inside ``image_size``.
        image_size: original image size ``(H, W)``.
        mode: ``"nearest"`` (default; hard masks, dtype kept, pixel-centre aligned like torch's
            ``nearest-exact``) or ``"bilinear"`` (probabilities; ``align_corners=False`` with
            antialiasing when shrinking; output is floating point and stays within the input's
            value range, so probabilities stay in [0, 1]).
        fill: value outside the box.

    Returns:
        ``(..., H, W)`` array of the input's kind (numpy -> numpy, torch -> torch).
    """
    if mode not in PASTE_MODES:
        raise ValueError(f"mode must be one of {PASTE_MODES}, got {mode!r}")
    if not isinstance(box, Box):
        raise ValueError(f"box must be a Box, got {type(box).__name__}")
    height, width = _size2(image_size, "image_size")
    box.check_inside((height, width))
    is_torch = isinstance(crop_mask, torch.Tensor)
    values = crop_mask.detach().cpu() if is_torch else np.asarray(crop_mask)
    if values.ndim < 2 or min(values.shape[-2:]) == 0:
        raise ValueError(f"crop_mask must be (h, w) or (..., h, w) with h, w > 0, got shape {tuple(values.shape)}")
    lead = tuple(values.shape[:-2])

    if mode == "nearest":
        rows = _nearest_index(box.height, values.shape[-2])
        cols = _nearest_index(box.width, values.shape[-1])
        if is_torch:
            resized = values[..., torch.as_tensor(rows)[:, None], torch.as_tensor(cols)[None, :]]
        else:
            resized = values[..., rows[:, None], cols[None, :]]
    else:
        source = torch.as_tensor(values) if not is_torch else values
        if not source.is_floating_point():
            source = source.float()
        if tuple(source.shape[-2:]) == (box.height, box.width):
            resized = source
        else:
            flat = source.reshape(1, -1, *source.shape[-2:])
            shrinking = box.height < source.shape[-2] or box.width < source.shape[-1]
            flat = torch.nn.functional.interpolate(flat, size=(box.height, box.width), mode="bilinear",
                                                   align_corners=False, antialias=shrinking)
            # convex weights keep the input's range; clamp only absorbs float rounding (1 + 1e-7)
            flat = flat.clamp(source.min(), source.max())
            resized = flat.reshape(*lead, box.height, box.width)
        if not is_torch:
            resized = resized.numpy()

    rows_slice, cols_slice = box.as_slices()
    if is_torch:
        out = torch.full((*lead, height, width), fill, dtype=resized.dtype)
    else:
        out = np.full((*lead, height, width), fill, dtype=resized.dtype)
    out[..., rows_slice, cols_slice] = resized
    return out


def save_boxes(boxes: Mapping, path) -> None:
    """Write ``{image id: Box}`` as JSON (the crops of stages 2-3 are reproducible from it),
    atomically: a later stage never reads half a box file."""
    atomic_write_text(path, json.dumps({k: b.to_dict() for k, b in boxes.items()}, indent=1) + "\n")


def load_boxes(path) -> dict:
    """Read :func:`save_boxes` output back into ``{image id: Box}`` (errors name the file)."""
    data = read_json(path, "box file not found; run stage 1 first")
    try:
        return {k: Box.from_dict(v) for k, v in data.items()}
    except (TypeError, ValueError, AttributeError) as e:
        raise DatasetError(path, f"not a box file: {e}") from None
