"""nnU-Net v2's own preprocessing as a MONAI dictionary transform, for models trained by nnU-Net.

A network trained by nnU-Net has only seen cases prepared by nnU-Net's preprocessor, so an imported
nnU-Net model is scored and fine-tuned on exactly that. :class:`NnUNetPreprocessd` does not
re-implement it: it runs the preprocessor the plans name (``DefaultPreprocessor`` for every
planner nnU-Net ships), built the way ``nnUNetv2_predict`` builds it
(``configuration_manager.preprocessor_class(verbose=False)``), in the two steps of its ``run_case``
(the plans' reader, then ``run_case_npy``; split only so that a wrong channel count is reported
before nnU-Net's normaliser fails on it), which

1. reads the image files with the plans' reader (``SimpleITKIO`` for NIfTI: the array holds the
   file's voxel axes reversed, ``(k, j, i)``; nnU-Net never reorients);
2. applies ``transpose_forward``;
3. crops to the nonzero region of all channels (holes filled);
4. normalises each channel (``CTNormalization``: clip to the foreground 0.5 / 99.5 percentiles of
   the training set, then ``(x - mean) / max(std, 1e-8)`` with the foreground mean and std;
   ``ZScoreNormalization``: per-image mean / std, inside the nonzero mask when the plans'
   ``use_mask_for_norm`` says so; ``RescaleTo01Normalization``; ``NoNormalization``);
5. resamples to the configuration's spacing (third-order spline for images, linear on one-hot for
   labels; anisotropic data out-of-plane with order 0, nnU-Net's "separate z").

:func:`nnunet_preprocessing_summary` lists those settings with their numbers, in nnU-Net's axis
order and in the file's. :func:`read_nnunet_checkpoint` (from :mod:`medxfer.planning.nnunet_model`)
reads an nnU-Net checkpoint without executing pickled code.

Imports: nnunetv2 2.8 reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` only when
a path is used (older versions warned at import when they were unset); preprocessing a case uses
none of them, so the imports stay at the top.
"""

from __future__ import annotations

import copy
from os import PathLike
from pathlib import Path
from typing import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import MapTransform
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medxfer.data.problems import DatasetError
from medxfer.planning.nnunet_model import NnUNetCheckpointError, load_nnunet_checkpoint, read_nnunet_checkpoint

__all__ = ["NnUNetPreprocessd", "nnunet_preprocessing_summary", "read_nnunet_checkpoint", "load_nnunet_checkpoint",
           "NnUNetCheckpointError", "ORIENTATION_NOTE"]

#: nnU-Net does not reorient; the plans' reader decides the array axes.
ORIENTATION_NOTE = ("nnU-Net: none; arrays in the reader's axis order (SimpleITKIO / NibabelIO: the file's voxel "
                    "axes reversed, (k, j, i); NibabelIOWithReorient: RAS-reoriented first)")

#: nnU-Net's value for voxels outside the nonzero crop mask in a preprocessed label.
OUTSIDE_MASK = -1


def _managers(plans: Mapping, configuration: str):
    """nnU-Net's PlansManager / ConfigurationManager, with a one-line error for a missing configuration."""
    if not isinstance(plans, Mapping) or "configurations" not in plans:
        raise ValueError("not nnU-Net plans: no 'configurations' (pass the parsed plans.json of a trained-model folder)")
    if configuration not in plans["configurations"]:
        raise ValueError(f"nnU-Net plans {plans.get('plans_name', '')!r} have no configuration {configuration!r} "
                         f"(planned: {sorted(plans['configurations'])})")
    manager = PlansManager(copy.deepcopy(dict(plans)))  # nnU-Net's managers may edit what they hold
    return manager, manager.get_configuration(configuration)


