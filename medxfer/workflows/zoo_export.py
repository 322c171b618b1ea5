"""Export a model as a self-contained MONAI model-zoo bundle (issue 15; SPEC section 12).

From a finished ``bundles/msd_seg3d`` training / fine-tuning run folder (``run.json``, ``plans.json``,
``model.pt``), a finished ``bundles/seg2d_transfer`` training run folder (``run.json``, ``model.pt``),
one fold of a ``bundles/tatl_skin`` run (``tatl_run.json``; TATL below) or from a model-bank entry,
:func:`export_bundle` writes::

    <bundle>/
      LICENSE
      configs/metadata.json        # schema 20240725 keys, network_data_format (inputs.image, outputs.pred)
      configs/inference.json       # MONAI only: network_def, preprocessing with the numbers baked in,
                                   #   inferer, Invertd, SaveImaged, dataset_dir
      configs/train.json           # MONAI only: fine-tuning from models/model.pt on dataset_dir
      configs/evaluate.json        # over train.json: mean Dice of models/model.pt on the validation cases
      configs/multi_gpu_train.json # over train.json: DDP under torchrun (NCCL; gloo on CPU)
      configs/logging.conf
      models/model.pt              # the network's state dict (+ large_files.yml above the zoo's 25 MB)
                                   #   (TATL: the main network's; models/<name>.pt for the others)
      scripts/                     # 2D networks / the TATL pipeline MONAI lacks: their code, copied (see below)
      docs/README.md               # model card
      docs/data_license.txt

The inference config calls nothing of medxfer.

3D: the network is a MONAI class with literal keyword arguments (the registry's defaults merged
in), the preprocessing is the run's chain written out as MONAI transforms (``Orientationd`` RAS,
``Spacingd`` to the planned spacing, ``CropForegroundd`` on the body, the plans' CT clip + z-score
as one ``ScaleIntensityRanged`` with its numbers, or MR per-image z-score), so ``python -m
monai.bundle run --config_file configs/inference.json --dataset_dir D`` predicts what medxfer's own
inference predicts, in a venv with MONAI only. ``required_packages_version``: ``nibabel``.

2D (``seg2d_transfer`` runs): the thesis networks (``unet2d``, ``resnet50_attention_unet``,
``swin_unet``), the truncated segmenters and LinkNet-effb0 are not MONAI classes, so their modules
travel in the bundle's own ``scripts/`` package, as the zoo's bundles carry custom code: the module
of the class and every medxfer module it imports (found with ``ast``), copied unchanged except
that imports of medxfer become relative imports inside ``scripts`` (so the bundle imports nothing
of medxfer); ``network_def`` is ``scripts.<module>.<Class>`` with literal keyword arguments
(``unet_effb0`` is MONAI's ``FlexibleUNet`` and needs no scripts). MONAI puts the bundle root on
``sys.path`` only in ``ConfigWorkflow.run``, after the config's imports and outside ``verify_net_in_out``,
``ckpt_export`` and ``monai.bundle.load``; so ``network_def`` requires the id ``scripts_path``,
which puts the absolute ``bundle_root`` first on ``sys.path`` and drops a ``scripts`` module
imported from elsewhere (another bundle's, or a namespace package of some ``scripts/`` folder of
the working directory). With ``"$import scripts"`` in ``imports`` (the zoo's convention), the bundle
runs from its own folder or from any other with ``--bundle_root``. The preprocessing is
medxfer's ``seg2d_transforms("infer", image_size)`` written out: PIL rows first with RGB
conversion, 0..255 -> 0..1, bilinear resize with anti-aliasing to the run's ``image_size``,
per-channel normalisation with the ImageNet mean and std (the numbers medxfer's seg2d inference
uses). The whole resized image goes through the network (``SimpleInferer``, as
:class:`medxfer.workflows.seg2d_transfer.Seg2DRun`), the logits are resized back to the image's
size (``Invertd``: plain bilinear), then sigmoid > 0.5 (binary, saved 0/255) or argmax (saved as
label indices), written as ``<output_dir>/<image stem>.png``: medxfer's own masks, byte for byte.
``required_packages_version``: ``pillow`` (+ any non-MONAI package the copied code imports).

TATL (:func:`source_from_tatl_run`, one fold of a run): inference only. ``configs/inference.json``
has one ``<name>_def`` per network of the fold (``segment_net_def``, ``agnostic_<arch>_def``,
``target_<attribute>_<arch>_def``) with literal arguments (U shape: MONAI's ``FlexibleUNet``; Link
shape: ``scripts.linknet.LinkNetEffB0``; the decoder each checkpoint was trained with), each loaded
by its own ``CheckpointLoader`` from ``models/<name>.pt``; ``network_def`` refers to the main network,
the first of the pipeline (the Segment-Net; without stage 1 the first stage-2 segmenter), whose
weights are ``models/model.pt``. The pipeline MONAI lacks (Segment-Net box, crop, U + Link
averaging, paste back, the writer of masks, union map and overlay) is medxfer's
:mod:`medxfer.transfer.tatl_inference`, copied into ``scripts/`` with what it imports, run by a MONAI
``Evaluator`` one image per iteration: the masks medxfer's ``run_inference`` writes, byte for byte
(not its ``predictions.json`` summary). ``metadata.json``: ``network_data_format`` of the main
network, ``networks`` with an entry per ``<name>_def`` (config id, weights file, stage, inputs /
outputs). No ``train.json`` / ``evaluate.json``: TATL's training is a three-stage cross-validation
of up to 13 networks per fold (medxfer's ``tatl_skin`` bundle), not one MONAI trainer.
``required_packages_version``: ``pillow``, ``scipy``.

Not exported (yet): 2D bank entries
(pretraining encoders, not segmenters), nnU-Net-preprocessed entries (nnU-Net's preprocessing is
not MONAI's). SwinUNETR cannot be scripted with TorchScript (``ckpt_export`` fails inside its window
attention); :func:`export_program` writes a ``torch.export`` program instead.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import sys
import uuid
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions
from importlib.metadata import version as distribution_version
from pathlib import Path
from typing import Mapping, Sequence

import monai
import numpy
import torch
from monai.bundle import ConfigParser

import medxfer
from medxfer.atomic import atomic_directory, atomic_torch_save, atomic_write_text
from medxfer.data.image_folder import IMAGE_SUFFIXES
from medxfer.data.isic import ISIC_LAYOUTS
from medxfer.data.problems import DatasetError, read_json
from medxfer.networks import build_network, network_spec
from medxfer.transfer.bank import ModelBank
from medxfer.transfer.tatl import decoder_block_of, load_trained, tatl_arch_kwargs
from medxfer.transfer.weights import read_checkpoint
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD
from medxfer.transforms.msd import CT_BODY_HU, RAS_LABELS
from medxfer.transforms.preprocessing import preprocessing_kind
from medxfer.workflows.msd_seg3d import read_run_record
from medxfer.workflows.tatl_skin import IMAGE_SUFFIXES as TATL_IMAGE_SUFFIXES
from medxfer.workflows.tatl_skin import MASK_STEMS, TatlSettings, network_dir

__all__ = ["ZOO_FILE_LIMIT", "SCHEMA_URL", "METADATA_SCHEMA", "MONAI_CLASSES", "SCRIPTS_NETWORKS", "ExportSource",
           "TatlNetwork", "source_from_run", "source_from_seg2d_run", "source_from_tatl_run", "source_from_bank", "network_def", "plans_preprocessing",
           "labelled_preprocessing", "train_augmentation", "seg2d_preprocessing", "copy_network_code",
           "export_bundle", "write_metadata_schema", "export_program", "TATL_PIPELINE_MODULES"]

#: The model zoo's limit per committed file; larger weights go to ``large_files.yml``.
ZOO_FILE_LIMIT = 25 * 1024 * 1024
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
#: Registered arch -> MONAI network class (``network_def`` ``_target_``).
MONAI_CLASSES = {"unet": "UNet", "unetr": "UNETR", "swinunetr": "SwinUNETR", "segresnet": "SegResNet",
                 "dynunet": "DynUNet", "basicunet": "BasicUNet", "flexibleunet": "FlexibleUNet"}
#: Registered 2D arch MONAI lacks -> (medxfer module, class): the module (and the medxfer modules it
#: imports) is copied into the bundle's ``scripts/``; ``network_def`` is ``scripts.<module>.<class>``.
SCRIPTS_NETWORKS = {"unet2d": ("medxfer.networks.unet2d", "UNet2D"),
                    "resnet50_attention_unet": ("medxfer.networks.attention_unet", "ResNet50AttentionUNet"),
                    "swin_unet": ("medxfer.networks.swin_unet", "SwinUNet"),
                    "truncated_resnet50": ("medxfer.networks.truncated", "TruncatedSegmenter"),
                    "truncated_densenet121": ("medxfer.networks.truncated", "TruncatedSegmenter"),
                    "linknet_effb0": ("medxfer.networks.linknet", "LinkNetEffB0")}
#: The id that puts the bundle's ``scripts`` package on ``sys.path`` (required by a scripts ``network_def``).
SCRIPTS_PATH_ID = "scripts_path"
#: Packages the metadata names with their own keys (``monai_version``...), never in ``required_packages_version``.
_SCHEMA_PACKAGES = {"monai", "torch", "numpy"}

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
        # medxfer's multi-network bundles (TATL): one entry per `<name>_def` of configs/inference.json,
        # each with its own inputs / outputs (an extra key: the zoo's schema allows additional ones)
        "networks": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["config_id", "weights", "inputs", "outputs"], "properties": {
                "config_id": {"type": "string"}, "weights": {"type": "string"},
                "inputs": {"type": "object", "required": ["image"], "additionalProperties": _TENSOR},
                "outputs": {"type": "object", "required": ["pred"], "additionalProperties": _TENSOR}}}},
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
    kind: str = "seg3d"                    # "seg3d" (NIfTI volumes) or "seg2d" (PIL images; patch_size = image size)
    normalization: dict = field(default_factory=dict)  # seg2d: per-channel "mean" and "std" on the 0..1 scale
    networks: list["TatlNetwork"] = field(default_factory=list)  # tatl: every network of the fold, main first
    tatl: dict = field(default_factory=dict)  # tatl: the pipeline's settings (working size, offset, union, ...)


@dataclass
class TatlNetwork:
    """One network of an exported TATL fold (:func:`source_from_tatl_run`)."""

    name: str                              # segment_net, agnostic_<arch>, target_<attribute>_<arch>
    stage: int
    arch: str                              # unet_effb0 | linknet_effb0
    arch_kwargs: dict                      # tatl_arch_kwargs(arch, the checkpoint's decoder_block)
    state: dict[str, torch.Tensor]
    attribute: str | None = None


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
    if spec.name in SCRIPTS_NETWORKS or spec.name == "unet_effb0":
        return _network_def_2d(spec.name, spec.kwargs(arch_kwargs), int(in_channels), int(out_channels), patch_size)
    if spec.name not in MONAI_CLASSES:
        raise ValueError(f"{spec.name} is not a MONAI network and has no scripts/ export")
    kwargs = json.loads(json.dumps(spec.kwargs(arch_kwargs)))  # tuples -> lists: plain JSON
    out = {"_target_": MONAI_CLASSES[spec.name], "spatial_dims": len(patch_size), "in_channels": int(in_channels),
           "out_channels": int(out_channels), **kwargs}
    if spec.name == "unetr":
        out["img_size"] = [int(p) for p in patch_size]
    return out


def _plain(value):
    """Tuples -> lists (JSON), recursively."""
    return json.loads(json.dumps(value))


def _network_def_2d(name: str, kwargs: dict, in_channels: int, out_channels: int, image_size: Sequence[int]) -> dict:
    """``network_def`` of a registered 2D network: ``scripts.<module>.<Class>`` with the arguments
    the registry's builder passes (:mod:`medxfer.networks.registry`), or MONAI's ``FlexibleUNet``
    for ``unet_effb0``; the arguments are checked against the class's signature here."""
    kwargs = _plain(dict(kwargs))
    if kwargs.pop("encoder_classifier", False):
        raise ValueError(f"{name}: an encoder classifier (pretraining) is not a segmentation network; export the "
                         "segmentation run trained from it")
    if name == "unet_effb0":  # medxfer.networks.effnet_unet.unet_effb0: MONAI's FlexibleUNet, never pretrained
        kwargs.pop("backbone", None)
        if kwargs.pop("pretrained", False):
            raise ValueError("unet_effb0: pretrained=True would download weights; export the trained weights instead")
        return {"_target_": "FlexibleUNet", "in_channels": in_channels, "out_channels": out_channels,
                "backbone": "efficientnet-b0", "pretrained": False, "spatial_dims": 2, **kwargs}
    module, cls = SCRIPTS_NETWORKS[name]
    if name.startswith("truncated_"):  # TruncatedSegmenter(encoder arch, level, out, in, ...)
        args = {"arch": name[len("truncated_"):], "level": int(kwargs.pop("level", 3)), "out_channels": out_channels,
                "in_channels": in_channels, **kwargs}
    else:
        args = {"in_channels": in_channels, "out_channels": out_channels, **kwargs}
        if name == "swin_unet":  # medxfer.networks.seg2d.build_thesis_network: the nominal size, first side
            args["img_size"] = int(image_size[0])
    target = getattr(importlib.import_module(module), cls)
    try:
        inspect.signature(target).bind(**args)
    except TypeError as e:
        raise ValueError(f"{name}: {cls} does not take these arguments {args}: {e}") from None
    return {"_target_": f"scripts.{module.rsplit('.', 1)[1]}.{cls}", "_requires_": f"@{SCRIPTS_PATH_ID}", **args}


