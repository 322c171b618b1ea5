"""MONAI's segmentation networks (SPEC section 3, issue 14): builders and layouts for the registry
(:mod:`medxfer.networks.registry`).

The networks are MONAI's, unchanged: ``UNet`` (Kerfoot et al. 2018, residual units),
``UNETR`` (Hatamizadeh et al. 2022), ``SwinUNETR`` (Hatamizadeh et al. 2022), and, so that model-zoo
bundles and published checkpoints can be imported, ``SegResNet`` (Myronenko 2018), ``DynUNet``
(MONAI's re-implementation of nnU-Net's dynamic U-Net, Isensee et al. 2021), ``BasicUNet`` and
``FlexibleUNet`` (a U-Net decoder on a MONAI EfficientNet or ResNet backbone). What MONAI does not
give is their :class:`~medxfer.networks.layout.ArchLayout`:

============ =================================================== ======================= =====================
arch         encoder levels (1 = highest resolution)             decoder stages (deep    head
                                                                 -> shallow)
============ =================================================== ======================= =====================
unet         level d: the down block at depth d; the last level  up blocks of depth      ``model.2``
             is the bottom block                                 n-2 .. 1
unetr        1: ``encoder1`` + patch embedding; 2-4: a quarter   ``decoder5`` ..         ``out``
             of the ViT blocks + the encoder that reads them;    ``decoder2``
             5: the last quarter + ``vit.norm``
swinunetr    1: patch embedding, ``encoder1``, ``encoder2``;     ``decoder5`` ..         ``out``
             2-4: ``swinViT.layers1..3`` + ``encoder3/4``;       ``decoder1``
             5: ``swinViT.layers4`` + ``encoder10``
segresnet    1: ``convInit`` + ``down_layers.0``; k:             ``up_layers.0`` ..      ``conv_final.2``
             ``down_layers.{k-1}`` (its stride-2 conv + blocks)  ``up_layers.{m-1}``     (its 1x1 conv; the
                                                                                         norm before it is
                                                                                         decoder)
dynunet      1: ``input_block``; k: ``downsamples.{k-2}``;       ``upsamples.0`` ..      ``output_block`` +
             last: ``bottleneck`` (+ their ``skip_layers.*``     ``upsamples.{n-2}``     the deep-supervision
             second names)                                                               heads (both names)
basicunet    1: ``conv_0``; 2-5: ``down_1`` .. ``down_4``        ``upcat_4`` ..          ``final_conv``
                                                                 ``upcat_1``
flexibleunet EfficientNet: 1: stem, ``_bn0``, ``_blocks.0``;     ``decoder.blocks.0``    ``segmentation_head``
             2: ``_blocks.1``; 3: ``_blocks.2``;                 ..
             4: ``_blocks.3-4``; 5: ``_blocks.5-6`` + the        ``decoder.blocks.4``
             unused classifier (``_conv_head``, ``_bn1``,
             ``_fc``). ResNet: 1: ``conv1``, ``bn1``; 2-5:
             ``layer1`` .. ``layer4`` (all under ``encoder.``)
============ =================================================== ======================= =====================

The penultimate encoder module is the second-to-last level's last module (``down_layers.{n-2}``,
``downsamples.{n-3}``, ``down_3``, ``encoder._blocks.4`` / ``encoder.layer3``) except for UNet /
UNETR / SwinUNETR (see their layout functions). Shared modules: ``DynUNet`` holds its blocks twice
(``input_block`` is also ``skip_layers.downsample``, ...) and its state dict lists both names, so
its layout lists both.

Shapes: every network maps ``(B, in_channels, *spatial)`` to ``(B, out_channels, *spatial)`` logits;
each side must be a multiple of the size divisor: UNet and DynUNet the product of their strides
(DynUNet's strides may differ per axis: :func:`stride_divisor` is the largest per-axis product, and
the registry checks each side against its own axis, :func:`stride_products`), UNETR the
ViT patch 16, SwinUNETR and FlexibleUNet 32, SegResNet ``2 ** (len(blocks_down) - 1)``, BasicUNet 16
(its four max-pools; MONAI pads odd sides, but the registry keeps sides even at every level).
Builders receive the registry's defaults merged under the user's kwargs; they take the kwargs of a
model-zoo bundle's ``network_def`` (all but ``_target_``, ``in_channels``, ``out_channels``,
``spatial_dims``). Choices where MONAI is silent:

* ``dynunet``: built with the ``deep_supervision`` it is given (so a zoo state dict trained with
  deep supervision, whose ``deep_supervision_heads`` are in the file, loads strictly), then the
  network's ``deep_supervision`` flag is switched off, so its forward returns one tensor in
  training too (the supervision heads stay, part of the head, but are not run: their skip layers'
  output list is dropped).
* ``flexibleunet``: ``pretrained=True`` is refused (it downloads); ``segresnet``:
  ``use_conv_final=False`` is refused (no class-specific head to transfer around).

``network_def``: any network class a bundle names, e.g. DiNTS (arch kwargs ``{"network_def": {...}}``,
the bundle's ``network_def`` with ``_target_`` and literal values). MONAI's ``ConfigParser`` builds
it (``in_channels`` / ``out_channels`` / ``num_classes`` keys present in the dict are set to the
builder's channels). Nothing is evaluated: ``$`` expressions, ``@`` references and ``%`` macros are
refused (resolve them to values first, as :mod:`medxfer.transfer.bank_import` does), and every
``_target_`` must be a ``torch.nn.Module`` class. Its layout is :func:`~medxfer.networks.auto_layout.auto_layout`
of the built network at the builder's roi: it costs one forward pass on a zero input (done once per
built network, then kept on it) and needs the network (``arch_layout("network_def")`` without one is
a :class:`~medxfer.networks.layout.LayoutError`). Its size divisor is 1 (no check: the network's
own forward refuses what it cannot take) unless the class is one the registry knows (UNet, UNETR,
SwinUNETR, SegResNet, DynUNet, BasicUNet, FlexibleUNet), whose divisor is used.
"""

