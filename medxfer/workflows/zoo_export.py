"""Export a 3D model as a self-contained MONAI model-zoo bundle (issue 15, first part; SPEC section 12).

From a finished ``bundles/msd_seg3d`` training / fine-tuning run folder (``run.json``, ``plans.json``,
``model.pt``) or from a model-bank entry, :func:`export_bundle` writes::

    <bundle>/
      LICENSE
      configs/metadata.json        # schema 20240725 keys, network_data_format (inputs.image, outputs.pred)
      configs/inference.json       # MONAI only: network_def, preprocessing with the numbers baked in,
                                   #   SlidingWindowInferer, Invertd, SaveImaged, dataset_dir
      configs/train.json           # MONAI only: fine-tuning from models/model.pt on dataset_dir/imagesTr+labelsTr
      configs/logging.conf
      models/model.pt              # the network's state dict (+ large_files.yml above the zoo's 25 MB)
      docs/README.md               # model card
      docs/data_license.txt

The inference config calls nothing of medxfer: the network is a MONAI class with literal keyword
arguments (the registry's defaults merged in), the preprocessing is the run's chain written out as
MONAI transforms (``Orientationd`` RAS, ``Spacingd`` to the planned spacing, ``CropForegroundd`` on
the body, the plans' CT clip + z-score as one ``ScaleIntensityRanged`` with its numbers, or MR
per-image z-score), so ``python -m monai.bundle run --config_file configs/inference.json
--dataset_dir D`` predicts what medxfer's own inference predicts, in a venv with MONAI only.
``required_packages_version`` names only packages on the package index (``nibabel``).

Not exported (yet): evaluate / multi-GPU configs, 2D and TATL networks (which need the
bundle's own ``scripts/``), nnU-Net-preprocessed entries (nnU-Net's preprocessing is not MONAI's).
SwinUNETR cannot be scripted with TorchScript (``ckpt_export`` fails inside its window attention);
:func:`export_program` writes a ``torch.export`` program instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import version as distribution_version
from pathlib import Path
from typing import Mapping, Sequence

import monai
import numpy
import torch
from monai.bundle import ConfigParser

from medxfer.atomic import atomic_directory, atomic_torch_save, atomic_write_text
from medxfer.data.problems import DatasetError, read_json
from medxfer.networks import build_network, network_spec
from medxfer.transfer.bank import ModelBank
from medxfer.transfer.weights import read_checkpoint
from medxfer.transforms.msd import CT_BODY_HU, RAS_LABELS
from medxfer.transforms.preprocessing import preprocessing_kind
from medxfer.workflows.msd_seg3d import read_run_record

__all__ = ["ZOO_FILE_LIMIT", "SCHEMA_URL", "METADATA_SCHEMA", "MONAI_CLASSES", "ExportSource", "source_from_run",
           "source_from_bank", "network_def", "plans_preprocessing", "labelled_preprocessing", "train_augmentation", "export_bundle", "write_metadata_schema",
           "export_program"]

#: The model zoo's limit per committed file; larger weights go to ``large_files.yml``.
ZOO_FILE_LIMIT = 25 * 1024 * 1024
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
#: Registered arch -> MONAI network class (``network_def`` ``_target_``).
MONAI_CLASSES = {"unet": "UNet", "unetr": "UNETR", "swinunetr": "SwinUNETR", "segresnet": "SegResNet",
                 "dynunet": "DynUNet", "basicunet": "BasicUNet", "flexibleunet": "FlexibleUNet"}

_TENSOR = {"type": "object", "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
           "properties": {"type": {"type": "string"}, "format": {"type": "string"},
                          "num_channels": {"type": "integer", "minimum": 1}, "spatial_shape": {"type": "array"},
                          "dtype": {"type": "string"}, "value_range": {"type": "array"},
                          "is_patch_data": {"type": "boolean"}, "channel_def": {"type": "object"}}}
#: The metadata requirements of the zoo's schema 20240725 as the zoo documents them (SPEC section 12),
#: written by hand as a JSON schema (draft-07): the zoo's own file cannot be downloaded here.
METADATA_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "MONAI bundle metadata (requirements of meta_schema_20240725, written by medxfer)",
    "type": "object",
    "required": ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"],
    "properties": {
        "schema": {"type": "string"}, "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "changelog": {"type": "object"}, "monai_version": {"type": "string"}, "pytorch_version": {"type": "string"},
        "numpy_version": {"type": "string"},
        "required_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
        "task": {"type": "string"}, "description": {"type": "string"}, "authors": {"type": "string"},
        "copyright": {"type": "string"}, "data_source": {"type": "string"}, "data_type": {"type": "string"},
        "image_classes": {"type": "string"}, "label_classes": {"type": "string"}, "pred_classes": {"type": "string"},
        "eval_metrics": {"type": "object"}, "intended_use": {"type": "string"},
        "references": {"type": "array", "items": {"type": "string"}},
        "network_data_format": {"type": "object", "required": ["inputs", "outputs"], "properties": {
            "inputs": {"type": "object", "required": ["image"], "additionalProperties": _TENSOR},
            "outputs": {"type": "object", "required": ["pred"], "additionalProperties": _TENSOR},
            "post_processed_outputs": {"type": "object"}}},
    },
}

_LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


@dataclass
class ExportSource:
    """What an exported bundle is made of (:func:`source_from_run` / :func:`source_from_bank`)."""

    name: str
    arch: str
    arch_kwargs: dict
    in_channels: int
    out_channels: int
    patch_size: list[int]
    labels: dict[str, str]                 # "0" -> "background", ...
    channels: dict[str, str]               # "0" -> "CT"
    preprocessing: list[dict]              # MONAI transform configs on "image", numbers baked in
    state: dict[str, torch.Tensor]
    plans: dict | None = None              # spacing + normalisation numbers, when the chain comes from plans
    description: str = ""
    provenance: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)


def plans_preprocessing(plans: dict, label: bool = False) -> list[dict]:
    """medxfer's chain of ``plans`` (:func:`medxfer.transforms.msd.msd_transforms`, ``infer``; with
    ``label``: ``eval``, the label resampled nearest) as MONAI transform configs with every number
    written in: the same transforms, in the same order."""
    norms = plans["normalization"]
    scheme = norms[0]["scheme"]
    keys = ["image", "label"] if label else "image"
    chain = [{"_target_": "LoadImaged", "keys": keys, "image_only": True},
             {"_target_": "EnsureChannelFirstd", "keys": keys},
             {"_target_": "EnsureTyped", "keys": keys, "dtype": None, "track_meta": True},
             {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS", "labels": [list(p) for p in RAS_LABELS]},
             {"_target_": "Spacingd", "keys": keys, "pixdim": [float(s) for s in plans["target_spacing"]],
              "mode": ["bilinear", "nearest"] if label else "bilinear"}]
    if scheme == "CT":  # medxfer.transforms.msd.ct_body_foreground, written as an expression
        select = f"$lambda x: x > {float(CT_BODY_HU)}"
    else:  # medxfer.transforms.msd.body_foreground
        select = "$lambda x: (x > 0).any(axis=0, keepdims=True) if x.ndim > 3 else x > 0"
    chain.append({"_target_": "CropForegroundd", "keys": keys, "source_key": "image", "select_fn": select,
                  "allow_smaller": True})
    if scheme == "CT":
        n = norms[0]
        low, high, mean, std = float(n["clip"][0]), float(n["clip"][1]), float(n["mean"]), float(n["std"])
        chain.append({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high,
                      "b_min": (low - mean) / std, "b_max": (high - mean) / std, "clip": True})
    elif scheme == "zscore":
        chain.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False, "channel_wise": True})
    elif scheme != "none":
        raise ValueError(f"normalisation scheme {scheme!r} has no MONAI-only form")
    return chain


def labelled_preprocessing(src: "ExportSource") -> list[dict]:
    """The deterministic chain for labelled cases (training, validation): the plans' chain with the
    label, or a recorded MONAI list on the image followed by the label loaded and resampled onto
    the preprocessed image (``ResampleToMatchd``, nearest), as :mod:`medxfer.transforms.preprocessing`."""
    if src.plans is not None:
        return plans_preprocessing(src.plans, label=True)
    return [*src.preprocessing, {"_target_": "LoadImaged", "keys": "label", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "label"},
            {"_target_": "ResampleToMatchd", "keys": "label", "key_dst": "image", "mode": "nearest"}]


def train_augmentation(patch_size: Sequence[int], num_samples: str | int = "@num_samples") -> list[dict]:
    """:func:`medxfer.transforms.msd.train_augmentation` as MONAI transform configs."""
    keys = ["image", "label"]
    patch = [int(p) for p in patch_size]
    chain = [{"_target_": "SpatialPadd", "keys": keys, "spatial_size": patch},
             {"_target_": "RandCropByPosNegLabeld", "keys": keys, "label_key": "label", "spatial_size": patch,
              "pos": 1.0, "neg": 1.0, "num_samples": num_samples, "image_key": "image",
              "image_threshold": "$-float('inf')"},
             *[{"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": a} for a in range(3)]]
    if patch[0] == patch[1]:
        chain.append({"_target_": "RandRotate90d", "keys": keys, "prob": 0.5, "max_k": 3, "spatial_axes": [0, 1]})
    return chain + [{"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.5},
                    {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5}]


def network_def(arch: str, arch_kwargs: Mapping, in_channels: int, out_channels: int, patch_size: Sequence[int]) -> dict:
    """A MONAI ``network_def`` (``_target_`` + literal kwargs) that builds exactly the network
    :func:`medxfer.networks.build_network` builds (the registry's defaults merged in)."""
    spec = network_spec(arch)
    if spec.name == "network_def":
        return dict(arch_kwargs["network_def"], in_channels=int(in_channels), out_channels=int(out_channels))
    if spec.name not in MONAI_CLASSES:
        raise ValueError(f"{spec.name} is not a MONAI network: its bundle needs the network's code in scripts/ "
                         "(not exported yet)")
    kwargs = json.loads(json.dumps(spec.kwargs(arch_kwargs)))  # tuples -> lists: plain JSON
    out = {"_target_": MONAI_CLASSES[spec.name], "spatial_dims": len(patch_size), "in_channels": int(in_channels),
           "out_channels": int(out_channels), **kwargs}
    if spec.name == "unetr":
        out["img_size"] = [int(p) for p in patch_size]
    return out


def source_from_run(run_dir, name: str | None = None) -> ExportSource:
    """A finished ``bundles/msd_seg3d`` run folder (``run.json`` + ``plans.json`` + ``model.pt``)."""
    run = Path(run_dir)
    record = read_run_record(run)
    if record is None:
        raise DatasetError(run / "run.json", "not a medxfer training run folder (run.json not found)")
    plans = read_json(run / record.get("plans_file", "plans.json"))
    if preprocessing_kind(plans.get("preprocessing")) == "nnunet":
        raise DatasetError(run / "plans.json", "this model expects nnU-Net's own preprocessing, which MONAI-only "
                                               "transforms cannot reproduce; share it as an nnU-Net model")
    own = preprocessing_kind(plans.get("preprocessing")) == "monai"
    pre = plans["preprocessing"]["transforms"] if own else plans_preprocessing(plans)
    metrics = {}
    eval_file = run / "eval" / "metrics.json"
    if eval_file.is_file():
        summary = read_json(eval_file).get("summary", {})
        metrics = {f"val_{k}": v["mean"] for k, v in summary.items() if isinstance(v, Mapping) and "mean" in v}
    return ExportSource(name=name or run.name, arch=record["arch"], arch_kwargs=record["arch_kwargs"],
                        in_channels=int(record["in_channels"]), out_channels=int(record["out_channels"]),
                        patch_size=[int(p) for p in record["patch_size"]],
                        labels={str(k): v for k, v in record["labels"].items()},
                        channels={str(k): v for k, v in plans.get("channels", {"0": "image"}).items()},
                        preprocessing=pre, state=read_checkpoint(run / "model.pt"), plans=None if own else plans,
                        description=f"{record['arch']} trained on {record.get('task')} with medxfer "
                                    f"({record.get('workflow', 'msd_seg3d')})",
                        provenance={"run": str(run.resolve()), "transfer": record.get("transfer")},
                        eval_metrics=metrics)


def source_from_bank(bank_root, entry: str, labels: Mapping | None = None) -> ExportSource:
    """A model-bank entry: its network and weights; its preprocessing (a recorded MONAI list, or the
    source plans' numbers recorded by medxfer's pretraining)."""
    bank = ModelBank.open(bank_root)
    e = bank.get(entry)
    kind = preprocessing_kind(e.preprocessing)
    if kind == "nnunet":
        raise DatasetError(bank.manifest, f"entry {entry!r} expects nnU-Net's own preprocessing, which MONAI-only "
                                          "transforms cannot reproduce")
    plans = None
    if kind == "monai":
        pre = list(e.preprocessing["transforms"])
    else:
        numbers = e.preprocessing.get("normalization_numbers")
        if not numbers or "target_spacing" not in e.preprocessing:
            raise DatasetError(bank.manifest, f"entry {entry!r} records no preprocessing numbers (spacing, "
                                              "normalisation); export the training run folder instead")
        plans = {"target_spacing": e.preprocessing["target_spacing"], "normalization": numbers}
        pre = plans_preprocessing(plans)
    labels = {str(k): v for k, v in (labels or {str(i): ("background" if i == 0 else f"class {i}")
                                                for i in range(e.out_channels)}).items()}
    return ExportSource(name=entry, arch=e.arch, arch_kwargs=e.arch_kwargs, in_channels=e.in_channels,
                        out_channels=e.out_channels, patch_size=list(e.patch_size), labels=labels,
                        channels={str(i): "image" for i in range(e.in_channels)}, preprocessing=pre,
                        state=bank.load_state_dict(entry), plans=plans,
                        description=f"{e.arch} bank entry {entry} (source: {'+'.join(e.source) or 'scratch'})",
                        provenance=dict(e.provenance, bank=str(bank.root.resolve()), sha256=e.sha256))


def _inference_config(src: ExportSource) -> dict:
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, 'imagesTs', '*.nii*')) "
                    "or glob.glob(os.path.join(@dataset_dir, '*.nii*'))))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(src.arch, src.arch_kwargs, src.in_channels, src.out_channels, src.patch_size),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": src.preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(src.patch_size), "sw_batch_size": 2,
                    "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False}]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"},
                     {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": "$torch.cuda.is_available()"},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _train_config(src: ExportSource) -> dict:
    """``configs/train.json``: MONAI only, the zoo's conventions (``dataset_dir`` with ``imagesTr`` /
    ``labelsTr``, ``train#dataset#data`` overridable, ``train#handlers`` a list of dicts, as MONAI
    Label's bundle trainer expects); starts from ``models/model.pt`` (fine-tuning) unless
    ``--init_from_bundle false``. DiceCE, SGD 1e-2 Nesterov with poly decay (medxfer's recipe)."""
    fold_out = "$int(len(@images) * 0.8) if len(@images) > 1 else len(@images)"
    return {
        "imports": ["$import glob", "$import os", "$import torch", "$import monai"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/runs'",
        "dataset_dir": "/workspace/data",
        "images": "$list(sorted(glob.glob(os.path.join(@dataset_dir, 'imagesTr', '*.nii*'))))",
        "labels": "$list(sorted(glob.glob(os.path.join(@dataset_dir, 'labelsTr', '*.nii*'))))",
        "n_train": fold_out,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(src.arch, src.arch_kwargs, src.in_channels, src.out_channels, src.patch_size),
        "network": "$@network_def.to(@device)",
        "init_from_bundle": True,
        "max_epochs": 100, "val_interval": 5, "num_samples": 2, "learning_rate": 0.01,
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "momentum": 0.99, "nesterov": True, "weight_decay": 3.0e-5},
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.PolynomialLR", "optimizer": "@optimizer",
                         "total_iters": "@max_epochs", "power": 0.9},
        "train": {
            "preprocessing": {"_target_": "Compose",
                              "transforms": labelled_preprocessing(src) + train_augmentation(src.patch_size)},
            "dataset": {"_target_": "CacheDataset",
                        "data": "$[{'image': i, 'label': l} for i, l in zip(@images[:@n_train], @labels[:@n_train])]",
                        "transform": "@train#preprocessing", "cache_rate": 1.0, "num_workers": 0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 2, "shuffle": True,
                           "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "CheckpointLoader", "_disabled_": "$not @init_from_bundle",
                 "load_path": "$@ckpt_dir + '/model.pt'", "load_dict": {"model": "@network"},
                 "map_location": "@device"},
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"}],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@max_epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                        "optimizer": "@optimizer", "inferer": "@train#inferer", "train_handlers": "@train#handlers",
                        "amp": "$torch.cuda.is_available()"},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": labelled_preprocessing(src)},
            "dataset": {"_target_": "CacheDataset",
                        "data": "$[{'image': i, 'label': l} for i, l in zip(@images[@n_train:], @labels[@n_train:])]",
                        "transform": "@validate#preprocessing", "cache_rate": 1.0, "num_workers": 0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1,
                           "shuffle": False, "num_workers": 0},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(src.patch_size), "sw_batch_size": 2,
                        "overlap": 0.5, "mode": "gaussian"},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
                 "to_onehot": [src.out_channels, src.out_channels]}]},
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
                 "save_key_metric": True, "key_metric_filename": "model_finetuned.pt"}],
            "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                                             "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric", "val_handlers": "@validate#handlers",
                          "amp": "$torch.cuda.is_available()"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
    }


