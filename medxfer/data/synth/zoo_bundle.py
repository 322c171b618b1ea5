"""MONAI model-zoo bundle folders laid out exactly as the zoo lays them out (issue 14), for tests and
the README walkthrough: nothing can be downloaded here, so ``medxfer synth bundle`` writes one.

The layout and the config style follow the zoo's CT bundles (spleen_ct_segmentation,
wholeBody_ct_segmentation, swin_unetr_btcv_segmentation; SPEC section 12)::

    <name>/
      LICENSE
      configs/metadata.json         # schema 20240725 keys, network_data_format
      configs/inference.json        # network_def with _target_, preprocessing, inferer, evaluator ...
      docs/README.md
      models/model.pt               # a plain state dict (torch.save(network.state_dict()))

``inference.json`` uses the zoo's conventions: ``bundle_root``, ``dataset_dir``, ``@`` references
and ``$`` expressions (e.g. ``"spatial_size": "@roi_size"``), so an importer must resolve them as
MONAI does. The network is built from ``network_def`` by MONAI's own ``ConfigParser`` and its
(seeded, untrained unless ``state_dict`` is given) weights saved as the zoo saves them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
from monai.bundle import ConfigParser

from medxfer.atomic import atomic_torch_save, atomic_write_text

__all__ = ["ZOO_NETWORKS", "write_zoo_bundle"]

#: network -> network_def without channels (values as the zoo bundles hold them, sizes reduced
#: where noted so CPU tests stay fast).
ZOO_NETWORKS: dict[str, dict] = {
    # spleen_ct_segmentation (norm "batch" as there)
    "unet": {"_target_": "UNet", "spatial_dims": 3, "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2],
             "num_res_units": 2, "norm": "batch"},
    # wholeBody_ct_segmentation (init_filters 32 there; 8 here)
    "segresnet": {"_target_": "SegResNet", "spatial_dims": 3, "init_filters": 8, "blocks_down": [1, 2, 2, 4],
                  "blocks_up": [1, 1, 1], "dropout_prob": 0.2},
    # swin_unetr_btcv_segmentation (feature_size 48 there; 12 here)
    "swinunetr": {"_target_": "SwinUNETR", "spatial_dims": 3, "feature_size": 12, "use_checkpoint": False},
}


def write_zoo_bundle(out, network: str = "unet", name: str | None = None, in_channels: int = 1,
                     out_channels: int = 2, roi_size: Sequence[int] = (64, 64, 64),
                     pixdim: Sequence[float] = (1.5, 1.5, 2.0), intensity: Sequence[float] = (-57.0, 164.0),
                     labels: Mapping[str, str] | None = None, seed: int = 0,
                     state_dict: Mapping[str, torch.Tensor] | None = None, version: str = "0.1.0",
                     overwrite: bool = False) -> Path:
    """Write a zoo-layout bundle folder ``out`` and return it.

    Args:
        network: a key of :data:`ZOO_NETWORKS`.
        roi_size: the inferer's window (``inferer#roi_size``, via ``@roi_size``).
        pixdim: ``Spacingd`` target spacing; intensity: ``ScaleIntensityRanged`` ``a_min, a_max``
            (the spleen bundle's -57, 164 by default).
        state_dict: weights to save (e.g. a trained network's); default: the seeded initialisation.
        overwrite: write into a non-empty ``out`` (otherwise :class:`FileExistsError`).
    """
    if network not in ZOO_NETWORKS:
        raise ValueError(f"unknown zoo network {network!r}; choose from {sorted(ZOO_NETWORKS)}")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: not empty; choose another folder or pass overwrite")
    name = name or f"{network}_ct_segmentation"
    labels = dict(labels or {str(i): ("background" if i == 0 else f"label{i}") for i in range(out_channels)})
    network_def = {**ZOO_NETWORKS[network], "in_channels": "@input_channels", "out_channels": "@output_classes"}
    roi = [int(r) for r in roi_size]
    inference = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "input_channels": int(in_channels),
        "output_classes": int(out_channels),
        "roi_size": roi,
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [float(p) for p in pixdim], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": float(intensity[0]),
             "a_max": float(intensity[1]), "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "resample": False},
        ]},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "@device"},
                     {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    }
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": version, "changelog": {version: "generated by medxfer synth bundle"},
        "monai_version": "1.6.1", "pytorch_version": torch.__version__.split("+")[0], "numpy_version": "2.0",
        "required_packages_version": {"nibabel": "5.4.2"},
        "name": name, "task": f"Generated {network} CT segmentation (medxfer synth bundle)",
        "description": f"A {network} bundle in the MONAI model-zoo layout, generated offline by medxfer for tests "
                       "and the walkthrough; its weights are not a trained clinical model.",
        "authors": "medxfer", "copyright": "Copyright (c) medxfer", "data_source": "generated",
        "data_type": "nibabel", "image_classes": "single channel CT, HU", "label_classes": json.dumps(labels),
        "pred_classes": json.dumps(labels), "intended_use": "Testing only",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT",
                                 "num_channels": int(in_channels), "spatial_shape": roi, "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": int(out_channels),
                                 "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": labels}}},
    }
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    (out / "docs").mkdir(exist_ok=True)
    atomic_write_text(out / "configs" / "inference.json", json.dumps(inference, indent=4) + "\n")
    atomic_write_text(out / "configs" / "metadata.json", json.dumps(metadata, indent=4) + "\n")
    atomic_write_text(out / "LICENSE", "Apache License, Version 2.0 (generated bundle, medxfer tests)\n")
    atomic_write_text(out / "docs" / "README.md", f"# {name}\n\nGenerated by `medxfer synth bundle` ({network}).\n")
    if state_dict is None:
        parser = ConfigParser(inference)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state_dict = parser.get_parsed_content("network_def").state_dict()
    atomic_torch_save(dict(state_dict), out / "models" / "model.pt")
    return out
