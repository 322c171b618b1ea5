"""MONAI's 3D segmentation networks of the MSD bundle (SPEC section 3): builders and layouts for the
registry (:mod:`medxfer.networks.registry`).

The networks are MONAI's, unchanged: ``UNet`` (Kerfoot et al. 2018, residual units),
``UNETR`` (Hatamizadeh et al. 2022) and ``SwinUNETR`` (Hatamizadeh et al. 2022). What MONAI does
not give is their :class:`~medxfer.networks.layout.ArchLayout`:

========== =================================================== ======================= ============
arch       encoder levels (1 = highest resolution)             decoder stages (deep    head
                                                               -> shallow)
========== =================================================== ======================= ============
unet       level d: the down block at depth d; the last level  up blocks of depth      ``model.2``
           is the bottom block                                 n-2 .. 1
unetr      1: ``encoder1`` + patch embedding; 2-4: a quarter   ``decoder5`` ..         ``out``
           of the ViT blocks + the encoder that reads them;    ``decoder2``
           5: the last quarter + ``vit.norm``
swinunetr  1: patch embedding, ``encoder1``, ``encoder2``;     ``decoder5`` ..         ``out``
           2-4: ``swinViT.layers1..3`` + ``encoder3/4``;       ``decoder1``
           5: ``swinViT.layers4`` + ``encoder10``
========== =================================================== ======================= ============

Shapes: every network maps ``(B, in_channels, X, Y, Z)`` to ``(B, out_channels, X, Y, Z)`` logits;
``X, Y, Z`` must be multiples of the size divisor (UNet: product of the strides, UNETR: the ViT
patch 16, SwinUNETR: 32). Builders receive the registry's defaults merged under the user's kwargs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.nets import UNETR, SwinUNETR, UNet

from medxfer.networks.layout import ArchLayout

__all__ = ["DEFAULT_KWARGS", "build_unet", "build_unetr", "build_swinunetr", "unet_size_divisor", "unet_layout",
           "unetr_layout", "swinunetr_layout"]

#: Defaults merged under the user's ``arch_kwargs`` (MONAI's own defaults otherwise).
DEFAULT_KWARGS: dict[str, dict] = {
    "unet": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2, "norm": "instance"},
    "unetr": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "norm_name": "instance"},
    "swinunetr": {"feature_size": 48, "norm_name": "instance"},
}


def _unwrap(network: torch.nn.Module | None) -> torch.nn.Module | None:
    """Look through ``DistributedDataParallel`` (``module``) and ``torch.compile`` (``_orig_mod``)."""
    if network is not None:
        network = getattr(network, "module", network)
        network = getattr(network, "_orig_mod", network)
    return network


def unet_size_divisor(kwargs: dict) -> int:
    """UNet: every side must be a multiple of the product of its strides."""
    return int(math.prod(int(s) for s in kwargs["strides"]))


def build_unet(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int = 3,
               **kwargs) -> torch.nn.Module:
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                channels=tuple(kwargs.pop("channels")), strides=tuple(kwargs.pop("strides")), **kwargs)


def build_unetr(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int = 3,
                **kwargs) -> torch.nn.Module:
    """UNETR needs the patch size (``img_size``: its position embeddings are one per ViT patch)."""
    return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=tuple(int(r) for r in roi_size),
                 spatial_dims=spatial_dims, **kwargs)


def build_swinunetr(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int = 3,
                    **kwargs) -> torch.nn.Module:
    """SwinUNETR takes no ``img_size`` in MONAI >= 1.5; a 1-voxel bottleneck cannot train with instance norm."""
    roi = [int(r) for r in roi_size]
    if math.prod(r // 32 for r in roi) < 2 and kwargs.get("norm_name") == "instance":
        raise ValueError(f"swinunetr: roi size {roi} leaves a 1-voxel bottleneck, which instance norm cannot train "
                         "on; use at least 64 voxels on one side")
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims, **kwargs)


def unet_layout(network: torch.nn.Module | None, kwargs: dict) -> ArchLayout:
    """Depth from ``network`` (``len(channels)``) or from ``kwargs``."""
    network = _unwrap(network)
    n = len(network.channels) if network is not None else len(kwargs["channels"])
    prefix = ["model" + ".1.submodule" * d for d in range(n - 1)]
    levels = [[p + ".0"] for p in prefix] + [["model" + ".1.submodule" * (n - 1)]]
    return ArchLayout("unet", levels, [prefix[d] + ".2" for d in range(n - 2, 0, -1)], ["model.2"], levels[-2][0])


def unetr_layout(network: torch.nn.Module | None, kwargs: dict) -> ArchLayout:
    """The ViT blocks are split in four quarters (12 blocks unless ``network`` says otherwise)."""
    network = _unwrap(network)
    n_blocks = len(network.vit.blocks) if network is not None else 12
    q = n_blocks // 4
    blocks = [[f"vit.blocks.{b}" for b in range(i * q, (i + 1) * q if i < 3 else n_blocks)] for i in range(4)]
    levels = [["encoder1", "vit.patch_embedding"], blocks[0] + ["encoder2"], blocks[1] + ["encoder3"],
              blocks[2] + ["encoder4"], blocks[3] + ["vit.norm"]]
    return ArchLayout("unetr", levels, ["decoder5", "decoder4", "decoder3", "decoder2"], ["out"], "encoder4")


def swinunetr_layout(network: torch.nn.Module | None, kwargs: dict) -> ArchLayout:
    levels = [["swinViT.patch_embed", "encoder1", "encoder2"], ["swinViT.layers1", "swinViT.layers1c", "encoder3"],
              ["swinViT.layers2", "swinViT.layers2c", "encoder4"], ["swinViT.layers3", "swinViT.layers3c"],
              ["swinViT.layers4", "swinViT.layers4c", "encoder10"]]
    return ArchLayout("swinunetr", levels, ["decoder5", "decoder4", "decoder3", "decoder2", "decoder1"], ["out"],
                      "swinViT.layers3.0")
