"""U-shape EfficientNet-b0 segmenter of TATL (SPEC section 6), and the encoder it shares with the Link shape.

The U shape is MONAI's ``FlexibleUNet`` (``backbone="efficientnet-b0"``), unchanged: EfficientNet-b0
encoder (Tan & Le 2019, MONAI's port of lukemelas/EfficientNet-PyTorch) and a U-Net decoder
(Ronneberger et al. 2015) whose stages *concatenate* the encoder feature of the same scale
(TATL, Nguyen et al. 2023, section 4.1: "combined by either the adding or concatenating operations").

The encoder is held as ``network.encoder`` (state-dict prefix :data:`ENCODER_PREFIX`), an
``EfficientNetEncoder`` that returns 5 feature maps for an input ``(B, C, H, W)``:

======= ======== ========= ===============================================
level   channels scale     modules (relative to ``encoder``)
======= ======== ========= ===============================================
1       16       H/2       ``_conv_stem``, ``_bn0``, ``_blocks.0``
2       24       H/4       ``_blocks.1``
3       40       H/8       ``_blocks.2``
4       112      H/16      ``_blocks.3``, ``_blocks.4``
5       320      H/32      ``_blocks.5``, ``_blocks.6`` (+ ``_conv_head``, ``_bn1``, ``_fc``: the
                           ImageNet classifier, kept so that state dicts match, unused in forward)
======= ======== ========= ===============================================

:class:`medxfer.networks.linknet.LinkNetEffB0` builds the same encoder the same way, so encoder keys
(and weights) move between U and Link shapes; :func:`effb0_layout` describes both for the transfer
modes (registered as ``unet_effb0`` / ``linknet_effb0`` in :mod:`medxfer.networks.registry`).

Offline weights: ``FlexibleUNet(pretrained=True)`` downloads
``efficientnet-b0-355c32eb.pth`` from GitHub (MONAI ``efficientnet.url_map``) and fails without
internet. Here the networks are built with random initialisation and ``pretrained=True`` is refused;
a local copy of that file (lukemelas naming, ``_blocks.<i>.*`` with a flat block index, see
:func:`lukemelas_key`), or any state dict of a MONAI EfficientNet-b0 encoder / ``FlexibleUNet`` /
``LinkNetEffB0``, is loaded by the one weight path, :func:`medxfer.transfer.weights.load_encoder_weights`.

Decoder against TATL section 4.1 ("an up-sampling layer and ... two 3x3 convolution filters with
activation functions in between", the encoder feature concatenated): ``FlexibleUNet``'s decoder stage
(MONAI ``UpCat``) is 1x1 conv halving the channels (``pre_conv="default"``) -> x2 interpolation ->
concatenation -> two 3x3 conv + norm + act. The 1x1 pre-conv is not in the paper (nor in the
authors' library, qubvel ``segmentation_models`` ``Unet``); ``pre_conv=None``
(:data:`PAPER_UNET_KWARGS`) drops it and gives section 4.1's stage exactly: x2 interpolation ->
concatenation -> two 3x3 conv + norm + act. TATL builds its U shape that way
(:func:`medxfer.transfer.tatl.tatl_arch_kwargs`, ``decoder_block: paper``); :func:`unet_effb0` itself
keeps ``FlexibleUNet``'s default so that the registry's ``unet_effb0`` stays MONAI's own network (a
zoo bundle's ``network_def`` is a plain ``FlexibleUNet``; ``pre_conv: null`` travels as an argument).
Decoder parameters: 1,771,584 with the pre-conv, 2,239,168 without (3 -> 1 channels).

TorchScript: both shapes script with ``torch.jit.script`` as built and match eager
(tests/test_torchscript.py).
"""

from __future__ import annotations

import re

import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

from medxfer.networks.layout import ArchLayout

__all__ = [
    "ENCODER_PREFIX", "EFFB0_CHANNELS", "IMAGENET_URL", "build_effb0_encoder", "unet_effb0",
    "no_download", "lukemelas_key", "effb0_layout", "parameter_counts", "PAPER_UNET_KWARGS",
]

BACKBONE = "efficientnet-b0"
#: State-dict prefix of the encoder in :func:`unet_effb0` and ``LinkNetEffB0`` (FlexibleUNet's attribute).
ENCODER_PREFIX = "encoder."
#: Channels of the 5 encoder feature maps, scales H/2 .. H/32.
EFFB0_CHANNELS = (16, 24, 40, 112, 320)
#: What ``FlexibleUNet(pretrained=True)`` would download (never fetched here).
IMAGENET_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b0-355c32eb.pth"
#: Encoder modules of the ImageNet classifier: in the state dict, never used by the segmenters.
UNUSED_ENCODER_MODULES = ("_conv_head", "_bn1", "_fc")
#: ``unet_effb0`` arguments of TATL section 4.1's U-shape decoder stage (no 1x1 conv before the up-sampling).
PAPER_UNET_KWARGS = {"pre_conv": None}


def no_download(pretrained: bool) -> None:
    """``pretrained=True`` would download the ImageNet weights: refused with the way to do it offline."""
    if pretrained:
        raise ValueError(
            "pretrained=True would download the ImageNet EfficientNet-b0 weights (" + IMAGENET_URL + "), "
            "which is not possible offline; copy that file here and load it with "
            "medxfer.transfer.weights.load_encoder_weights (TATL: --imagenet_weights <path>)")