def _metadata(src: ExportSource, version: str, authors: str) -> dict:
    labels = {k: src.labels[k] for k in sorted(src.labels, key=int)}
    return {
        "schema": SCHEMA_URL, "version": version,
        "changelog": {version: f"exported by medxfer from {src.provenance.get('run') or src.provenance.get('bank')}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__, "required_packages_version": {"nibabel": _version("nibabel")},
        "name": src.name, "task": f"3D segmentation: {', '.join(v for k, v in labels.items() if k != '0')}",
        "description": src.description + f"; MONAI {MONAI_CLASSES.get(src.arch, src.arch)} with Gaussian "
                       f"sliding-window inference at {src.patch_size}, predictions inverted to the input geometry",
        "authors": authors, "copyright": f"Copyright (c) {authors}",
        "data_source": "the run's training data (see docs/README.md)", "data_type": "nibabel",
        "image_classes": f"{src.in_channels} channel(s) ({', '.join(src.channels.values())}), preprocessed by "
                         "configs/inference.json#preprocessing (numbers written there)",
        "label_classes": json.dumps(labels), "pred_classes": json.dumps(labels),
        "eval_metrics": src.eval_metrics,
        "intended_use": "Research on transfer learning for medical image segmentation; not for clinical use",
        "references": ["Yang et al., Pick the Best Pre-trained Model: Towards Transferability Estimation for "
                       "Medical Image Segmentation, MICCAI 2023"],
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": ", ".join(src.channels.values()),
                                 "num_channels": src.in_channels, "spatial_shape": list(src.patch_size),
                                 "dtype": "float32", "value_range": [], "is_patch_data": True,
                                 "channel_def": dict(src.channels)}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": src.out_channels,
                                 "spatial_shape": list(src.patch_size), "dtype": "float32", "value_range": [],
                                 "is_patch_data": True, "channel_def": labels}}},
    }