from __future__ import annotations

import copy
import math
import pydoc
from typing import Mapping, Sequence

import torch
from monai.bundle import ConfigComponent, ConfigParser
from monai.networks.nets import UNETR, BasicUNet, DynUNet, FlexibleUNet, SegResNet, SwinUNETR, UNet
from monai.networks.nets.dynunet import DynUNetSkipLayer

from medxfer.networks.auto_layout import auto_layout
from medxfer.networks.layout import ArchLayout, LayoutError

__all__ = ["DEFAULT_KWARGS", "build_unet", "build_unetr", "build_swinunetr", "unet_size_divisor", "unet_layout",
           "unetr_layout", "swinunetr_layout", "stride_products", "stride_divisor", "build_segresnet",
           "segresnet_layout",
           "segresnet_size_divisor", "build_dynunet", "dynunet_layout", "dynunet_size_divisor", "build_basicunet",
           "basicunet_layout", "build_flexibleunet", "flexibleunet_layout", "build_network_def", "network_def_layout",
           "network_def_size_divisor", "network_def_dims", "network_def_class"]

#: Defaults merged under the user's ``arch_kwargs`` (MONAI's own defaults otherwise).
DEFAULT_KWARGS: dict[str, dict] = {
    "unet": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2, "norm": "instance"},
    "unetr": {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12, "norm_name": "instance"},
    "swinunetr": {"feature_size": 48, "norm_name": "instance"},
    "segresnet": {},
    # DynUNet has no defaults for these three; nnU-Net's usual 5-level 3D topology.
    "dynunet": {"kernel_size": (3, 3, 3, 3, 3), "strides": (1, 2, 2, 2, 2), "upsample_kernel_size": (2, 2, 2, 2)},
    "basicunet": {},
    "flexibleunet": {"backbone": "efficientnet-b0"},
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


# --- networks a model-zoo bundle or a published checkpoint brings (issue 14) ------------------------

def stride_products(strides: Sequence) -> list[int]:
    """Per-stage strides (ints, or one int per axis) -> the product of the strides on each axis
    (one number when every stride is an int): ``[1, [1, 2, 2], 2]`` -> ``[2, 4, 4]``."""
    per_stage = [[int(s)] if isinstance(s, (int, float)) else [int(v) for v in s] for s in strides]
    axes = max((len(s) for s in per_stage), default=1)
    return [int(math.prod(s[a] if len(s) > 1 else s[0] for s in per_stage)) for a in range(axes)]