def _stdlib(name: str) -> bool:
    return name in sys.stdlib_module_names or name == "__future__"


def _byte_to_char(line: str, col: int) -> int:
    """``ast`` column offsets count UTF-8 bytes; string slicing counts characters."""
    return len(line.encode("utf-8")[:col].decode("utf-8", errors="ignore"))


def copy_network_code(modules: Sequence[str], dest) -> tuple[dict[str, str], dict[str, str]]:
    """Copy the medxfer ``modules`` and every medxfer module they import (at any depth, also
    imports inside functions) into the package folder ``dest`` (``<bundle>/scripts``), one file
    per module named by its last component, with each medxfer import rewritten to a relative
    import of the copy (``from medxfer.networks.layout import X`` -> ``from .layout import X``);
    nothing else changes. Writes ``dest/__init__.py``.

    Returns ``({medxfer module: file name}, {distribution: version})``: the packages besides MONAI,
    PyTorch, NumPy and the standard library that the copied code imports (for
    ``required_packages_version``). Refused (ValueError, naming the file): ``import medxfer...``
    statements, imports of a medxfer package (``from medxfer.networks import x``: it would pull in
    the whole package), two modules with one file name, third-party imports that are not installed."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    todo, files, third_party = list(modules), {}, set()
    sources: dict[str, tuple[Path, str, list]] = {}
    while todo:
        module = todo.pop(0)
        if module in sources:
            continue
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or spec.submodule_search_locations is not None:
            raise ValueError(f"{module}: not a medxfer module file (packages are not copied into scripts/)")
        path = Path(spec.origin)
        text = path.read_text(encoding="utf-8")
        rewrites = []
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    if top == "medxfer":
                        raise ValueError(f"{path}:{node.lineno}: `import {alias.name}` cannot be rewritten into "
                                         "the bundle's scripts/ package; use `from <module> import <name>`")
                    if not _stdlib(top):
                        third_party.add(top)
            elif isinstance(node, ast.ImportFrom):
                target = (importlib.util.resolve_name("." * node.level + (node.module or ""), module.rpartition(".")[0])
                          if node.level else node.module)
                top = target.split(".")[0]
                if top != "medxfer":
                    if not _stdlib(top):
                        third_party.add(top)
                    continue
                todo.append(target)
                rewrites.append((node, target))
        sources[module] = (path, text, rewrites)
        name = module.rsplit(".", 1)[1]
        if name in files.values() or name == "__init__":
            raise ValueError(f"{path}: two modules would be scripts/{name}.py")
        files[module] = name
    for module, (path, text, rewrites) in sources.items():
        lines = text.splitlines(keepends=True)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line))
        # from the end, so that earlier offsets stay valid
        for node, target in sorted(rewrites, key=lambda r: (r[0].lineno, r[0].col_offset), reverse=True):
            begin = starts[node.lineno - 1] + _byte_to_char(lines[node.lineno - 1], node.col_offset)
            end = starts[node.end_lineno - 1] + _byte_to_char(lines[node.end_lineno - 1], node.end_col_offset)
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            text = text[:begin] + f"from .{files[target]} import {names}" + text[end:]
        rel = path.relative_to(Path(medxfer.__file__).parent.parent).as_posix()
        header = (f"# Copied from {rel} (medxfer {medxfer.__version__}) by `medxfer export-bundle`: imports of "
                  "medxfer modules\n# point to their copies in this package; the code is otherwise unchanged.\n")
        (dest / f"{files[module]}.py").write_text(header + text, encoding="utf-8")
    (dest / "__init__.py").write_text(
        '"""The network code of this bundle (copied by `medxfer export-bundle`; nothing here imports medxfer)."""\n')
    owners = packages_distributions()
    required = {}
    for top in sorted(third_party - _SCHEMA_PACKAGES):
        if top not in owners:
            raise ValueError(f"{dest}: the copied code imports {top!r}, which no installed distribution provides")
        dist = owners[top][0]
        required[dist] = distribution_version(dist)
    return files, required


def seg2d_preprocessing(image_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                        labels: Mapping | None = None, train: bool = False) -> list[dict]:
    """:func:`medxfer.transforms.seg2d.seg2d_transforms` as MONAI transform configs with the numbers
    written in: ``"infer"`` (image only), with ``labels`` ``"eval"``, with ``train`` too ``"train"``
    (flips and one affine, same draw for image and mask). PIL reads rows first (``reverse_indexing``
    false, as :func:`medxfer.transforms.dermoscopy.image_reader`) and converts to RGB (masks to 8-bit
    grey); a binary dataset's 0/255 (or 0/1) masks become 0/1. ``train``: the thesis' downstream
    augmentation (``augment="thesis"``, the seg2d_transfer default)."""
    size = [int(s) for s in image_size]
    rgb = {"_target_": "PILReader", "converter": "$lambda im: im if im.mode == 'RGB' else im.convert('RGB')",
           "reverse_indexing": False}
    chain = [{"_target_": "LoadImaged", "keys": "image", "reader": rgb, "image_only": True},
             {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": -1},
             {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0,
              "b_max": 1.0},
             {"_target_": "Resized", "keys": "image", "spatial_size": size, "mode": "bilinear", "anti_aliasing": True}]
    keys = ["image"]
    if labels is not None:
        grey = {"_target_": "PILReader", "converter": "$lambda im: im if im.mode == 'L' else im.convert('L')",
                "reverse_indexing": False}
        chain += [{"_target_": "LoadImaged", "keys": "label", "reader": grey, "image_only": True},
                  {"_target_": "EnsureChannelFirstd", "keys": "label", "channel_dim": "no_channel"}]
        if len(labels) == 2:  # medxfer.data.seg2d.mask_to_index: any non-zero value is the foreground
            chain.append({"_target_": "Lambdad", "keys": "label", "func": "$lambda m: (m > 0).float()"})
        chain.append({"_target_": "Resized", "keys": "label", "spatial_size": size, "mode": "nearest-exact"})
        keys = ["image", "label"]
        if train:  # medxfer.transforms.seg2d._thesis_augment: rotation U[0, pi] (always), row flip p = 1/2
            chain += [{"_target_": "RandRotated", "keys": keys, "range_x": [0.0, math.pi], "prob": 1.0,
                       "keep_size": True, "mode": ["bilinear", "nearest"], "padding_mode": "zeros"},
                      {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 0}]
    chain += [{"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": [float(m) for m in mean],
               "divisor": [float(s) for s in std], "channel_wise": True},
              {"_target_": "EnsureTyped", "keys": keys, "dtype": "$torch.float32"}]
    return chain


def _finite_metrics(summary: Mapping) -> dict:
    return {f"val_{k}": v["mean"] for k, v in summary.items()
            if isinstance(v, Mapping) and isinstance(v.get("mean"), (int, float)) and math.isfinite(v["mean"])}


def source_from_seg2d_run(run_dir, name: str | None = None) -> ExportSource:
    """A finished ``bundles/seg2d_transfer`` training run folder (``run.json`` + ``model.pt``): the
    network :class:`medxfer.workflows.seg2d_transfer.Seg2DRun` rebuilds, its weights, and the
    chain its inference uses (``seg2d_transforms("infer", image_size)``: ImageNet mean and std,
    which the run does not change). ``evaluation/metrics.json`` (``evaluate.yaml``) gives the
    metadata's ``eval_metrics`` when present."""
    run = Path(run_dir)
    record = read_json(run / "run.json", "not a seg2d_transfer training folder (no run.json)")
    if not (run / "model.pt").is_file():
        raise DatasetError(run / "model.pt", "not found: the run has not finished (no checkpoint)")
    size = record["image_size"]
    size = [int(size)] * 2 if isinstance(size, (int, float)) else [int(s) for s in size]
    labels = {str(k): v for k, v in record["labels"].items()}
    out_channels = int(record.get("out_channels", 1 if len(labels) == 2 else len(labels)))
    metrics = {}
    eval_file = run / "evaluation" / "metrics.json"
    if eval_file.is_file():
        metrics = _finite_metrics(read_json(eval_file).get("summary", {}))
    norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return ExportSource(name=name or run.name, arch=record["arch"], arch_kwargs=dict(record.get("arch_kwargs") or {}),
                        in_channels=int(record.get("in_channels", 3)), out_channels=out_channels, patch_size=size,
                        labels=labels, channels={"0": "R", "1": "G", "2": "B"},
                        preprocessing=seg2d_preprocessing(size, norm["mean"], norm["std"]),
                        state=read_checkpoint(run / "model.pt"),
                        description=f"{record['arch']} 2D segmentation trained with medxfer "
                                    f"({record.get('workflow', 'seg2d_transfer/train')}) on "
                                    f"{Path(str(record.get('settings', {}).get('data_root', 'its data'))).name}",
                        provenance={"run": str(run.resolve()), "transfer": record.get("transfer")},
                        eval_metrics=metrics, kind="seg2d", normalization=norm)


