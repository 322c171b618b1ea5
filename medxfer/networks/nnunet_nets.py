"""nnU-Net v2's networks as nnU-Net builds them from a plans file (issue 14): builder, layout and
size divisor of the registry's ``nnunet`` arch (:mod:`medxfer.networks.registry`).

The arch kwargs are exactly a plans file's ``configurations[c]["architecture"]`` (nnU-Net 2.x)::

    {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
     "arch_kwargs": {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320], "conv_op":
                     "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3], ...], "strides":
                     [[1, 1, 1], [2, 2, 2], ...], "n_conv_per_stage": [2, ...], ...},
     "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}

and the network is nnU-Net's own: :func:`nnunetv2.utilities.get_network_from_plans.get_network_from_plans`
(``dynamic_network_architectures`` ``PlainConvUNet`` / ``ResidualEncoderUNet`` / ``ResidualUNet``,
nnU-Net's He initialisation) with ``deep_supervision=False``, so the forward returns one
``(B, classes, *patch)`` tensor. nnU-Net always builds every ``decoder.seg_layers`` entry (deep
supervision or not), so the state dict of a network trained with deep supervision (an nnU-Net
checkpoint's ``network_weights``) loads strictly.

Layout (``n`` = ``n_stages``): encoder level ``k`` = ``encoder.stages.{k-1}`` (level 1 also
``encoder.stem`` for the residual encoders); decoder stages ``decoder.stages.0`` (deepest) ..
``decoder.stages.{n-2}`` (full resolution); head ``decoder.seg_layers`` (every one of them is
class-specific: the deep-supervision outputs too); penultimate encoder ``encoder.stages.{n-2}``.
``UNetDecoder`` keeps a reference to the encoder, so every encoder tensor is in the state dict
twice (``encoder.stages.0...`` and ``decoder.encoder.stages.0...``): each level lists both names.

Size divisor: nnU-Net's strides are per stage and may differ per axis (``[1, 2, 2]`` for an
anisotropic volume). :func:`nnunet_size_divisor` (the registry's one number for every side) is the
largest per-axis product of the strides (:func:`medxfer.networks.monai_nets.stride_divisor`);
:func:`nnunet_axis_divisors` gives each axis its own product, and that is what ``build_network`` /
``fit_patch`` check, so nnU-Net's own patch (a multiple of each axis's product, e.g. ``[20, 320,
256]`` with products ``[4, 64, 64]``) is accepted although 20 is not a multiple of 64.

Only names nnU-Net's plans use are imported (``pydoc.locate`` imports a module to find a class): the
network class must be one of :data:`NNUNET_CLASSES` (``dynamic_network_architectures``), and the
``_kw_requires_import`` values ``torch.*`` or ``dynamic_network_architectures.*`` names.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from medxfer.networks.layout import ArchLayout
from medxfer.networks.monai_nets import stride_divisor, stride_products

__all__ = ["NNUNET_CLASSES", "build_nnunet", "nnunet_layout", "nnunet_size_divisor", "nnunet_axis_divisors",
           "nnunet_dims"]

#: Network classes of nnU-Net v2 plans with a known layout
#: (module ``dynamic_network_architectures.architectures.unet``).
NNUNET_CLASSES = ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")
#: Classes whose encoder has a ``stem`` before ``stages.0`` (at full resolution, part of level 1).
_WITH_STEM = ("ResidualEncoderUNet", "ResidualUNet")
_IMPORTABLE = ("torch.", "dynamic_network_architectures.")


def _class(kwargs: Mapping) -> str:
    name = kwargs.get("network_class_name")
    if not isinstance(name, str) or not name:
        raise ValueError("nnunet: arch kwargs need network_class_name (a plans file's configurations[c]"
                         "['architecture'])")
    module, _, cls = name.rpartition(".")
    if cls not in NNUNET_CLASSES or (module and not module.startswith("dynamic_network_architectures")):
        raise ValueError(f"nnunet: network class {name!r} is not one of nnU-Net's "
                         f"dynamic_network_architectures {list(NNUNET_CLASSES)}")
    return cls


def _arch_kwargs(kwargs: Mapping) -> dict:
    arch_kwargs = kwargs.get("arch_kwargs")
    if not isinstance(arch_kwargs, Mapping):
        raise ValueError("nnunet: arch kwargs need arch_kwargs (a plans file's configurations[c]['architecture']"
                         "['arch_kwargs'])")
    return dict(arch_kwargs)


def nnunet_dims(kwargs: Mapping) -> int | None:
    """Spatial dimensions of the plans' network (its ``conv_op``: ``Conv2d`` -> 2, ``Conv3d`` -> 3);
    ``None`` when the kwargs do not say."""
    conv_op = (kwargs.get("arch_kwargs") or {}).get("conv_op") if isinstance(kwargs, Mapping) else None
    name = conv_op if isinstance(conv_op, str) else getattr(conv_op, "__name__", "")
    for dims in (1, 2, 3):
        if str(name).endswith(f"Conv{dims}d"):
            return dims
    return None


def build_nnunet(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int | None = None,
                 **kwargs) -> torch.nn.Module:
    """The plans' network, built by nnU-Net (module docstring); ``out_channels`` = nnU-Net's
    segmentation heads (labels incl. background, or the regions of a region-based model)."""
    unknown = sorted(set(kwargs) - {"network_class_name", "arch_kwargs", "_kw_requires_import"})
    if unknown:
        raise ValueError(f"nnunet: unknown arch kwargs {unknown}; give a plans file's configurations[c]"
                         "['architecture'] (network_class_name, arch_kwargs, _kw_requires_import)")
    cls = _class(kwargs)
    arch_kwargs = _arch_kwargs(kwargs)
    requires = list(kwargs.get("_kw_requires_import") or [])
    for key in requires:
        value = arch_kwargs.get(key)
        if value is not None and not (isinstance(value, str) and value.startswith(_IMPORTABLE)):
            raise ValueError(f"nnunet: arch_kwargs[{key!r}] = {value!r} is not a torch / dynamic_network_architectures "
                             "class name; only those are imported from a plans file")
    dims = nnunet_dims(kwargs)
    if spatial_dims is not None and dims is not None and int(spatial_dims) != dims:
        raise ValueError(f"nnunet: the plans' conv_op is {dims}D, not {int(spatial_dims)}D")
    if dims is not None and len(roi_size) != dims:
        raise ValueError(f"nnunet: the plans' network is {dims}D; patch {list(roi_size)} has {len(roi_size)} sides")
    name = kwargs["network_class_name"]
    if "." not in name:  # a bare class name: where dynamic_network_architectures has it
        name = f"dynamic_network_architectures.architectures.unet.{cls}"
    try:
        return get_network_from_plans(name, arch_kwargs, requires, int(in_channels), int(out_channels),
                                      allow_init=True, deep_supervision=False)
    except (AssertionError, TypeError, KeyError, ImportError, AttributeError) as e:  # nnU-Net's own checks
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"nnunet: {cls} cannot be built from these arch_kwargs ({type(e).__name__}: "
                         f"{first[:300]})") from None


def nnunet_size_divisor(kwargs: Mapping) -> int:
    """The largest per-axis product of the plans' strides (module docstring)."""
    return stride_divisor(_arch_kwargs(kwargs)["strides"])


def nnunet_axis_divisors(kwargs: Mapping) -> list[int]:
    """The product of the plans' strides on each axis (module docstring)."""
    return stride_products(_arch_kwargs(kwargs)["strides"])


def nnunet_layout(network: torch.nn.Module | None, kwargs: Mapping) -> ArchLayout:
    """Stages and stem from ``network`` (``encoder.stages``, ``encoder.stem``) or from ``kwargs``
    (``arch_kwargs.n_stages``, the class)."""
    if network is not None:
        network = getattr(network, "module", network)
        network = getattr(network, "_orig_mod", network)
        n = len(network.encoder.stages)
        stem = getattr(network.encoder, "stem", None) is not None
    else:
        n = int(_arch_kwargs(kwargs)["n_stages"])
        stem = _class(kwargs) in _WITH_STEM
    levels = [[f"encoder.stages.{i}", f"decoder.encoder.stages.{i}"] for i in range(n)]
    if stem:
        levels[0] = ["encoder.stem", "decoder.encoder.stem"] + levels[0]
    return ArchLayout("nnunet", levels, [f"decoder.stages.{i}" for i in range(n - 1)], ["decoder.seg_layers"],
                      f"encoder.stages.{n - 2}")