def stride_divisor(strides: Sequence) -> int:
    """The largest of :func:`stride_products`: one divisor for every side (``[1, [1, 2, 2], 2]`` -> 4).
    A side that is a multiple of it is a multiple of its own axis's product, but an axis with a
    smaller product may take sides it refuses; the registry checks each side against its own axis
    (:func:`medxfer.networks.registry.axis_divisors`)."""
    return int(max(stride_products(strides), default=1))


def build_segresnet(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int = 3,
                    **kwargs) -> torch.nn.Module:
    if kwargs.get("use_conv_final", True) is False:
        raise ValueError("segresnet: use_conv_final=False builds no output convolution, so there is no class-specific "
                         "head; build it with use_conv_final=True")
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)


def segresnet_size_divisor(kwargs: dict) -> int:
    """SegResNet halves ``len(blocks_down) - 1`` times (MONAI's default ``(1, 2, 2, 4)``: 8)."""
    return 2 ** (len(kwargs.get("blocks_down", (1, 2, 2, 4))) - 1)


def segresnet_layout(network: torch.nn.Module | None, kwargs: dict) -> ArchLayout:
    """Depth from ``network`` (``down_layers`` / ``up_layers``) or ``kwargs`` (``blocks_down`` / ``blocks_up``)."""
    network = _unwrap(network)
    if network is not None:
        n_down, n_up = len(network.down_layers), len(network.up_layers)
    else:
        n_down, n_up = len(kwargs.get("blocks_down", (1, 2, 2, 4))), len(kwargs.get("blocks_up", (1, 1, 1)))
    levels = [["convInit", "down_layers.0"]] + [[f"down_layers.{i}"] for i in range(1, n_down)]
    return ArchLayout("segresnet", levels, [f"up_layers.{i}" for i in range(n_up)], ["conv_final.2"],
                      levels[-2][-1])


def build_dynunet(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int = 3,
                  **kwargs) -> torch.nn.Module:
    """MONAI ``DynUNet``; with ``deep_supervision=True`` its heads are built (their weights load) and
    then switched off (module docstring)."""
    network = DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
    network.deep_supervision = False
    for module in network.modules():  # nor compute (and keep) the supervision outputs in the forward pass
        if isinstance(module, DynUNetSkipLayer):
            module.heads = None
    return network


def dynunet_size_divisor(kwargs: dict) -> int:
    return stride_divisor(kwargs["strides"])


def dynunet_layout(network: torch.nn.Module | None, kwargs: dict) -> ArchLayout:
    """Depth (``len(strides)``) and supervision heads from ``network`` or ``kwargs``.

    ``DynUNet`` nests its blocks in ``skip_layers`` (a ``DynUNetSkipLayer`` per depth d: its
    ``downsample`` is ``input_block`` / ``downsamples.{d-1}``, its ``upsample`` is
    ``upsamples.{n-2-d}``, the deepest one's ``next_layer`` is ``bottleneck``, and the layer of
    depth d >= 1 holds ``deep_supervision_heads.{d-1}`` as ``super_head``); those second names are in
    the state dict, so each part lists them too."""
    network = _unwrap(network)
    if network is not None:
        n = len(network.strides)
        heads = len(network.deep_supervision_heads) if hasattr(network, "deep_supervision_heads") else 0
    else:
        n = len(kwargs["strides"])
        heads = int(kwargs.get("deep_supr_num", 1)) if kwargs.get("deep_supervision") else 0
    skip = ["skip_layers" + ".next_layer" * d for d in range(n - 1)]  # the skip layer of depth d
    levels = [["input_block", skip[0] + ".downsample"]]
    levels += [[f"downsamples.{d - 1}", skip[d] + ".downsample"] for d in range(1, n - 1)]
    levels.append(["bottleneck", skip[-1] + ".next_layer"])
    head = ["output_block"]
    if heads:
        head += ["deep_supervision_heads"] + [skip[d] + ".super_head" for d in range(1, heads + 1)]
    return ArchLayout("dynunet", levels, [f"upsamples.{i}" for i in range(n - 1)], head, levels[-2][0])


def build_basicunet(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int = 3,
                    **kwargs) -> torch.nn.Module:
    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)


