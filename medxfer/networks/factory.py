"""One factory for the 3D segmentation networks of the MSD bundle (SPEC section 3), and their layout.

The networks are MONAI's, unchanged: ``UNet`` (Kerfoot et al. 2018, residual units),
``UNETR`` (Hatamizadeh et al. 2022) and ``SwinUNETR`` (Hatamizadeh et al. 2022). What MONAI does
not give is a description of *which parameters form which part* of each network; transfer modes
(SPEC section 4: ``all_but_head``, ``frozen_encoder``, ``truncated:k``) and feature extraction for
transferability estimation (SPEC section 5: hooks on the decoder stages) need it, so
:func:`arch_layout` returns it as parameter-name prefixes / module names:

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
``X, Y, Z`` must be multiples of :func:`size_divisor` (UNet: product of the strides, UNETR: the ViT
patch 16, SwinUNETR: 32). :func:`fit_patch` rounds a planned patch up to that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["ARCHS", "DEFAULT_KWARGS", "ArchLayout", "build_network", "arch_layout", "size_divisor", "fit_patch"]

#: Supported ``arch`` values (one config key chooses the network).
ARCHS = ("unet", "unetr", "swinunetr")

#: Defaults merged under the user's ``arch_kwargs`` (MONAI's own defaults otherwise).
DEFAULT_KWARGS: dict[str, dict] = {
    "unet": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2, "norm": "instance"},
    "unetr": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "norm_name": "instance"},
    "swinunetr": {"feature_size": 48, "norm_name": "instance"},
}


def _check_arch(arch: str) -> str:
    key = str(arch).lower()
    if key not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    return key


def _kwargs(arch: str, arch_kwargs: dict | None) -> dict:
    return {**DEFAULT_KWARGS[arch], **dict(arch_kwargs or {})}


def size_divisor(arch: str, arch_kwargs: dict | None = None) -> int:
    """Every spatial side of the input must be a multiple of this (voxels)."""
    arch = _check_arch(arch)
    if arch == "unet":
        return int(math.prod(int(s) for s in _kwargs(arch, arch_kwargs)["strides"]))
    return 16 if arch == "unetr" else 32


def fit_patch(arch: str, patch_size: Sequence[int], arch_kwargs: dict | None = None) -> list[int]:
    """``patch_size`` with every side rounded up to a multiple of :func:`size_divisor` (voxels)."""
    d = size_divisor(arch, arch_kwargs)
    return [int(math.ceil(int(p) / d) * d) for p in patch_size]


def build_network(arch: str, in_channels: int, out_channels: int, roi_size: Sequence[int],
                  spatial_dims: int = 3, **arch_kwargs) -> torch.nn.Module:
    """MONAI network ``arch`` for ``(B, in_channels, *roi_size)`` -> ``(B, out_channels, *roi_size)``.

    Args:
        arch: ``"unet"``, ``"unetr"`` or ``"swinunetr"``.
        in_channels: image channels (MSD modalities); out_channels: labels incl. background.
        roi_size: patch size in voxels; UNETR needs it (``img_size``), SwinUNETR takes none in
            MONAI >= 1.5; all archs check that it is a multiple of :func:`size_divisor`.
        arch_kwargs: passed to the MONAI class over :data:`DEFAULT_KWARGS`.
    """
    from monai.networks.nets import UNETR, SwinUNETR, UNet

    from medxfer.networks.seg2d import SEG2D_ARCHS, build_seg2d

    if arch in SEG2D_ARCHS:  # 2D networks of the thesis (roi_size = (H, W))
        return build_seg2d(arch, in_channels, out_channels, roi_size, **arch_kwargs)
    arch = _check_arch(arch)
    kwargs = _kwargs(arch, arch_kwargs)
    roi = [int(r) for r in roi_size]
    if len(roi) != spatial_dims:
        raise ValueError(f"roi_size {roi} must have {spatial_dims} sides")
    div = size_divisor(arch, kwargs)
    if any(r % div for r in roi):
        raise ValueError(f"{arch}: patch/roi size {roi} must be a multiple of {div} voxels on every side "
                         f"(use fit_patch -> {fit_patch(arch, roi, kwargs)})")
    if arch == "swinunetr" and math.prod(r // 32 for r in roi) < 2 and kwargs.get("norm_name") == "instance":
        raise ValueError(f"swinunetr: roi size {roi} leaves a 1-voxel bottleneck, which instance norm cannot train "
                         "on; use at least 64 voxels on one side")
    if arch == "unet":
        return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                    channels=tuple(kwargs.pop("channels")), strides=tuple(kwargs.pop("strides")), **kwargs)
    if arch == "unetr":
        return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=tuple(roi),
                     spatial_dims=spatial_dims, **kwargs)
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, spatial_dims=spatial_dims, **kwargs)


@dataclass
class ArchLayout:
    """Where the parts of a network live, as names relative to the network (no trailing dot).

    Attributes:
        encoder_levels: ``encoder_levels[k-1]`` = module-name prefixes forming encoder level ``k``.
        decoder_stages: module names whose outputs are the decoder feature maps, deepest first.
        head: module-name prefixes of the last (class-specific) block.
        penultimate_encoder: module whose output is the second-to-last encoder level's feature map
            ``(B, C, *spatial)``, the representation the robustness score reads (thesis ch. 4).
    """

    arch: str
    encoder_levels: list[list[str]]
    decoder_stages: list[str]
    head: list[str] = field(default_factory=list)
    penultimate_encoder: str = ""

    @staticmethod
    def _match(key: str, prefixes: Sequence[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    def in_head(self, key: str) -> bool:
        """Is the parameter / buffer ``key`` part of the head?"""
        return self._match(key, self.head)

    def encoder_level(self, key: str) -> int | None:
        """Encoder level (1-based) of ``key``; ``None`` for decoder / head keys."""
        for level, prefixes in enumerate(self.encoder_levels, start=1):
            if self._match(key, prefixes):
                return level
        return None


def arch_layout(arch: str, network: torch.nn.Module | None = None, arch_kwargs: dict | None = None) -> ArchLayout:
    """The :class:`ArchLayout` of ``arch`` (see the module table).

    ``network`` (or ``arch_kwargs``) gives the depth for UNet (``len(channels)``) and the number of
    ViT blocks for UNETR; a ``DistributedDataParallel`` / compiled wrapper is looked through.
    """
    from medxfer.networks.effnet_unet import EFFB0_ARCHS, effb0_layout
    from medxfer.networks.seg2d import SEG2D_ARCHS, seg2d_layout

    if str(arch).lower() in EFFB0_ARCHS:  # the 2D TATL networks (U- and Link-shape EfficientNet-b0)
        return effb0_layout(str(arch).lower())
    if str(arch).lower() in SEG2D_ARCHS:  # the thesis' 2D networks (or their encoder classifiers)
        return seg2d_layout(str(arch).lower(), network)
    arch = _check_arch(arch)
    if network is not None:
        network = getattr(network, "module", network)
        network = getattr(network, "_orig_mod", network)
    if arch == "unet":
        n = len(network.channels) if network is not None else len(_kwargs(arch, arch_kwargs)["channels"])
        prefix = ["model" + ".1.submodule" * d for d in range(n - 1)]
        levels = [[p + ".0"] for p in prefix] + [["model" + ".1.submodule" * (n - 1)]]
        return ArchLayout(arch, levels, [prefix[d] + ".2" for d in range(n - 2, 0, -1)], ["model.2"], levels[-2][0])
    if arch == "unetr":
        n_blocks = len(network.vit.blocks) if network is not None else 12
        q = n_blocks // 4
        blocks = [[f"vit.blocks.{b}" for b in range(i * q, (i + 1) * q if i < 3 else n_blocks)] for i in range(4)]
        levels = [["encoder1", "vit.patch_embedding"], blocks[0] + ["encoder2"], blocks[1] + ["encoder3"],
                  blocks[2] + ["encoder4"], blocks[3] + ["vit.norm"]]
        return ArchLayout(arch, levels, ["decoder5", "decoder4", "decoder3", "decoder2"], ["out"], "encoder4")
    levels = [["swinViT.patch_embed", "encoder1", "encoder2"], ["swinViT.layers1", "swinViT.layers1c", "encoder3"],
              ["swinViT.layers2", "swinViT.layers2c", "encoder4"], ["swinViT.layers3", "swinViT.layers3c"],
              ["swinViT.layers4", "swinViT.layers4c", "encoder10"]]
    return ArchLayout(arch, levels, ["decoder5", "decoder4", "decoder3", "decoder2", "decoder1"], ["out"],
                      "swinViT.layers3.0")
