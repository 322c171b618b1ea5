"""The preprocessing a bank entry expects, as a MONAI chain (issue 14; SPEC sections 4-5).

A model only sees data the way it was trained to see it: a MONAI model-zoo bundle normalised with
``ScaleIntensityRanged(-57, 164)`` at 1.5 mm, an nnU-Net model with nnU-Net's own resampling and
``CTNormalization``, a medxfer model with the plans of the task it is fine-tuned on. A bank entry's
``preprocessing`` dict names which (``kind``) with everything needed to redo it:

================ ==================================================================================
``kind``         chain for a labelled case ``{"image": file(s), "label": file}``
================ ==================================================================================
``target_plans`` the *target's* plans (:func:`medxfer.transforms.msd.msd_transforms`, eval chain):
                 medxfer's own models, fine-tuned the way the CC-FV paper's nnU-Net protocol does
                 (re-planned on the target). An entry without ``kind`` means this.
``monai``        ``transforms``: a list of MONAI transform configs with literal values (``_target_``
                 + keyword arguments, as a bundle's ``preprocessing#transforms`` holds them, with
                 ``@`` / ``$`` references resolved at import), applied to ``image_key``; the label
                 is then loaded and resampled (nearest) onto the preprocessed image's grid with
                 ``ResampleToMatchd``, which follows whatever spatial steps the list took (they
                 update the image's affine).
``nnunet``       nnU-Net's own preprocessing (:class:`~medxfer.transforms.nnunet_preprocessing.
                 NnUNetPreprocessd`) with ``plans`` / ``dataset_json`` files (relative to the bank
                 folder) and ``configuration``.
================ ==================================================================================

:func:`preprocessing_key` is what identifies a chain (two entries with the same key see the same
preprocessed cases: a scoring run prepares the target once per key).

Fine-tuning an entry (``bundles/msd_seg3d`` ``finetune``) carries its preprocessing in the run's
plans (``plans["preprocessing"]``, file paths absolute); :func:`plans_transforms` is the one place
the MSD bundle's train / validate / inference chains come from: the entry's chain, then (training)
medxfer's augmentation tail at the entry's patch (:func:`medxfer.transforms.msd.train_augmentation`).
A chain that MONAI cannot invert (``nnunet``) evaluates on the preprocessed grid but does not
predict files: nnU-Net's own predictor does that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import (Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, MapTransform,
                              ResampleToMatchd)

from medxfer.data.problems import DatasetError, read_json
from medxfer.transforms.msd import msd_transforms, train_augmentation
from medxfer.transforms.nnunet_preprocessing import NnUNetPreprocessd

__all__ = ["PREPROCESSING_KINDS", "preprocessing_kind", "preprocessing_key", "monai_chain", "entry_transforms",
           "plans_transforms", "invertible"]

PREPROCESSING_KINDS = ("target_plans", "monai", "nnunet")


def preprocessing_kind(preprocessing: Mapping | None) -> str:
    """The ``kind`` of an entry's preprocessing (missing: ``target_plans``); an unknown one is an error."""
    kind = str((preprocessing or {}).get("kind", "target_plans"))
    if kind not in PREPROCESSING_KINDS:
        raise ValueError(f"unknown preprocessing kind {kind!r}; known: {list(PREPROCESSING_KINDS)}")
    return kind


def preprocessing_key(preprocessing: Mapping | None) -> str:
    """A string identifying the chain: ``target_plans`` for every medxfer entry (whatever summary it
    records), else the canonical JSON of the dict (its ``summary`` left out)."""
    kind = preprocessing_kind(preprocessing)
    if kind == "target_plans":
        return kind
    return json.dumps({k: v for k, v in dict(preprocessing).items() if k != "summary"}, sort_keys=True, default=str)