def source_from_run(run_dir, name: str | None = None, fold: int | None = None) -> ExportSource:
    """A finished training run folder: ``bundles/msd_seg3d`` (``run.json`` + ``plans.json`` +
    ``model.pt``), ``bundles/seg2d_transfer`` (its ``run.json`` says ``"workflow":
    "seg2d_transfer/..."``; :func:`source_from_seg2d_run`) or a ``bundles/tatl_skin`` run
    (``tatl_run.json``; :func:`source_from_tatl_run`, ``fold``). ``fold`` is refused for the others."""
    run = Path(run_dir)
    if (run / "tatl_run.json").is_file():
        return source_from_tatl_run(run, fold, name)
    if fold is not None:
        raise ValueError(f"{run}: fold applies to TATL runs only (a folder with tatl_run.json)")
    record = read_run_record(run)
    if record is None:
        raise DatasetError(run / "run.json", "not a medxfer training run folder (run.json not found)")
    if str(record.get("workflow", "")).startswith("seg2d_transfer"):
        return source_from_seg2d_run(run, name)
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


#: The medxfer modules of the TATL pipeline a bundle copies into ``scripts/`` (with what they import):
#: the predictor (Segment-Net box, crop, U + Link averaging, paste back), the writer, LinkNet-effb0.
TATL_PIPELINE_MODULES = ("medxfer.transfer.tatl_inference", "medxfer.networks.linknet")