def build_effb0_encoder(in_channels: int = 3, spatial_dims: int = 2) -> torch.nn.Module:
    """The EfficientNet-b0 encoder exactly as ``FlexibleUNet`` builds it, random init, never downloading.

    Same class (MONAI ``EfficientNetEncoder``) and arguments as ``FLEXUNET_BACKBONE``'s registry entry
    (BatchNorm eps 1e-3, momentum 0.01; 1000-class ``_fc`` kept), ``pretrained=False``. The registry
    dict is copied (``FlexibleUNet`` updates it in place).
    """
    entry = FLEXUNET_BACKBONE.register_dict[BACKBONE]
    params = dict(entry["parameter"])
    params.update({"spatial_dims": spatial_dims, "in_channels": in_channels, "pretrained": False})
    return entry["type"](**params)


def unet_effb0(in_channels: int = 3, out_channels: int = 1, spatial_dims: int = 2, pretrained: bool = False,
               **kwargs) -> torch.nn.Module:
    """U-shape segmenter: MONAI ``FlexibleUNet`` with an EfficientNet-b0 encoder (skip concatenation).

    Maps ``(B, in_channels, H, W)`` to ``(B, out_channels, H, W)`` logits (``(B, C, H, W, D)`` for
    ``spatial_dims=3``). ``FlexibleUNet`` pads internally, but keep sides multiples of 32 (TATL
    trains at 384x512) so that both shapes see the same feature maps. Random initialisation
    (MONAI's TensorFlow-style init); ImageNet encoder weights from a local file are loaded by
    :func:`medxfer.transfer.weights.load_encoder_weights`.

    Args:
        in_channels: image channels (3 for RGB dermoscopy). out_channels: output maps (1: a binary
            mask; apply sigmoid outside).
        spatial_dims: 2 (default) or 3.
        pretrained: must stay ``False``: ``FlexibleUNet(pretrained=True)`` would download (raises).
        kwargs: passed to ``FlexibleUNet`` (``decoder_channels=(256, 128, 64, 32, 16)``,
            ``norm``, ``act``, ``dropout``, ``upsample="nontrainable"``, ``interp_mode``, ``is_pad``,
            ``pre_conv``: ``None`` for TATL section 4.1's decoder stage, see :data:`PAPER_UNET_KWARGS`).
    """
    backbone = kwargs.pop("backbone", BACKBONE)
    if backbone != BACKBONE:
        raise ValueError(f"unet_effb0: backbone is fixed to {BACKBONE!r}, got {backbone!r}")
    no_download(pretrained)
    return FlexibleUNet(in_channels=in_channels, out_channels=out_channels, backbone=BACKBONE, pretrained=False,
                        spatial_dims=spatial_dims, **kwargs)


def lukemelas_key(key: str) -> str:
    """MONAI encoder key -> EfficientNet-PyTorch (lukemelas) key: ``_blocks.<stack>.<i>.x`` -> ``_blocks.<i>.x``.

    MONAI nests the blocks per stack but numbers them globally, so dropping the stack index gives
    the flat index of the original implementation (the mapping MONAI's own ``_load_state_dict`` uses).
    Keys outside ``_blocks`` are the same in both.
    """
    return re.sub(r"^_blocks\.\d+\.(\d+\.)", r"_blocks.\1", key)


def effb0_layout(arch: str = "unet_effb0") -> ArchLayout:
    """:class:`~medxfer.networks.layout.ArchLayout` of :func:`unet_effb0` or ``LinkNetEffB0``.

    Both shapes share the encoder levels of the module table; decoder stages are
    ``decoder.blocks.0`` (H/16) .. ``decoder.blocks.4`` (H), head ``segmentation_head``; the
    penultimate encoder level is ``encoder._blocks.4`` (112 channels, H/16).
    """
    e = ENCODER_PREFIX
    levels = [[e + "_conv_stem", e + "_bn0", e + "_blocks.0"], [e + "_blocks.1"], [e + "_blocks.2"],
              [e + "_blocks.3", e + "_blocks.4"],
              [e + "_blocks.5", e + "_blocks.6"] + [e + m for m in UNUSED_ENCODER_MODULES]]
    return ArchLayout(arch, levels, [f"decoder.blocks.{i}" for i in range(5)], ["segmentation_head"],
                      e + "_blocks.4")


def parameter_counts(network: torch.nn.Module) -> dict[str, int]:
    """Parameters of an effb0 segmenter: ``total``, ``encoder``, ``encoder_used`` (without the unused
    ImageNet classifier ``_conv_head``/``_bn1``/``_fc``), ``decoder``, ``head``."""
    counts = {"total": 0, "encoder": 0, "encoder_used": 0, "decoder": 0, "head": 0}
    unused = tuple(ENCODER_PREFIX + m + "." for m in UNUSED_ENCODER_MODULES)
    for name, p in network.named_parameters():
        counts["total"] += p.numel()
        if name.startswith(ENCODER_PREFIX):
            counts["encoder"] += p.numel()
            counts["encoder_used"] += 0 if name.startswith(unused) else p.numel()
        elif name.startswith("decoder."):
            counts["decoder"] += p.numel()
        elif name.startswith("segmentation_head."):
            counts["head"] += p.numel()
    return counts