def monai_chain(transforms: list, source: str = "preprocessing") -> Compose:
    """``Compose`` of MONAI transform configs (``{"_target_": "Spacingd", "keys": "image", ...}``)
    built by MONAI's own :class:`~monai.bundle.ConfigParser` (names resolve as in a bundle)."""
    if not isinstance(transforms, list) or not all(isinstance(t, Mapping) and "_target_" in t for t in transforms):
        raise ValueError(f"{source}: expected a list of transform configs, each with a '_target_'")
    parser = ConfigParser({"transforms": [dict(t) for t in transforms]})
    try:
        return Compose(parser.get_parsed_content("transforms"))
    except Exception as e:  # noqa: BLE001 - MONAI wraps the cause in several layers; one line for the user
        raise ValueError(f"{source}: cannot build the transforms ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _resolve(path: str, root) -> Path:
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


def entry_transforms(preprocessing: Mapping | None, target_plans: dict | None, mode: str = "eval", root=None,
                     label_key: str = "label") -> Callable[[dict], dict]:
    """The deterministic chain that prepares a target case for a bank entry (see the module doc).

    Args:
        preprocessing: the entry's ``preprocessing`` dict.
        target_plans: the target task's medxfer plans (``target_plans`` kind).
        mode: ``eval`` (image + label) or ``infer`` (image only).
        root: folder the ``nnunet`` kind's file paths are relative to (the bank folder).

    Returns a callable ``record -> {"image": (C, ...), "label": (1, ...)}`` (MONAI ``Compose``).
    """
    if mode not in ("eval", "infer"):
        raise ValueError(f"mode must be 'eval' or 'infer', got {mode!r}")
    kind = preprocessing_kind(preprocessing)
    with_label = mode == "eval"
    if kind == "target_plans":
        if target_plans is None:
            raise ValueError("a target_plans entry needs the target's plans")
        return msd_transforms(target_plans, mode=mode)
    if kind == "nnunet":
        plans = read_json(_resolve(preprocessing["plans"], root))
        dataset_json = read_json(_resolve(preprocessing["dataset_json"], root))
        keys = ("image", label_key) if with_label else ("image",)
        spacing = plans["configurations"][preprocessing["configuration"]].get("spacing")
        return Compose([_NnUNetGrid(NnUNetPreprocessd(keys, plans, preprocessing["configuration"], dataset_json),
                                    keys, spacing)])
    image_key = str(preprocessing.get("image_key", "image"))
    chain: list[MapTransform | Callable] = []
    if image_key != "image":  # the recorded list reads its own key name
        chain.append(_Rename("image", image_key))
    chain.append(monai_chain(list(preprocessing.get("transforms") or []), "entry preprocessing"))
    if with_label:
        chain += [LoadImaged(label_key, image_only=True), EnsureChannelFirstd(label_key),
                  ResampleToMatchd(label_key, key_dst=image_key, mode="nearest"),
                  EnsureTyped(label_key)]
    if image_key != "image":
        chain.append(_Rename(image_key, "image"))
    return Compose(chain)


def plans_transforms(plans: dict, mode: str = "train", num_samples: int = 2) -> Compose:
    """The chain of a run's plans for ``mode`` in ``{"train", "eval", "infer"}``: the plans' own
    (:func:`~medxfer.transforms.msd.msd_transforms`) or, when they carry a bank entry's
    ``preprocessing``, that chain (+ the training tail at ``plans["patch_size"]``)."""
    pre = plans.get("preprocessing")
    if preprocessing_kind(pre) == "target_plans":
        return msd_transforms(plans, mode=mode, num_samples=num_samples)
    if mode == "infer" and preprocessing_kind(pre) == "nnunet":
        raise ValueError("this model expects nnU-Net's own preprocessing, which MONAI cannot invert onto the input "
                         "file: predict with nnU-Net (nnUNetv2_predict) or fine-tune with the target's plans")
    if mode not in ("train", "eval", "infer"):
        raise ValueError(f"mode must be 'train', 'eval' or 'infer', got {mode!r}")
    chain = entry_transforms(pre, plans, "infer" if mode == "infer" else "eval")
    if mode != "train":
        return chain
    return Compose([chain, *train_augmentation(plans["patch_size"], num_samples=num_samples)])


def invertible(plans: dict) -> bool:
    """Can MONAI's ``Invertd`` map predictions of this run back onto the input files? False for
    nnU-Net's preprocessing: such a run is evaluated on nnU-Net's grid, against the label
    preprocessed with it (``bundles/msd_seg3d`` ``evaluate``: ``label_from_file`` follows this)."""
    return preprocessing_kind(plans.get("preprocessing")) != "nnunet"


class _NnUNetGrid(MapTransform):
    """nnU-Net's preprocessing with its arrays as MetaTensors on nnU-Net's grid: affine
    ``diag(spacing)`` in nnU-Net's axis order (voxel sizes right, so HD95 is in mm; orientation and
    origin are not the file's) and the record's file names kept. Written by hand: nnU-Net returns
    bare arrays and MONAI has no transform that attaches a given affine."""

    def __init__(self, preprocess: Callable[[dict], dict], keys, spacing):
        super().__init__(keys)
        self.preprocess = preprocess
        self.spacing = [float(s) for s in spacing] if spacing else None

    def __call__(self, data: dict) -> dict:
        names = {k: data[k] if isinstance(data[k], str) else str(list(data[k])[0]) for k in self.keys if k in data}
        d = dict(self.preprocess(data))
        for key, name in names.items():
            x = torch.as_tensor(d[key])
            affine = torch.eye(x.ndim, dtype=torch.float64)
            if self.spacing and len(self.spacing) == x.ndim - 1:
                affine[:-1, :-1] = torch.diag(torch.tensor(self.spacing, dtype=torch.float64))
            d[key] = MetaTensor(x, affine=affine, meta={"filename_or_obj": name})
        return d


class _Rename(MapTransform):
    """Move ``d[src]`` to ``d[dst]`` (a recorded chain may read another key than ``image``)."""

    def __init__(self, src: str, dst: str):
        super().__init__(src)
        self.src, self.dst = src, dst

    def __call__(self, d: dict) -> dict:
        d = dict(d)
        if self.src not in d:
            raise DatasetError(self.src, f"record has no {self.src!r} key")
        d[self.dst] = d.pop(self.src)
        return d