def _tatl_networks(settings: TatlSettings) -> list[tuple[str, int, str, str | None]]:
    """``(name, stage, arch, attribute)`` of a fold's networks in pipeline order (the main one first)."""
    nets = [("segment_net", 1, "unet_effb0", None)] if 1 in settings.stages else []
    if 2 in settings.stages:
        nets += [(f"agnostic_{arch}", 2, arch, None) for arch in settings.arches]
    return nets + [(f"target_{a}_{arch}", 3, arch, a) for a in ISIC_LAYOUTS[settings.year].attributes
                   for arch in settings.arches]


def source_from_tatl_run(run_dir, fold: int | None = None, name: str | None = None) -> ExportSource:
    """One fold of a ``bundles/tatl_skin`` cross-validation run (``tatl_run.json``, the networks at
    ``fold_<k>/<name>/model.pt``): every network the fold's inference uses (the Segment-Net with
    stage 1, the stage-2 attribute-agnostic segmenters with stage 2, the target segmenters), each
    checked to load strictly with the decoder its checkpoint was trained with, and the run's
    settings (working size, box offset, threshold, normalisation). ``fold`` None: the lowest
    ``fold_<k>`` of the run. The main network (``network_def``, ``models/model.pt``) is the first of
    the pipeline: the Segment-Net (its input is the bundle's input image), else the first stage-2
    segmenter, else the first target segmenter. The union map is the stage-2 prediction
    (``union: stage2``, as medxfer's inference) when the run has stage 2, else the OR of the
    attribute masks."""
    run = Path(run_dir)
    settings = TatlSettings.load(run)
    if settings.year is None:
        raise DatasetError(run / "tatl_run.json", "no ISIC year recorded: the run has not started training")
    folds = sorted(int(p.name.split("_", 1)[1]) for p in run.glob("fold_*") if p.is_dir() and
                   p.name.split("_", 1)[1].isdigit())
    if fold is None:
        if not folds:
            raise DatasetError(run, "no fold_<k> folder: nothing was trained here")
        fold = folds[0]
    fold_dir = run / f"fold_{int(fold)}"
    if not fold_dir.is_dir():
        raise DatasetError(fold_dir, f"no such fold in the run (folds: {folds})")
    networks = []
    for net_name, stage, arch, attribute in _tatl_networks(settings):
        kind = {1: "segment_net", 2: "agnostic", 3: "target"}[stage]
        path = network_dir(fold_dir, kind, arch, attribute) / "model.pt"
        if not path.is_file():
            raise DatasetError(path, "not found: the fold has not finished training this network")
        state = read_checkpoint(path)
        load_trained(arch, path)  # every key fits the network its decoder_block builds (ValueError naming the file)
        networks.append(TatlNetwork(net_name, stage, arch, tatl_arch_kwargs(arch, decoder_block_of(arch, state)),
                                    state, attribute))
    attributes = list(ISIC_LAYOUTS[settings.year].attributes)
    metrics = {}
    scores = fold_dir / "scores.json"
    if scores.is_file():
        for attribute, row in read_json(scores).get("attributes", {}).items():
            for key in ("jaccard", "dice"):
                value = row.get(key) if isinstance(row, Mapping) else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    metrics[f"test_fold_{key}_{attribute}"] = value
    main = networks[0]
    size = [int(s) for s in settings.working_size]
    union = "stage2" if 2 in settings.stages else "or_stage3"
    return ExportSource(
        name=name or f"{run.name}_fold{int(fold)}", arch=main.arch, arch_kwargs=main.arch_kwargs, in_channels=3,
        out_channels=1, patch_size=size, labels={str(i): a for i, a in enumerate(attributes)},
        channels={"0": "R", "1": "G", "2": "B"}, preprocessing=[], state=main.state,
        description=f"TATL skin-attribute segmentation (fold {int(fold)} of a medxfer tatl_skin run on ISIC "
                    f"{settings.year}, stages {'+'.join(str(x) for x in settings.stages)}, {settings.tatl_mode})",
        provenance={"run": str(run.resolve()), "fold": int(fold), "settings": settings.to_json()},
        eval_metrics=metrics, kind="tatl", normalization={"mean": list(settings.mean), "std": list(settings.std)},
        networks=networks,
        tatl={"year": settings.year, "attributes": attributes, "stages": list(settings.stages),
              "arches": list(settings.arches), "working_size": size, "offset": float(settings.offset),
              "threshold": float(settings.threshold), "union": union, "fold": int(fold)})


def source_from_bank(bank_root, entry: str, labels: Mapping | None = None) -> ExportSource:
    """A model-bank entry: its network and weights; its preprocessing (a recorded MONAI list, or the
    source plans' numbers recorded by medxfer's pretraining)."""
    bank = ModelBank.open(bank_root)
    e = bank.get(entry)
    spec = network_spec(e.arch)
    if spec.spatial_dims == 2 and not spec.any_dims:
        raise DatasetError(bank.manifest, f"entry {entry!r} is a 2D {e.arch} (an encoder pretraining checkpoint "
                                          "records no segmentation preprocessing); export the seg2d_transfer "
                                          "training run folder instead")
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


def _scripts_ids() -> dict:
    """``bundle_dir`` + :data:`SCRIPTS_PATH_ID` (see the module docstring): ``bundle_root`` first on
    ``sys.path``, and any ``scripts`` module not loaded from ``<bundle_root>/scripts`` dropped."""
    own = "os.path.join(@bundle_dir, 'scripts') + os.sep"
    return {
        "bundle_dir": "$os.path.abspath(os.path.expanduser(@bundle_root))",
        SCRIPTS_PATH_ID: "$sys.path.insert(0, @bundle_dir) or [sys.modules.pop(m) for m in sorted(sys.modules) "
                         "if m.split('.')[0] == 'scripts' and not os.path.abspath(getattr(sys.modules[m], "
                         f"'__file__', None) or os.sep).startswith({own})]",
    }


def _image_list(folder: str) -> str:
    """Expression: the image files of ``folder`` (medxfer's suffixes, any case; ``glob`` leaves hidden
    files out), sorted; none for a missing folder."""
    return (f"$sorted(p for p in glob.glob(os.path.join({folder}, '*')) "
            f"if os.path.splitext(p)[1].lower() in {list(IMAGE_SUFFIXES)})")


def _without_scripts(cfg: dict) -> dict:
    """``cfg`` without the scripts import and ids when its ``network_def`` is a MONAI class."""
    if cfg["network_def"].get("_requires_") is None:
        cfg["imports"] = [i for i in cfg["imports"] if i != "$import scripts"]
        for key in ("bundle_dir", SCRIPTS_PATH_ID):
            cfg.pop(key)
    return cfg