def _version(package: str) -> str:
    return distribution_version(package)


def write_metadata_schema(path) -> Path:
    """Write :data:`METADATA_SCHEMA` (the zoo's documented metadata requirements) to ``path``."""
    return atomic_write_text(path, json.dumps(METADATA_SCHEMA, indent=2) + "\n")


def _model_card(src: ExportSource, cfg: dict, meta: dict) -> str:
    steps = "\n".join(f"- `{t['_target_']}` " + ", ".join(f"{k}={v}" for k, v in t.items()
                                                          if k not in ("_target_", "keys")) for t in src.preprocessing)
    return f"""# {src.name}

{meta['description']}.

Exported by medxfer: a self-contained MONAI bundle. Inference needs MONAI (and nibabel) only.

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir /path/to/images
```

`dataset_dir` holds `imagesTs/*.nii.gz` (an MSD task) or `*.nii.gz`; predictions go to `eval/`.

## Network

`{cfg['network_def']['_target_']}`, {src.in_channels} input channel(s), {src.out_channels} outputs
({', '.join(f'{k}: {v}' for k, v in src.labels.items())}), window {src.patch_size}.

## Preprocessing (configs/inference.json#preprocessing)

{steps}

## Provenance

{json.dumps(src.provenance, indent=2, default=str)}

## Evaluation

{json.dumps(src.eval_metrics) if src.eval_metrics else 'none recorded with the run'}

Not for clinical use.
"""