def basicunet_layout(network: torch.nn.Module | None, kwargs: dict) -> ArchLayout:
    """Fixed: BasicUNet always has five levels."""
    levels = [["conv_0"], ["down_1"], ["down_2"], ["down_3"], ["down_4"]]
    return ArchLayout("basicunet", levels, ["upcat_4", "upcat_3", "upcat_2", "upcat_1"], ["final_conv"], "down_3")


def build_flexibleunet(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int = 3,
                       **kwargs) -> torch.nn.Module:
    """MONAI ``FlexibleUNet`` with random initialisation: ``pretrained=True`` would download ImageNet
    weights and is refused; import a local weight file as a checkpoint instead."""
    backbone = kwargs.pop("backbone")
    if kwargs.pop("pretrained", False):
        raise ValueError(f"flexibleunet: pretrained=True would download the ImageNet weights of {backbone!r}, which is "
                         "not possible offline; build with pretrained=False and load a local weight file")
    return FlexibleUNet(in_channels=in_channels, out_channels=out_channels, backbone=backbone, pretrained=False,
                        spatial_dims=spatial_dims, **kwargs)


#: EfficientNet backbones: the 7 block stacks are grouped into the 5 feature levels MONAI's
#: ``EfficientNetEncoder`` returns (``extract_stacks`` (1, 2, 3, 5, 7), the same for b0..b8 and l2).
_EFFNET_STACKS = ((0,), (1,), (2,), (3, 4), (5, 6))


def flexibleunet_layout(network: torch.nn.Module | None, kwargs: dict) -> ArchLayout:
    """Backbone from ``network`` (``backbone``) or ``kwargs``; EfficientNet or ResNet (module table)."""
    network = _unwrap(network)
    backbone = str(network.backbone if network is not None else kwargs.get("backbone", "efficientnet-b0"))
    e = "encoder."
    if backbone.startswith("efficientnet"):
        levels = [[e + f"_blocks.{i}" for i in stacks] for stacks in _EFFNET_STACKS]
        levels[0] = [e + "_conv_stem", e + "_bn0"] + levels[0]
        levels[-1] += [e + "_conv_head", e + "_bn1", e + "_fc"]  # ImageNet classifier: in the state dict, unused
        penultimate = e + "_blocks.4"
    elif backbone.startswith("resnet"):
        levels = [[e + "conv1", e + "bn1"]] + [[e + f"layer{i}"] for i in range(1, 5)]
        penultimate = e + "layer3"
    else:
        raise ValueError(f"flexibleunet: no known layout for backbone {backbone!r} (EfficientNet and ResNet "
                         "backbones have one)")
    n_blocks = len(network.decoder.blocks) if network is not None else len(levels)
    return ArchLayout("flexibleunet", levels, [f"decoder.blocks.{i}" for i in range(n_blocks)],
                      ["segmentation_head"], penultimate)


# --- any network a bundle's network_def names ----------------------------------------------------------

_EXPRESSION = ("$", "@", "%")


def _literal_def(value, where: str) -> None:
    """Refuse what ``ConfigParser`` would evaluate, and ``_target_`` s that are not network classes."""
    if isinstance(value, str) and value.startswith(_EXPRESSION):
        raise ValueError(f"{where}: {value!r} is a bundle expression / reference; network_def must hold literal "
                         "values (resolve it first)")
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _literal_def(v, f"{where}#{i}")
    if isinstance(value, Mapping):
        if "_target_" in value:
            network_def_class(value, where)
        if value.get("_mode_", "default") != "default":
            raise ValueError(f"{where}: _mode_ {value['_mode_']!r} is refused; network_def builds its class")
        for k, v in value.items():
            if k != "_target_":
                _literal_def(v, f"{where}#{k}")


def network_def_class(network_def: Mapping, where: str = "network_def") -> type:
    """The class a ``network_def`` dict's ``_target_`` names (MONAI's short names resolved as
    ``ConfigParser`` does); a ``ValueError`` unless it is a ``torch.nn.Module`` class."""
    target = network_def.get("_target_")
    if not isinstance(target, str) or not target:
        raise ValueError(f"{where}: _target_ must name a class, got {target!r}")
    path = ConfigComponent(dict(network_def)).resolve_module_name()
    try:
        cls = pydoc.locate(path)
    except pydoc.ErrorDuringImport as e:
        raise ValueError(f"{where}: _target_ {target!r} cannot be imported ({e.exc.__name__})") from None
    if cls is None:
        raise ValueError(f"{where}: _target_ {target!r} is not an importable class")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{where}: _target_ {target!r} is not a torch.nn.Module class; network_def builds networks "
                         "only")
    return cls