def _seg2d_inference_config(src: ExportSource) -> dict:
    """``configs/inference.json`` of a 2D network (module docstring): ``dataset_dir/images`` (the
    folder-pair layout) or ``dataset_dir`` itself holds the images; masks go to ``output_dir``."""
    binary = src.out_channels == 1
    decide = ({"_target_": "Lambdad", "keys": "pred", "func": "$lambda p: (torch.sigmoid(p) > 0.5).float()"}
              if binary else {"_target_": "AsDiscreted", "keys": "pred", "argmax": True})
    return _without_scripts({
        "imports": ["$import glob", "$import os", "$import sys", "$import numpy", "$import torch", "$import scripts"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "image_dir": "$os.path.join(@dataset_dir, 'images') if os.path.isdir(os.path.join(@dataset_dir, 'images')) "
                     "else @dataset_dir",
        "datalist": _image_list("@image_dir"),
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        **_scripts_ids(),
        "network_def": network_def(src.arch, src.arch_kwargs, src.in_channels, src.out_channels, src.patch_size),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": src.preprocessing},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        # rows first, as read: the PNG writer must not swap the axes (its default assumes MONAI's PILReader)
        "saver": {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "",
                  "output_ext": ".png", "output_dtype": "$numpy.uint8", "scale": 255 if binary else None,
                  "resample": False, "separate_folder": False, "writer": "PILWriter", "print_log": False},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            decide,
            "$@saver.set_options(write_kwargs={'reverse_indexing': False})"]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"},
                     {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    })


def _seg2d_train_config(src: ExportSource) -> dict:
    """``configs/train.json`` of a 2D network: ``bundles/seg2d_transfer/configs/train.yaml`` in MONAI
    only, fine-tuning every layer from ``models/model.pt`` (``--init_from_bundle false``: from the
    random init). ``dataset_dir`` is a folder-pair set (``images/`` + ``masks/<stem>.png``); the
    first 80 % of the sorted images train, the rest validate (``train#dataset#data`` and
    ``validate#dataset#data`` are overridable, as MONAI Label does). The thesis recipe
    (``recipe: thesis`` of ``train.yaml``): 150 epochs, batch 24, SGD lr 0.05 momentum 0.9 weight
    decay 1e-4, poly decay 0.9 after every step, the batch-wise squared Dice loss with background
    (:func:`medxfer.workflows.seg2d_transfer.thesis_dice_loss` written in MONAI: a binary network's
    sigmoid ``p`` scored as ``[1 - p, p]``), rotations over [0, pi] and row flips."""
    binary = src.out_channels == 1
    n = len(src.labels)
    mean, std = src.normalization["mean"], src.normalization["std"]
    post = ([{"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
             {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}] if binary else
            [{"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": [n, n]}])
    records = "$[{'image': i, 'label': l} for i, l in zip(@images[%s], @labels[%s])]"
    return _without_scripts({
        "imports": ["$import glob", "$import os", "$import sys", "$import torch", "$import monai", "$import scripts"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/runs'",
        "dataset_dir": "/workspace/data",
        "images": _image_list("os.path.join(@dataset_dir, 'images')"),
        "labels": "$[os.path.join(@dataset_dir, 'masks', os.path.splitext(os.path.basename(i))[0] + '.png') "
                  "for i in @images]",
        "n_train": "$int(len(@images) * 0.8) if len(@images) > 1 else len(@images)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        **_scripts_ids(),
        "network_def": network_def(src.arch, src.arch_kwargs, src.in_channels, src.out_channels, src.patch_size),
        "network": "$@network_def.to(@device)",
        "init_from_bundle": True,
        "max_epochs": 150, "val_interval": 1, "batch_size": 24, "learning_rate": 0.05,
        "dice": {"_target_": "DiceLoss", "include_background": True, "squared_pred": True, "batch": True,
                 "smooth_nr": 1.0e-5, "smooth_dr": 1.0e-5, "softmax": not binary, "to_onehot_y": not binary},
        # binary: the sigmoid scored with its background channel (thesis eq. 2.10); the lambda gets the
        # loss as an argument (names inside a config lambda resolve in the config's globals only)
        "loss": ("$(lambda dice: lambda p, y: dice(torch.cat([1 - torch.sigmoid(p), torch.sigmoid(p)], 1), "
                 "torch.cat([1 - y, y], 1)))(@dice)") if binary else "@dice",
        "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "momentum": 0.9, "weight_decay": 1.0e-4},
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.PolynomialLR", "optimizer": "@optimizer",
                         "total_iters": "$@max_epochs * len(@train#dataloader)", "power": 0.9},
        "train": {
            "preprocessing": {"_target_": "Compose", "transforms": seg2d_preprocessing(
                src.patch_size, mean, std, src.labels, train=True)},
            "dataset": {"_target_": "CacheDataset", "data": records % (":@n_train", ":@n_train"),
                        "transform": "@train#preprocessing", "cache_rate": 1.0, "num_workers": 0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                           "shuffle": True, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            **_trainer_parts(lr_per_step=True),
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": seg2d_preprocessing(src.patch_size, mean, std,
                                                                                        src.labels)},
            "dataset": {"_target_": "CacheDataset", "data": records % ("@n_train:", "@n_train:"),
                        "transform": "@validate#preprocessing", "cache_rate": 1.0, "num_workers": 0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": "@batch_size",
                           "shuffle": False, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose", "transforms": post},
            **_validator_parts(include_background=binary),
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
    })


def _inference_config(src: ExportSource) -> dict:
    if src.kind == "seg2d":
        return _seg2d_inference_config(src)
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


def _trainer_parts(lr_per_step: bool = False) -> dict:
    """``train#handlers`` (a list of dicts: load the bundle's weights unless ``init_from_bundle`` is
    false, poly schedule, validation every ``val_interval`` epochs, loss log) and ``train#trainer``,
    shared by the 3D and 2D ``train.json``."""
    return {
        "handlers": [
            {"_target_": "CheckpointLoader", "_disabled_": "$not @init_from_bundle",
             "load_path": "$@ckpt_dir + '/model.pt'", "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True,
             "epoch_level": not lr_per_step},
            {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
             "interval": "@val_interval"},
            {"_target_": "StatsHandler", "tag_name": "train_loss",
             "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"}],
        "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@max_epochs", "device": "@device",
                    "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                    "optimizer": "@optimizer", "inferer": "@train#inferer", "train_handlers": "@train#handlers",
                    "amp": "$torch.cuda.is_available()"},
    }


def _validator_parts(include_background: bool) -> dict:
    """``validate#handlers`` (log, best model saved as ``models/model_finetuned.pt``), the mean-Dice
    key metric and ``validate#evaluator``, shared by the 3D and 2D ``train.json``."""
    return {
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
             "save_key_metric": True, "key_metric_filename": "model_finetuned.pt"}],
        "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": bool(include_background),
                                         "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate#dataloader",
                      "network": "@network", "inferer": "@validate#inferer",
                      "postprocessing": "@validate#postprocessing", "key_val_metric": "@validate#key_metric",
                      "val_handlers": "@validate#handlers", "amp": "$torch.cuda.is_available()"},
    }


def _evaluate_config(src: ExportSource) -> dict:
    """``configs/evaluate.json``, layered over ``train.json`` as the zoo's bundles do
    (``--config_file "['configs/train.json','configs/evaluate.json']"``): the validation cases of
    ``train.json`` (the last 20 % of the sorted ``dataset_dir`` cases; ``validate#dataset#data``
    overridable) through ``models/model.pt``, mean Dice on the validation grid (the same key metric
    as ``train.json``'s validation: the 3D case after the bundle's preprocessing, the 2D image at the
    network's size), written by MONAI's ``MetricsSaver`` to ``<bundle>/eval`` (``metrics.csv``, per-case
    ``val_mean_dice_raw.csv``, summary statistics). MONAI only."""
    return {
        "output_dir": "$@bundle_root + '/eval'",
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": ["val_mean_dice"],
             "metric_details": ["val_mean_dice"], "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
             "summary_ops": "*"}],
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@validate#evaluator.run()"],
    }