def export_bundle(out, source: ExportSource, version: str = "0.1.0", authors: str = "medxfer user",
                  licence: str = "Apache License 2.0", overwrite: bool = False) -> Path:
    """Write the bundle folder ``out`` (see the module doc); written beside it and renamed when complete,
    so a failure leaves nothing half-written. An existing ``out`` is refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists; choose another folder or pass overwrite")
    cfg = _inference_config(source)
    built = build_network(source.arch, source.in_channels, source.out_channels, source.patch_size, **source.arch_kwargs)
    own = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    if own != {k: tuple(v.shape) for k, v in source.state.items()}:
        raise ValueError(f"{source.name}: the weights do not match {source.arch} {source.arch_kwargs}")
    meta = _metadata(source, version, authors)
    with atomic_directory(out, overwrite=overwrite or out.exists()) as tmp:
        tmp = Path(tmp)
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        (tmp / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4) + "\n")
        (tmp / "configs" / "train.json").write_text(json.dumps(_train_config(source), indent=4) + "\n")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        (tmp / "configs" / "logging.conf").write_text(_LOGGING_CONF)
        atomic_torch_save({k: v.detach().cpu() for k, v in source.state.items()}, tmp / "models" / "model.pt")
        weights = tmp / "models" / "model.pt"
        if weights.stat().st_size > ZOO_FILE_LIMIT:  # the zoo keeps large weights out of git
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
            (tmp / "large_files.yml").write_text(
                "large_files:\n  - path: models/model.pt\n    url: ''   # upload models/model.pt and put its URL here\n"
                f"    hash_val: {digest}\n    hash_type: sha256\n")
        (tmp / "docs" / "README.md").write_text(_model_card(source, cfg, meta))
        (tmp / "docs" / "data_license.txt").write_text(
            "The weights were trained on the data named in docs/README.md (Provenance); its licence applies to "
            "any use of the weights. Generated data (medxfer synth) carries no restriction.\n")
        (tmp / "LICENSE").write_text(f"{licence}\n")
    return out


def export_program(bundle_dir, filename: str = "models/model.pt2") -> Path:
    """``torch.export`` program of a bundle's ``network_def`` with its weights, at the metadata's
    input shape: the deployable form for networks TorchScript cannot script (SwinUNETR)."""
    bundle = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(read_checkpoint(bundle / "models" / "model.pt"))
    image = read_json(bundle / "configs" / "metadata.json")["network_data_format"]["inputs"]["image"]
    example = torch.zeros((1, int(image["num_channels"]), *[int(s) for s in image["spatial_shape"]]))
    program = torch.export.export(net, (example,))
    path = bundle / filename
    torch.export.save(program, str(path))
    return path