class NnUNetPreprocessd(MapTransform):
    """Run nnU-Net's own preprocessing of a trained-model folder on a record of file paths.

    Args:
        keys: ``(image_key,)`` or ``(image_key, label_key)``; the image value is a path or a list of
            paths, one per channel (nnU-Net's ``_0000``, ``_0001`` files; an MSD 4D file is one path
            holding every channel); the label value is a path.
        plans: the parsed ``plans.json`` of the trained-model folder.
        configuration: the plans' configuration the model was trained with (``3d_fullres``...).
        dataset_json: the parsed ``dataset.json`` of the folder (labels, channel names).
        meta_key: when given, nnU-Net's properties of the case (spacing, ``shape_before_cropping``,
            ``bbox_used_for_cropping``, ...; not the sampled ``class_locations``) are stored under
            this key; they are what nnU-Net needs to put a prediction back into the file's geometry.
        allow_missing_keys: a record without the label is preprocessed image-only (inference).

    Returns (for each record, a shallow copy with):
        ``image``: float32 ``torch.Tensor`` ``(C, *spatial)`` in nnU-Net's axis order;
        ``label``: int64 ``torch.Tensor`` ``(1, *spatial)``. nnU-Net marks the voxels outside the
        nonzero crop mask with -1 (so that its training can sample them apart); we map them to
        background 0, which is what they are for a segmentation model (no other value changes).

    Errors name the file: missing file, a file the reader cannot read, or a channel count that
    differs from the plans'.
    """

    def __init__(self, keys, plans: Mapping, configuration: str, dataset_json: Mapping,
                 meta_key: str | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) not in (1, 2):
            raise ValueError(f"keys must be (image,) or (image, label), got {self.keys}")
        self.plans_manager, self.configuration_manager = _managers(plans, configuration)
        self.configuration = configuration
        self.dataset_json = copy.deepcopy(dict(dataset_json))
        self.meta_key = meta_key
        self.num_channels = len(self.configuration_manager.normalization_schemes)
        self.preprocessor = self.configuration_manager.preprocessor_class(verbose=False)

    @property
    def image_key(self) -> Hashable:
        return self.keys[0]

    @property
    def label_key(self) -> Hashable | None:
        return self.keys[1] if len(self.keys) == 2 else None

    def _files(self, value, what: str) -> list[str]:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items or not all(isinstance(f, (str, PathLike)) for f in items):
            raise ValueError(f"{what}: expected a file path or a list of paths (nnU-Net reads the files itself), "
                             f"got {type(value).__name__}")
        files = [str(f) for f in items]
        for f in files:
            if not Path(f).is_file():
                raise DatasetError(f, f"{what} file not found")
        return files

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.image_key not in d:
            raise KeyError(f"record has no {self.image_key!r} key (keys: {sorted(map(str, d))})")
        images = self._files(d[self.image_key], "image")
        label = None
        if self.label_key is not None:
            if self.label_key in d:
                label = self._files(d[self.label_key], "label")
                if len(label) != 1:
                    raise ValueError(f"{label[0]}: one label file per case, got {len(label)}")
                label = label[0]
            elif not self.allow_missing_keys:
                raise KeyError(f"record has no {self.label_key!r} key (pass allow_missing_keys=True for image-only records)")
        # nnU-Net's run_case in its two steps (read with the plans' reader, then run_case_npy), so that
        # a wrong channel count is reported before nnU-Net's normaliser fails on it with an IndexError
        reader_class = self.plans_manager.image_reader_writer_class
        reader = reader_class()
        try:
            image, properties = reader.read_images(images)
        except Exception as e:  # noqa: BLE001 - SimpleITK / nibabel / nnU-Net raise many kinds; one line
            raise DatasetError(images[0], f"nnU-Net's {reader_class.__name__} cannot read it: {_line(e)}") from None
        if image.shape[0] != self.num_channels:
            raise DatasetError(images[0], f"{image.shape[0]} channel(s), but the nnU-Net plans expect {self.num_channels}")
        seg = None
        if label is not None:
            try:
                seg, _ = reader.read_seg(label)
            except Exception as e:  # noqa: BLE001 - as above
                raise DatasetError(label, f"nnU-Net's {reader_class.__name__} cannot read it: {_line(e)}") from None
            if seg.shape[1:] != image.shape[1:]:
                raise DatasetError(label, f"label shape {list(seg.shape[1:])} differs from the image's {list(image.shape[1:])}")
        image, seg, properties = self.preprocessor.run_case_npy(image, seg, properties, self.plans_manager,
                                                                self.configuration_manager, self.dataset_json)
        d[self.image_key] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if label is not None:
            seg = np.where(seg == OUTSIDE_MASK, 0, seg).astype(np.int64)
            d[self.label_key] = torch.from_numpy(np.ascontiguousarray(seg))
        if self.meta_key is not None:
            d[self.meta_key] = {k: v for k, v in properties.items() if k != "class_locations"}
        return d