def _multi_gpu_train_config() -> dict:
    """``configs/multi_gpu_train.json``, layered over ``train.json`` as the zoo's bundles do::

        torchrun --standalone --nproc_per_node=NUM_GPUS -m monai.bundle run \\
            --config_file "['configs/train.json','configs/multi_gpu_train.json']" --dataset_dir D

    DistributedDataParallel, a ``DistributedSampler`` for training (even split) and validation, one
    GPU per process with NCCL; without GPUs the same command runs CPU processes with gloo. The key
    metric is synced by ignite across ranks; ignite's savers write on rank 0 only, so ignite's view
    of the process group is made on every rank first (``idist.sync()``), before any handler asks for it."""
    return {
        "backend": "$'nccl' if torch.cuda.is_available() else 'gloo'",
        "device": "$torch.device(f'cuda:{dist.get_rank()}') if torch.cuda.is_available() else torch.device('cpu')",
        "network": "$torch.nn.parallel.DistributedDataParallel(@network_def.to(@device), "
                   "device_ids=[@device] if torch.cuda.is_available() else None)",
        "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                          "shuffle": True},
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset", "even_divisible": False,
                             "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        "initialize": ["$import torch.distributed as dist",
                       "$dist.is_initialized() or dist.init_process_group(backend=@backend)",
                       "$import ignite.distributed as idist", "$idist.sync()",
                       "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
                       "$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
        "finalize": ["$dist.is_initialized() and dist.barrier()",
                     "$dist.is_initialized() and dist.destroy_process_group()", "$idist.sync()"],
    }


def _train_config(src: ExportSource) -> dict:
    if src.kind == "seg2d":
        return _seg2d_train_config(src)
    return _seg3d_train_config(src)


def _seg3d_train_config(src: ExportSource) -> dict:
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
            **_trainer_parts(),
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
            **_validator_parts(include_background=False),
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


def _seg2d_metadata(src: ExportSource, version: str, authors: str, required: Mapping[str, str]) -> dict:
    """Metadata of a 2D bundle: the keys of :func:`_metadata`, 2D ``network_data_format`` (RGB
    ``(3, H, W)`` at the run's image size, whole images, not patches)."""
    meta = _metadata(src, version, authors)
    labels = {k: src.labels[k] for k in sorted(src.labels, key=int)}
    binary = src.out_channels == 1
    size = [int(s) for s in src.patch_size]
    net = network_def(src.arch, src.arch_kwargs, src.in_channels, src.out_channels, src.patch_size)["_target_"]
    pred_def = ({"0": f"logit of {labels.get('1', 'the foreground')} (sigmoid > 0.5)"} if binary
                else {k: f"logit of {v}" for k, v in labels.items()})
    meta.update({
        "required_packages_version": {"pillow": _version("pillow"), **dict(required)},
        "task": f"2D segmentation: {', '.join(v for k, v in labels.items() if k != '0')}",
        "description": src.description + f"; {net} on the whole image resized to {size[0]} x {size[1]}, logits "
                       "resized back to the image's size, " + ("sigmoid > 0.5" if binary else "argmax"),
        "data_type": "png/jpeg (PIL)",
        "image_classes": "RGB image (grey repeated to 3 channels), 0..255 scaled to 0..1, resized to "
                         f"{size[0]} x {size[1]}, normalised per channel with mean {src.normalization['mean']} "
                         f"and std {src.normalization['std']} (configs/inference.json#preprocessing)",
        "pred_classes": json.dumps(labels) + (": saved as 0/255 masks" if binary else ": saved as label indices"),
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "RGB", "modality": "2D image (as trained)",
                                 "num_channels": src.in_channels, "spatial_shape": size, "dtype": "float32",
                                 "value_range": [], "is_patch_data": False, "channel_def": dict(src.channels)}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": src.out_channels,
                                 "spatial_shape": size, "dtype": "float32", "value_range": [],
                                 "is_patch_data": False, "channel_def": pred_def}}},
    })
    return meta


def _version(package: str) -> str:
    return distribution_version(package)


def write_metadata_schema(path) -> Path:
    """Write :data:`METADATA_SCHEMA` (the zoo's documented metadata requirements) to ``path``."""
    return atomic_write_text(path, json.dumps(METADATA_SCHEMA, indent=2) + "\n")


def _evaluation_section(cases: str) -> str:
    """The model card's evaluate.json / multi_gpu_train.json commands (3D and 2D cards)."""
    return f"""Evaluation of `models/model.pt` (mean Dice on the last 20 % of the sorted labelled {cases}, MONAI's
`MetricsSaver` writes `eval/metrics.csv` and per-case `eval/val_mean_dice_raw.csv`), fine-tuning on
several GPUs (DistributedDataParallel; gloo processes on a machine without GPUs):

```bash
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --bundle_root . --dataset_dir /path/to/labelled
torchrun --standalone --nproc_per_node=2 -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json']" --bundle_root . --dataset_dir /path/to/labelled
```
"""


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

{_evaluation_section('cases (`imagesTr` / `labelsTr`)')}
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


def _seg2d_model_card(src: ExportSource, cfg: dict, meta: dict) -> str:
    steps = "\n".join(f"- `{t['_target_']}` " + ", ".join(f"{k}={v}" for k, v in t.items()
                                                          if k not in ("_target_", "keys")) for t in src.preprocessing)
    scripts = cfg["network_def"].get("_requires_") is not None
    code = ("The network's code is in `scripts/` (copied from medxfer, imports rewritten: nothing imports "
            "medxfer); `network_def` requires `scripts_path`, which puts `bundle_root` on `sys.path`, so pass "
            "`--bundle_root` when running from another folder, or run from this one (`monai.bundle.load` "
            "uses the working directory as `bundle_root`).\n" if scripts else "")
    return f"""# {src.name}

{meta['description']}.

Exported by medxfer: a self-contained MONAI bundle. Inference needs MONAI and Pillow only.
{code}
## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir /path/to/images
```

`dataset_dir` holds `images/` (a folder-pair set) or the images themselves (png, jpg, bmp, tif);
masks go to `eval/<image stem>.png` at each image's size ({'0/255' if src.out_channels == 1 else 'label indices'}).
Fine-tuning: `configs/train.json` on `dataset_dir/images` + `dataset_dir/masks` (starts from `models/model.pt`).

{_evaluation_section('images (`images/` + `masks/`)')}
## Network

`{cfg['network_def']['_target_']}`, {src.in_channels} input channels, {src.out_channels} output(s)
({', '.join(f'{k}: {v}' for k, v in src.labels.items())}), image size {src.patch_size}.

## Preprocessing (configs/inference.json#preprocessing)

{steps}

## Provenance

{json.dumps(src.provenance, indent=2, default=str)}

## Evaluation

{json.dumps(src.eval_metrics) if src.eval_metrics else 'none recorded with the run'}

Not for clinical use.
"""


def _tatl_weights(src: ExportSource, net: "TatlNetwork") -> str:
    """The weights file of a TATL network in the bundle: ``models/model.pt`` for the main one."""
    return "models/model.pt" if net is src.networks[0] else f"models/{net.name}.pt"


def _tatl_image_list() -> str:
    """Expression: :func:`medxfer.workflows.tatl_skin.inference_images` in MONAI only: ``dataset_dir``
    itself if it is a file, else its ``.jpg`` / ``.jpeg`` / ``.png`` files (any case; ``glob`` leaves
    hidden files out), sorted, names of masks and of the outputs (``_attribute_``, ``_union``, ...) skipped."""
    return ("$[@dataset_dir] if os.path.isfile(@dataset_dir) else sorted(p for p in glob.glob(os.path.join("
            "@dataset_dir, '*')) if os.path.isfile(p) and p.lower().endswith("
            f"{tuple(s.lower() for s in TATL_IMAGE_SUFFIXES)!r}) and not any(s in os.path.splitext("
            f"os.path.basename(p))[0] for s in {tuple(MASK_STEMS)!r}))")