def network_def_dims(kwargs: Mapping) -> int | None:
    """``network_def["spatial_dims"]`` when it is an int, else ``None``."""
    dims = (kwargs.get("network_def") or {}).get("spatial_dims") if isinstance(kwargs, Mapping) else None
    return int(dims) if isinstance(dims, int) and not isinstance(dims, bool) else None


def _def(kwargs: Mapping) -> dict:
    network_def = kwargs.get("network_def")
    if not isinstance(network_def, Mapping) or "_target_" not in network_def:
        raise ValueError("network_def: arch kwargs need network_def, a bundle's network_def dict with _target_")
    return copy.deepcopy(dict(network_def))


def build_network_def(in_channels: int, out_channels: int, roi_size: Sequence[int], spatial_dims: int | None = None,
                      **kwargs) -> torch.nn.Module:
    """The network ``kwargs["network_def"]`` describes, built by MONAI's ``ConfigParser`` (module docstring)."""
    unknown = sorted(set(kwargs) - {"network_def"})
    if unknown:
        raise ValueError(f"network_def: unknown arch kwargs {unknown}; the network's own arguments go inside "
                         "network_def")
    network_def = _def(kwargs)
    _literal_def(network_def, "network_def")
    target = network_def["_target_"]
    dims = network_def_dims(kwargs)
    if spatial_dims is not None and dims is not None and int(spatial_dims) != dims:
        raise ValueError(f"network_def ({target}): spatial_dims is {dims} there, not {int(spatial_dims)}")
    if "in_channels" in network_def:
        network_def["in_channels"] = int(in_channels)
    for key in ("out_channels", "num_classes"):
        if key in network_def:
            network_def[key] = int(out_channels)
    try:
        network = ConfigParser({"network_def": network_def}).get_parsed_content("network_def")
    except Exception as e:  # noqa: BLE001 - whatever the class raises for its arguments: one line
        while e.__cause__ is not None:  # MONAI wraps the class's own error in a RuntimeError
            e = e.__cause__
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"network_def ({target}): cannot build it: {type(e).__name__}: {first[:300]}") from None
    if not isinstance(network, torch.nn.Module):
        raise ValueError(f"network_def ({target}): built a {type(network).__name__}, not a network")
    network._medxfer_input = (int(in_channels), tuple(int(r) for r in roi_size))  # for the automatic layout
    return network


def network_def_layout(network: torch.nn.Module | None, kwargs: dict) -> ArchLayout:
    """:func:`~medxfer.networks.auto_layout.auto_layout` of a network :func:`build_network_def` built
    (its input channels and roi are kept on it), computed once per network."""
    target = (kwargs.get("network_def") or {}).get("_target_", "network_def")
    if network is None:
        raise LayoutError(f"network_def ({target}): the automatic layout needs the built network (one forward pass); "
                          "pass the network, or an explicit layout (--layout)")
    network = _unwrap(network)
    cached = network.__dict__.get("_medxfer_layout")
    if cached is None:
        given = network.__dict__.get("_medxfer_input")
        if given is None:
            raise LayoutError(f"{type(network).__name__}: not built by build_network('network_def', ...), so its input "
                              "size is unknown; pass an explicit layout (--layout)")
        cached = network._medxfer_layout = auto_layout(network, given[0], given[1], arch="network_def")
    return copy.deepcopy(cached)


def network_def_size_divisor(kwargs: dict) -> int:
    """The registry divisor of a class it knows (module docstring), else 1."""
    try:
        network_def = _def(kwargs)
        cls = network_def_class(network_def)
    except ValueError:
        return 1  # the builder reports it
    own = {k: v for k, v in network_def.items() if not k.startswith("_")}
    divisors = {UNet: unet_size_divisor, UNETR: lambda kw: 16, SwinUNETR: lambda kw: 32,
                SegResNet: segresnet_size_divisor, DynUNet: dynunet_size_divisor, BasicUNet: lambda kw: 16,
                FlexibleUNet: lambda kw: 32}
    try:
        return int(divisors[cls](own)) if cls in divisors else 1
    except (KeyError, TypeError, ValueError):
        return 1