def _line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _to_file_axes(values, transpose_forward) -> list:
    """nnU-Net's axis order (reader axes after ``transpose_forward``) -> the file's voxel order
    (reader axes reversed). A 2D configuration lists the two in-plane axes only; the first (not
    resampled) axis comes back as ``None``."""
    values = list(values)
    if len(values) == len(transpose_forward) - 1:
        values = [None] + values
    reader = [None] * len(values)
    for i, axis in enumerate(transpose_forward):
        reader[axis] = values[i]
    return list(reversed(reader))


def _number(x):
    return None if x is None else float(x)


def nnunet_preprocessing_summary(plans: Mapping, configuration: str, dataset_json: Mapping) -> dict:
    """What :class:`NnUNetPreprocessd` does for ``configuration``, with every number (JSON-able)::

        {"kind": "nnunet", "configuration", "plans_name", "dataset_name", "preprocessor", "reader",
         "orientation": ORIENTATION_NOTE, "transpose_forward",
         "spacing_nnunet" / "spacing_file_axes": target spacing (mm) in nnU-Net's / the file's axis order,
         "patch_size_nnunet" / "patch_size_file_axes",
         "crop": "nonzero", "resampling": {"data": ..., "data_kwargs": ..., "label": ..., "label_kwargs": ...},
         "channels": {"0": "CT"}, "labels": {...},
         "normalization": [{"channel": 0, "name": "CT", "scheme": "CTNormalization", "use_mask": False,
                            "clip": [p0.5, p99.5], "mean": m, "std": s}, ...]}

    ``clip`` / ``mean`` / ``std`` (``CTNormalization`` only) are the foreground intensity statistics
    of the training set (``foreground_intensity_properties_per_channel``). Per-image schemes
    (``ZScoreNormalization``, ``RescaleTo01Normalization``) have no fixed numbers; ``use_mask``
    says whether statistics are taken inside the nonzero mask.
    """
    manager, conf = _managers(plans, configuration)
    transpose = [int(a) for a in manager.transpose_forward]
    channels = dict(dataset_json.get("channel_names") or dataset_json.get("modality") or {})
    intensity = manager.foreground_intensity_properties_per_channel
    use_mask = list(conf.use_mask_for_norm)
    normalization = []
    for c, scheme in enumerate(conf.normalization_schemes):
        entry = {"channel": c, "name": str(channels.get(str(c), channels.get(c, ""))), "scheme": scheme,
                 "use_mask": bool(use_mask[c]) if c < len(use_mask) else False}
        if scheme == "CTNormalization":
            props = intensity[str(c)]
            entry.update(clip=[float(props["percentile_00_5"]), float(props["percentile_99_5"])],
                         mean=float(props["mean"]), std=float(props["std"]),
                         formula="(clip(x, clip[0], clip[1]) - mean) / max(std, 1e-8)")
        elif scheme == "ZScoreNormalization":
            entry["formula"] = "(x - mean(x)) / max(std(x), 1e-8), per image" + (" inside the nonzero mask" if entry["use_mask"] else "")
        elif scheme == "RescaleTo01Normalization":
            entry["formula"] = "(x - min(x)) / max(x - min(x)), per image"
        elif scheme == "NoNormalization":
            entry["formula"] = "x"
        normalization.append(entry)
    spacing = [float(s) for s in conf.spacing]
    patch = [int(p) for p in conf.patch_size]
    raw = conf.configuration
    return {
        "kind": "nnunet",
        "configuration": configuration,
        "plans_name": manager.plans_name,
        "dataset_name": manager.dataset_name,
        "preprocessor": conf.preprocessor_name,
        "reader": manager.plans["image_reader_writer"],
        "orientation": ORIENTATION_NOTE,
        "transpose_forward": transpose,
        "spacing_nnunet": spacing,
        "spacing_file_axes": [_number(s) for s in _to_file_axes(spacing, transpose)],
        "patch_size_nnunet": patch,
        "patch_size_file_axes": [None if p is None else int(p) for p in _to_file_axes(patch, transpose)],
        "crop": "nonzero",
        "resampling": {"data": raw.get("resampling_fn_data"), "data_kwargs": dict(raw.get("resampling_fn_data_kwargs") or {}),
                       "label": raw.get("resampling_fn_seg"), "label_kwargs": dict(raw.get("resampling_fn_seg_kwargs") or {})},
        "channels": {str(k): str(v) for k, v in channels.items()},
        "labels": {str(k): v for k, v in (dataset_json.get("labels") or {}).items()},
        "normalization": normalization,
    }