def _tatl_inference_config(src: ExportSource) -> dict:
    """``configs/inference.json`` of a TATL fold: one ``<name>_def`` per network with literal arguments
    (U shape: MONAI's ``FlexibleUNet``; Link shape: ``scripts.linknet.LinkNetEffB0``), each loaded
    from its own file by a ``CheckpointLoader``; the pipeline (Segment-Net box, crop, U + Link
    averaging, paste back; the writer of the masks, union map and overlay) is the bundle's copy of
    :mod:`medxfer.transfer.tatl_inference` in ``scripts/``, run by a MONAI ``Evaluator`` one image
    per iteration, as medxfer's :func:`medxfer.workflows.tatl_skin.inference_evaluator` does (less
    its ``predictions.json`` summary)."""
    t = src.tatl
    defs = {f"{n.name}_def": network_def(n.arch, n.arch_kwargs, 3, 1, t["working_size"]) for n in src.networks}
    by_name = {n.name: f"@{n.name}_def" for n in src.networks}
    targets = {a: [by_name[f"target_{a}_{arch}"] for arch in t["arches"]] for a in t["attributes"]}
    agnostic = [by_name[f"agnostic_{arch}"] for arch in t["arches"] if f"agnostic_{arch}" in by_name]
    loaders = [{"_target_": "CheckpointLoader", "load_path": f"$@bundle_root + '/{_tatl_weights(src, n)}'",
                "load_dict": {"model": f"@{n.name}_def"}, "map_location": "@device"} for n in src.networks]
    return {
        "imports": ["$import glob", "$import os", "$import sys", "$import torch", "$import scripts"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data",
        "datalist": _tatl_image_list(),
        "overwrite": False,
        "union": t["union"],
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        **_scripts_ids(),
        "working_size": list(t["working_size"]), "offset": t["offset"], "threshold": t["threshold"],
        "mean": list(src.normalization["mean"]), "std": list(src.normalization["std"]),
        **defs,
        "network_def": f"@{src.networks[0].name}_def",
        "inferer": {"_target_": "SimpleInferer"},
        "predictor": {"_target_": "scripts.tatl_inference.TatlPredictor", "_requires_": f"@{SCRIPTS_PATH_ID}",
                      "targets": targets, "segment_net": by_name.get("segment_net"),
                      "working_size": "@working_size", "offset": "@offset", "mean": "@mean", "std": "@std",
                      "threshold": "@threshold", "device": "@device", "union_networks": agnostic,
                      "union": "@union", "inferer": "@inferer"},
        "writer": {"_target_": "scripts.tatl_inference.write_prediction", "_requires_": f"@{SCRIPTS_PATH_ID}",
                   "_mode_": "callable", "output_dir": "@output_dir", "overwrite": "@overwrite"},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "iteration": "$lambda engine, batch: [@writer(@predictor.predict(i), i, case_id=os.path.splitext("
                     "os.path.basename(i))[0]) for i in batch['image']]",
        "handlers": [*loaders, {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "monai.engines.Evaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "iteration_update": "@iteration", "val_handlers": "@handlers", "decollate": False},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _tatl_tensors(src: ExportSource, what: str) -> dict:
    """``inputs`` + ``outputs`` of one TATL network: normalised RGB at the working size (the whole
    image for the Segment-Net, the lesion crop resized for the others) -> one logit map."""
    size = list(src.tatl["working_size"])
    seen = "the whole image" if what == "lesion" else "the Segment-Net's lesion crop"
    return {"inputs": {"image": {"type": "image", "format": "RGB", "modality": f"dermoscopy ({seen})",
                                 "num_channels": 3, "spatial_shape": size, "dtype": "float32", "value_range": [],
                                 "is_patch_data": False, "channel_def": dict(src.channels)}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": size,
                                 "dtype": "float32", "value_range": [], "is_patch_data": False,
                                 "channel_def": {"0": f"logit of {what} (sigmoid >= {src.tatl['threshold']})"}}}}


def _tatl_metadata(src: ExportSource, version: str, authors: str, required: Mapping[str, str]) -> dict:
    """Metadata of a TATL bundle: the keys of :func:`_metadata`, ``network_data_format`` of the main
    network, and ``networks``: per ``<name>_def`` its config id, weights file, stage, shape and
    inputs / outputs (every network maps the same tensors; they differ in what they see and mark)."""
    meta = _metadata(src, version, authors)
    t = src.tatl
    size = list(t["working_size"])
    what = {1: "the lesion", 2: "the union of the attributes"}
    networks = {}
    for n in src.networks:
        networks[n.name] = {"config_id": f"{n.name}_def", "weights": _tatl_weights(src, n), "stage": n.stage,
                            "arch": n.arch, "arch_kwargs": dict(n.arch_kwargs), "attribute": n.attribute,
                            **_tatl_tensors(src, what.get(n.stage, n.attribute or ""))}
    main = src.networks[0]
    union = ("the stage-2 segmenters' averaged prediction" if t["union"] == "stage2"
             else "the OR of the attribute masks")
    meta.update({
        "required_packages_version": {"pillow": _version("pillow"), **dict(required)},
        "task": f"2D segmentation of dermoscopic attributes: {', '.join(t['attributes'])} (+ their union)",
        "description": src.description + f"; {len(src.networks)} networks: Segment-Net lesion box "
                       f"(+{t['offset']:g} px) -> crop resized to {size[0]} x {size[1]} -> per attribute U + Link "
                       f"shape sigmoid averaged -> pasted back at the image's size, >= {t['threshold']:g}; union map: "
                       f"{union}",
        "data_type": "jpeg/png (PIL)",
        "image_classes": f"RGB dermoscopy image, 0..255 scaled to 0..1, resized to {size[0]} x {size[1]} (the "
                         f"lesion crop for stages 2-3), normalised per channel with mean {src.normalization['mean']} "
                         f"and std {src.normalization['std']}",
        "label_classes": json.dumps({a: "0/255 mask" for a in t["attributes"]}),
        "pred_classes": json.dumps({a: f"<id>_attribute_{a}.png" for a in t["attributes"]} |
                                   {"union": "<id>_union.png", "overlay": "<id>_overlay.png"}),
        "references": ["Nguyen et al., TATL: Task Agnostic Transfer Learning for Skin Attributes Detection, "
                       "Medical Image Analysis 2022"],
        "network_data_format": _tatl_tensors(src, what[1] if main.stage == 1 else what.get(main.stage, main.attribute)),
        "main_network": main.name,
        "networks": networks,
    })
    return meta


def _tatl_model_card(src: ExportSource, cfg: dict, meta: dict) -> str:
    t = src.tatl
    rows = "\n".join(f"| `{n.name}_def` | {n.stage} | {n.attribute or ('lesion' if n.stage == 1 else 'union')} | "
                     f"`{cfg[n.name + '_def']['_target_']}` {json.dumps(n.arch_kwargs)} | `{_tatl_weights(src, n)}` |"
                     for n in src.networks)
    main = src.networks[0]
    return f"""# {src.name}

{meta['description']}.

Exported by medxfer: a self-contained MONAI bundle. Inference needs MONAI, Pillow and SciPy only:
the pipeline MONAI lacks (Segment-Net box, crop, U + Link averaging, paste back, the writer of the
masks) and LinkNet-effb0 are in `scripts/` (copied from medxfer, imports rewritten: nothing imports
medxfer). The `<name>_def` that need `scripts` require `scripts_path`, which puts `bundle_root` on
`sys.path`, so pass `--bundle_root` when running from another folder, or run from this one
(`monai.bundle.load` uses the working directory as `bundle_root`).

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir /path/to/images
```

`dataset_dir`: a folder of RGB images (`.jpg`, `.jpeg`, `.png`; names with `_segmentation`,
`_attribute_`, `_union`, `_overlay`, `_superpixels` are skipped) or one image file. Per image,
`output_dir` (default `eval/`) receives `<id>_attribute_<name>.png` (0/255, the image's size),
`<id>_union.png` and `<id>_overlay.png`, exactly as `medxfer`'s TATL inference writes them (its
`predictions.json` summary is not written). Existing files are refused unless `--overwrite true`.
`--union or_stage3`: the union map as the OR of the attribute masks (default `{t['union']}`).

## Networks (configs/inference.json)

| config id | stage | marks | network | weights |
|---|---|---|---|---|
{rows}

`network_def` is `@{main.name}_def` (the main network: the first of the pipeline, whose input is the
bundle's input image; `metadata.json#network_data_format` describes it, `metadata.json#networks`
every network). Each maps `(B, 3, {t['working_size'][0]}, {t['working_size'][1]})` normalised RGB to
`(B, 1, ...)` logits; `verify_net_in_out` and `ckpt_export` take `--net_id <name>_def` (with
`--ckpt_file` the network's weights) for the others.

## Not exported

`train.json`, `evaluate.json` and `multi_gpu_train.json`: TATL training is a three-stage
cross-validation of {len(src.networks)} networks per fold (Segment-Net boxes, stage-2 to stage-3
transfer, early stopping on a tuning split), not one MONAI trainer; retrain with medxfer's
`bundles/tatl_skin` (`configs/tatl.yaml`) and export the new run.

## Provenance

{json.dumps(src.provenance, indent=2, default=str)}

## Evaluation (the fold's test images)

{json.dumps(src.eval_metrics) if src.eval_metrics else 'none recorded with the run'}

Not for clinical use.
"""


def _large_files(bundle: Path, paths: Sequence[str]) -> None:
    """``large_files.yml`` for the weights above the zoo's 25 MB (kept out of the zoo's git)."""
    entries = []
    for rel in paths:
        weights = bundle / rel
        if weights.stat().st_size > ZOO_FILE_LIMIT:
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
            entries.append(f"  - path: {rel}\n    url: ''   # upload {rel} and put its URL here\n"
                           f"    hash_val: {digest}\n    hash_type: sha256\n")
    if entries:
        (bundle / "large_files.yml").write_text("large_files:\n" + "".join(entries))


def _check_tatl_networks(bundle: Path, cfg: dict, src: ExportSource) -> None:
    """Every ``<name>_def`` of ``cfg`` builds its network (from the bundle's ``scripts`` where it
    requires them) and loads its weights strictly; ValueError naming the network otherwise."""
    for n in src.networks:
        net_def = cfg[f"{n.name}_def"]
        if net_def.get("_requires_") is not None:
            _check_scripts(bundle, net_def, n.state)
            continue
        try:
            ConfigParser({"net": net_def}).get_parsed_content("net").load_state_dict(dict(n.state), strict=True)
        except Exception as e:  # noqa: BLE001 - one line naming the network
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{n.name}: {net_def['_target_']} does not load the fold's weights: {first}") from e


def _export_tatl(out: Path, src: ExportSource, version: str, authors: str, licence: str, overwrite: bool) -> Path:
    """The TATL form of :func:`export_bundle`: inference only (see :func:`_tatl_model_card`)."""
    cfg = _tatl_inference_config(src)
    with atomic_directory(out, overwrite=overwrite or out.exists()) as tmp:
        tmp = Path(tmp)
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        _, required = copy_network_code(list(TATL_PIPELINE_MODULES), tmp / "scripts")
        _check_tatl_networks(tmp, cfg, src)
        meta = _tatl_metadata(src, version, authors, required)
        (tmp / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4) + "\n")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        (tmp / "configs" / "logging.conf").write_text(_LOGGING_CONF)
        files = []
        for n in src.networks:
            files.append(_tatl_weights(src, n))
            atomic_torch_save({k: v.detach().cpu() for k, v in n.state.items()}, tmp / files[-1])
        _large_files(tmp, files)
        (tmp / "docs" / "README.md").write_text(_tatl_model_card(src, cfg, meta))
        (tmp / "docs" / "data_license.txt").write_text(
            "The weights were trained on the data named in docs/README.md (Provenance); its licence applies to "
            "any use of the weights. Generated data (medxfer synth) carries no restriction.\n")
        (tmp / "LICENSE").write_text(f"{licence}\n")
    return out


def _check_scripts(bundle: Path, net_def: dict, state: Mapping[str, torch.Tensor]) -> None:
    """Import the bundle's ``scripts`` (under a private name, not on ``sys.path``), build
    ``network_def`` from it and load ``state`` strictly: the copied code is complete and builds
    the trained network. ValueError naming the folder otherwise."""
    alias = f"_medxfer_export_check_{uuid.uuid4().hex}"
    folder = bundle / "scripts"
    spec = importlib.util.spec_from_file_location(alias, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    try:
        spec.loader.exec_module(package)
        _, module, cls = net_def["_target_"].split(".")
        target = getattr(importlib.import_module(f"{alias}.{module}"), cls)
        target(**{k: v for k, v in net_def.items() if not k.startswith("_")}).load_state_dict(dict(state), strict=True)
    except Exception as e:  # noqa: BLE001 - any failure means the copy is unusable; one line names it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder}: the copied network code does not rebuild {net_def['_target_']}: {first}") from e
    finally:
        for name in [m for m in sys.modules if m == alias or m.startswith(alias + ".")]:
            del sys.modules[name]


def export_bundle(out, source: ExportSource, version: str = "0.1.0", authors: str = "medxfer user",
                  licence: str = "Apache License 2.0", overwrite: bool = False) -> Path:
    """Write the bundle folder ``out`` (see the module doc); written beside it and renamed when complete,
    so a failure leaves nothing half-written. An existing ``out`` is refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists; choose another folder or pass overwrite")
    if source.kind == "tatl":
        return _export_tatl(out, source, version, authors, licence, overwrite)
    cfg = _inference_config(source)
    built = build_network(source.arch, source.in_channels, source.out_channels, source.patch_size, **source.arch_kwargs)
    own = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    if own != {k: tuple(v.shape) for k, v in source.state.items()}:
        raise ValueError(f"{source.name}: the weights do not match {source.arch} {source.arch_kwargs}")
    code = SCRIPTS_NETWORKS.get(network_spec(source.arch).name) if source.kind == "seg2d" else None
    meta = _metadata(source, version, authors) if source.kind != "seg2d" else None
    with atomic_directory(out, overwrite=overwrite or out.exists()) as tmp:
        tmp = Path(tmp)
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        if source.kind == "seg2d":
            required = {}
            if code is not None:  # the network's modules travel in scripts/
                _, required = copy_network_code([code[0]], tmp / "scripts")
                _check_scripts(tmp, cfg["network_def"], source.state)
            meta = _seg2d_metadata(source, version, authors, required)
        (tmp / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4) + "\n")
        (tmp / "configs" / "train.json").write_text(json.dumps(_train_config(source), indent=4) + "\n")
        (tmp / "configs" / "evaluate.json").write_text(json.dumps(_evaluate_config(source), indent=4) + "\n")
        (tmp / "configs" / "multi_gpu_train.json").write_text(json.dumps(_multi_gpu_train_config(), indent=4) + "\n")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        (tmp / "configs" / "logging.conf").write_text(_LOGGING_CONF)
        atomic_torch_save({k: v.detach().cpu() for k, v in source.state.items()}, tmp / "models" / "model.pt")
        weights = tmp / "models" / "model.pt"
        if weights.stat().st_size > ZOO_FILE_LIMIT:  # the zoo keeps large weights out of git
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
            (tmp / "large_files.yml").write_text(
                "large_files:\n  - path: models/model.pt\n    url: ''   # upload models/model.pt and put its URL here\n"
                f"    hash_val: {digest}\n    hash_type: sha256\n")
        card = _seg2d_model_card if source.kind == "seg2d" else _model_card
        (tmp / "docs" / "README.md").write_text(card(source, cfg, meta))
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

