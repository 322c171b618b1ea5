"""Every segmentation network of medxfer by name: one registration each (SPEC sections 3, 6-8).

A :class:`NetworkSpec` says how to build a network (``builder``), where its parts live
(``layout``: encoder levels, decoder stages, head, penultimate encoder module; see
:class:`~medxfer.networks.layout.ArchLayout`), which input sides it accepts (``size_divisor``), its
spatial dimensions and its default keyword arguments. :func:`build_network`, :func:`arch_layout`,
:func:`size_divisor`, :func:`axis_divisors` and :func:`fit_patch` are lookups in :data:`REGISTRY`; an unknown name lists
every registered one. Adding an architecture is one :func:`register` call.

========================= ===== ===================================================================
name                      dims  network
========================= ===== ===================================================================
``unet``                  3     MONAI ``UNet`` (residual units)
``unetr``                 3     MONAI ``UNETR``
``swinunetr``             3     MONAI ``SwinUNETR``
``segresnet``             3     MONAI ``SegResNet``
``dynunet``               3     MONAI ``DynUNet`` (``kernel_size``, ``strides``, ``upsample_kernel_size``...)
``basicunet``             3     MONAI ``BasicUNet``
``flexibleunet``          3     MONAI ``FlexibleUNet`` (``backbone`` EfficientNet-b0..l2 / ResNet10..200)
``nnunet``                plans nnU-Net v2's ``PlainConvUNet`` / ``ResidualEncoderUNet`` from a plans file's
                                ``architecture`` (:mod:`medxfer.networks.nnunet_nets`)
``network_def``           def   any ``nn.Module`` class a MONAI bundle's ``network_def`` names; layout
                                found automatically (:mod:`medxfer.networks.auto_layout`)
``unet_effb0``            2     TATL U shape: MONAI ``FlexibleUNet`` on EfficientNet-b0
``linknet_effb0``         2     TATL Link shape: :class:`~medxfer.networks.linknet.LinkNetEffB0`
``unet2d``                2     thesis basic U-Net (:mod:`medxfer.networks.unet2d`)
``resnet50_attention_unet`` 2   thesis ResNet50 Attention U-Net
``swin_unet``             2     thesis Swin U-Net
``truncated_resnet50``    2     truncated ResNet50 + U-Net decoder (``level`` 1..4)
``truncated_densenet121`` 2     truncated DenseNet121 + U-Net decoder (``level`` 1..4)
========================= ===== ===================================================================

The MONAI networks (dims 3) also build in 2D (``spatial_dims=2``). ``nnunet`` and ``network_def``
take their dimensions from their kwargs (the plans' ``conv_op``, the def's ``spatial_dims``) when
``spatial_dims`` is not given (:attr:`NetworkSpec.kwargs_dims`); otherwise 3. The kwargs of the
MONAI networks are a model-zoo bundle's ``network_def`` without ``_target_``, ``in_channels``,
``out_channels`` and ``spatial_dims``; those of ``nnunet`` a plans file's
``configurations[c]["architecture"]``.

Builders are called as ``builder(in_channels, out_channels, roi_size, **kwargs)`` with the
registry's defaults merged under the caller's kwargs; the thesis networks also take
``encoder_classifier=True`` (their pretraining classifier, how encoder bank entries are rebuilt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from medxfer.networks.effnet_unet import effb0_layout, unet_effb0
from medxfer.networks.layout import ArchLayout
from medxfer.networks.linknet import LinkNetEffB0
from medxfer.networks.monai_nets import (DEFAULT_KWARGS, basicunet_layout, build_basicunet, build_dynunet,
                                         build_flexibleunet, build_network_def, build_segresnet, build_swinunetr,
                                         build_unet, build_unetr, dynunet_layout, dynunet_size_divisor,
                                         flexibleunet_layout, network_def_dims, network_def_layout,
                                         network_def_size_divisor, segresnet_layout, segresnet_size_divisor,
                                         stride_products, swinunetr_layout, unet_layout, unet_size_divisor,
                                         unetr_layout)
from medxfer.networks.nnunet_nets import (build_nnunet, nnunet_axis_divisors, nnunet_dims, nnunet_layout,
                                          nnunet_size_divisor)
from medxfer.networks.seg2d import build_thesis_network, thesis_layout
from medxfer.networks.truncated import TruncatedSegmenter, truncated_layout
from medxfer.networks.unet2d import UNET2D_CHANNELS

__all__ = ["NetworkSpec", "REGISTRY", "register", "network_spec", "registered", "build_network", "arch_layout",
           "size_divisor", "axis_divisors", "fit_patch"]


@dataclass(frozen=True)
class NetworkSpec:
    """One registered network.

    Attributes:
        name: the ``arch`` value configs and bank entries use.
        builder: ``(in_channels, out_channels, roi_size, **kwargs) -> nn.Module``.
        layout: ``(network or None, kwargs) -> ArchLayout``.
        size_divisor: ``kwargs -> int``: every spatial side must be a multiple of it.
        spatial_dims: the input's spatial dimensions (2 or 3) by default.
        any_dims: the builder takes ``spatial_dims`` and builds in 2D as well as 3D (MONAI's nets).
        default_kwargs: merged under the caller's kwargs before ``builder`` / ``layout`` / ``size_divisor``.
        description: one line for listings and errors.
        kwargs_dims: ``kwargs -> int | None``: the spatial dimensions the kwargs fix (an nnU-Net
            plans' ``conv_op``), used instead of ``spatial_dims`` when the caller gives none.
        axis_divisors: ``kwargs -> [int, ...]``: a divisor per spatial side when the network's
            strides differ per axis (``size_divisor`` is then the largest of them).
    """

    name: str
    builder: Callable[..., torch.nn.Module]
    layout: Callable[[torch.nn.Module | None, dict], ArchLayout]
    size_divisor: Callable[[dict], int]
    spatial_dims: int
    default_kwargs: Mapping = field(default_factory=dict)
    description: str = ""
    any_dims: bool = False
    kwargs_dims: Callable[[dict], int | None] | None = None
    axis_divisors: Callable[[dict], Sequence[int]] | None = None

    def kwargs(self, arch_kwargs: Mapping | None) -> dict:
        return {**self.default_kwargs, **dict(arch_kwargs or {})}


#: name -> :class:`NetworkSpec`; extend with :func:`register`.
REGISTRY: dict[str, NetworkSpec] = {}


def register(spec: NetworkSpec, overwrite: bool = False) -> NetworkSpec:
    """Add ``spec`` under ``spec.name`` (lower case); an existing name is an error unless ``overwrite``."""
    name = spec.name.lower()
    if name in REGISTRY and not overwrite:
        raise ValueError(f"network {name!r} is registered already")
    REGISTRY[name] = spec
    return spec


def registered() -> list[str]:
    """Every registered network name, in registration order."""
    return list(REGISTRY)


def network_spec(arch: str) -> NetworkSpec:
    """The :class:`NetworkSpec` of ``arch``; an unknown name lists every registered one."""
    key = str(arch).lower()
    if key not in REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; registered networks: {registered()}")
    return REGISTRY[key]


def size_divisor(arch: str, arch_kwargs: dict | None = None) -> int:
    """Every spatial side of the input must be a multiple of this (voxels / pixels)."""
    spec = network_spec(arch)
    return int(spec.size_divisor(spec.kwargs(arch_kwargs)))


def axis_divisors(arch: str, arch_kwargs: dict | None = None, dims: int | None = None) -> list[int]:
    """What each of the ``dims`` spatial sides must be a multiple of: :func:`size_divisor` on every
    side, unless the network's strides differ per axis (``nnunet``, ``dynunet``:
    :attr:`NetworkSpec.axis_divisors`), where :func:`size_divisor` is the largest of these."""
    spec = network_spec(arch)
    kwargs = spec.kwargs(arch_kwargs)
    if dims is None:
        dims = (spec.kwargs_dims(kwargs) if spec.kwargs_dims is not None else None) or spec.spatial_dims
    dims = int(dims)
    per_axis = [int(d) for d in spec.axis_divisors(kwargs)] if spec.axis_divisors is not None else []
    if len(per_axis) == 1:
        per_axis = per_axis * dims
    if len(per_axis) != dims:
        per_axis = [int(spec.size_divisor(kwargs))] * dims
    return per_axis


def fit_patch(arch: str, patch_size: Sequence[int], arch_kwargs: dict | None = None) -> list[int]:
    """``patch_size`` with every side rounded up to a multiple of its :func:`axis_divisors`."""
    divisors = axis_divisors(arch, arch_kwargs, len(patch_size))
    return [int(math.ceil(int(p) / d) * d) for p, d in zip(patch_size, divisors)]


def build_network(arch: str, in_channels: int, out_channels: int, roi_size: Sequence[int] | int,
                  spatial_dims: int | None = None, **arch_kwargs) -> torch.nn.Module:
    """Registered network ``arch`` for ``(B, in_channels, *roi_size)`` -> ``(B, out_channels, *roi_size)``.

    Args:
        arch: a registered name (:func:`registered`).
        in_channels: image channels; out_channels: output maps (labels incl. background, or 1 for
            a sigmoid mask; classes for an encoder classifier).
        roi_size: patch / image size (an int means the same on every side); checked to be a
            multiple of :func:`size_divisor` on every side (of :func:`axis_divisors` per side).
        spatial_dims: ``None`` (the dimensions the kwargs fix, else the network's own) or 2 / 3 (a
            MONAI 3D network also builds in 2D).
        arch_kwargs: passed to the builder over the registry defaults.
    """
    spec = network_spec(arch)
    kwargs = spec.kwargs(arch_kwargs)
    if spatial_dims is None and spec.kwargs_dims is not None:
        spatial_dims = spec.kwargs_dims(kwargs)
    dims = spec.spatial_dims if spatial_dims is None else int(spatial_dims)
    if dims != spec.spatial_dims and not spec.any_dims:
        raise ValueError(f"{spec.name} is a {spec.spatial_dims}D network, not {dims}D")
    roi = [int(roi_size)] * dims if isinstance(roi_size, (int, float)) else [int(r) for r in roi_size]
    if len(roi) != dims:
        raise ValueError(f"roi_size {roi} must have {dims} sides")
    divs = axis_divisors(spec.name, arch_kwargs, dims)
    if any(r % d for r, d in zip(roi, divs)):
        what = f"{divs[0]} on every side" if len(set(divs)) == 1 else f"{divs} (per side)"
        raise ValueError(f"{spec.name}: patch/roi size {roi} must be a multiple of {what} "
                         f"(use fit_patch -> {fit_patch(spec.name, roi, arch_kwargs)})")
    if spec.any_dims:
        kwargs["spatial_dims"] = dims
    return spec.builder(int(in_channels), int(out_channels), roi, **kwargs)


def arch_layout(arch: str, network: torch.nn.Module | None = None, arch_kwargs: dict | None = None) -> ArchLayout:
    """The :class:`~medxfer.networks.layout.ArchLayout` of ``arch``; ``network`` (or ``arch_kwargs``)
    gives depth-dependent parts (UNet depth, UNETR blocks, a truncated encoder's cut); a
    ``DistributedDataParallel`` / compiled wrapper is looked through."""
    spec = network_spec(arch)
    if network is not None:
        network = getattr(network, "module", network)
        network = getattr(network, "_orig_mod", network)
    return spec.layout(network, spec.kwargs(arch_kwargs))


# --- the registrations --------------------------------------------------------------------------

def _fixed(divisor: int) -> Callable[[dict], int]:
    return lambda kwargs: divisor


def _effb0(shape: str) -> Callable[..., torch.nn.Module]:
    def build(in_channels, out_channels, roi_size, **kwargs):
        if shape == "unet_effb0":
            return unet_effb0(in_channels, out_channels, **kwargs)
        return LinkNetEffB0(in_channels, out_channels, **kwargs)
    return build


def _thesis(arch: str) -> NetworkSpec:
    def build(in_channels, out_channels, roi_size, **kwargs):
        return build_thesis_network(arch, in_channels, out_channels, tuple(roi_size), **kwargs)

    def divisor(kwargs):  # the U-Net halves len(channels) - 1 times; the others are /32 networks
        return 2 ** (len(kwargs.get("channels", UNET2D_CHANNELS)) - 1) if arch == "unet2d" else 32

    return NetworkSpec(arch, build, lambda network, kwargs: thesis_layout(arch, network), divisor, 2,
                       description=f"thesis 2D {arch}")


def _truncated(encoder_arch: str) -> NetworkSpec:
    def build(in_channels, out_channels, roi_size, level: int = 3, **kwargs):
        return TruncatedSegmenter(encoder_arch, level, out_channels, in_channels, **kwargs)

    return NetworkSpec(f"truncated_{encoder_arch}", build, lambda network, kwargs: truncated_layout(network),
                       _fixed(1), 2, {"level": 3},
                       description=f"truncated {encoder_arch} encoder (level 1..4) + U-Net decoder; pads internally")


for _spec in (
    NetworkSpec("unet", build_unet, unet_layout, unet_size_divisor, 3, DEFAULT_KWARGS["unet"], "MONAI UNet", True),
    NetworkSpec("unetr", build_unetr, unetr_layout, _fixed(16), 3, DEFAULT_KWARGS["unetr"], "MONAI UNETR", True),
    NetworkSpec("swinunetr", build_swinunetr, swinunetr_layout, _fixed(32), 3, DEFAULT_KWARGS["swinunetr"],
                "MONAI SwinUNETR", True),
    NetworkSpec("segresnet", build_segresnet, segresnet_layout, segresnet_size_divisor, 3, DEFAULT_KWARGS["segresnet"],
                "MONAI SegResNet", True),
    NetworkSpec("dynunet", build_dynunet, dynunet_layout, dynunet_size_divisor, 3, DEFAULT_KWARGS["dynunet"],
                "MONAI DynUNet", True, axis_divisors=lambda kwargs: stride_products(kwargs["strides"])),
    NetworkSpec("basicunet", build_basicunet, basicunet_layout, _fixed(16), 3, DEFAULT_KWARGS["basicunet"],
                "MONAI BasicUNet", True),
    NetworkSpec("flexibleunet", build_flexibleunet, flexibleunet_layout, _fixed(32), 3, DEFAULT_KWARGS["flexibleunet"],
                "MONAI FlexibleUNet (EfficientNet / ResNet backbone)", True),
    NetworkSpec("nnunet", build_nnunet, nnunet_layout, nnunet_size_divisor, 3,
                description="nnU-Net v2 plans network (PlainConvUNet / ResidualEncoderUNet)", any_dims=True,
                kwargs_dims=nnunet_dims, axis_divisors=nnunet_axis_divisors),
    NetworkSpec("network_def", build_network_def, network_def_layout, network_def_size_divisor, 3,
                description="a MONAI bundle network_def (automatic layout)", any_dims=True,
                kwargs_dims=network_def_dims),
    NetworkSpec("unet_effb0", _effb0("unet_effb0"), lambda network, kwargs: effb0_layout("unet_effb0"), _fixed(32), 2,
                description="TATL U shape (FlexibleUNet, EfficientNet-b0)"),
    NetworkSpec("linknet_effb0", _effb0("linknet_effb0"), lambda network, kwargs: effb0_layout("linknet_effb0"),
                _fixed(32), 2, description="TATL Link shape (EfficientNet-b0)"),
    _thesis("unet2d"), _thesis("resnet50_attention_unet"), _thesis("swin_unet"),
    _truncated("resnet50"), _truncated("densenet121"),
):
    register(_spec)
del _spec
