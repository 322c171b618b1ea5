"""The 2D segmentation networks of the thesis (SPEC section 7) behind one name, and their encoders
as image classifiers for pretraining.

Each is registered under its name in :mod:`medxfer.networks.registry` (``build_network("unet2d",
3, 1, (224, 224))``); ``encoder_classifier=True`` builds its :class:`EncoderClassifier` instead.

========================== ============================================ =============================
arch                       network                                      encoder output (deepest)
========================== ============================================ =============================
``unet2d``                 :class:`~medxfer.networks.unet2d.UNet2D`     1024 ch at H/16
``resnet50_attention_unet`` :class:`~medxfer.networks.attention_unet.ResNet50AttentionUNet`
                                                                        2048 ch at H/32
``swin_unet``              :class:`~medxfer.networks.swin_unet.SwinUNet`  768 ch at H/32
========================== ============================================ =============================

:class:`EncoderClassifier` is the pretraining network of the thesis (chapter 2: encoders pretrained
on ImageNet classification): the segmentation network's ``encoder`` submodule, global average
pooling of its deepest feature map and a linear layer. Its parameter names are the segmentation
network's ``encoder.*`` names plus ``classifier.*``, so a pretraining checkpoint initialises a
segmentation network's encoder directly (transfer mode ``all_but_head`` loads every matching key:
the encoder; decoder and head stay at their initialisation).

TorchScript: the three networks and their :class:`EncoderClassifier` s script with
``torch.jit.script`` and match eager. The classifier picks its encoder's feature path by the
encoder's submodules (``hasattr``, which TorchScript resolves when compiling) rather than by passing
the encoder to :func:`encoder_features` (TorchScript cannot take a module as an argument).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medxfer.networks.attention_unet import ResNet50AttentionUNet, resnet50_attention_unet_layout
from medxfer.networks.layout import ArchLayout
from medxfer.networks.swin_unet import SwinUNet, swin_unet_layout
from medxfer.networks.unet2d import UNet2D, unet2d_layout

__all__ = ["THESIS_ARCHS", "build_thesis_network", "thesis_layout", "EncoderClassifier", "encoder_features"]

#: The thesis' segmentation networks.
THESIS_ARCHS = ("unet2d", "resnet50_attention_unet", "swin_unet")
#: Channels of the deepest encoder feature map.
DEEPEST_CHANNELS = {"unet2d": 1024, "resnet50_attention_unet": 2048, "swin_unet": 768}


def _check(arch: str) -> str:
    if arch not in THESIS_ARCHS:
        raise ValueError(f"not a thesis 2D arch: {arch!r} (these are {list(THESIS_ARCHS)}; a truncated ResNet50 "
                         "is pretrained as resnet50_attention_unet and truncated downstream)")
    return arch


def build_thesis_network(arch: str, in_channels: int = 3, out_channels: int = 1,
                         image_size: int | Sequence[int] = 224, **kwargs) -> nn.Module:
    """2D segmentation network ``arch``: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits.

    ``image_size`` is used by the Swin U-Net only (its window layout; see its module); the others
    take any multiple of their size divisor (U-Net 16, ResNet50 Attention U-Net 32).
    ``encoder_classifier=True`` builds the pretraining :class:`EncoderClassifier` instead, with
    ``out_channels`` classes (how model-bank entries of pretrained encoders are rebuilt).
    """
    arch = _check(arch)
    if kwargs.pop("encoder_classifier", False):
        return EncoderClassifier(arch, out_channels, in_channels, image_size, **kwargs)
    if arch == "unet2d":
        return UNet2D(in_channels, out_channels, **kwargs)
    if arch == "resnet50_attention_unet":
        return ResNet50AttentionUNet(in_channels, out_channels, **kwargs)
    size = image_size if isinstance(image_size, int) else int(image_size[0])
    return SwinUNet(in_channels, out_channels, img_size=size, **kwargs)


def thesis_layout(arch: str, network: nn.Module | None = None) -> ArchLayout:
    """:class:`~medxfer.networks.layout.ArchLayout` of a thesis 2D network (or of its
    :class:`EncoderClassifier`: same encoder names, no decoder, head ``classifier``)."""
    arch = _check(arch)
    if isinstance(network, EncoderClassifier):
        layout = thesis_layout(arch)
        return ArchLayout(arch, layout.encoder_levels, [], ["classifier"], layout.penultimate_encoder)
    if arch == "unet2d":
        return unet2d_layout(network)
    if arch == "resnet50_attention_unet":
        return resnet50_attention_unet_layout(network)
    return swin_unet_layout(network)


def encoder_features(arch: str, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Deepest encoder feature map ``(B, C, h, w)`` of ``encoder`` (the ``encoder`` submodule of a
    network of ``arch``) for images ``(B, in_channels, H, W)``."""
    arch = _check(arch)
    if arch == "unet2d":
        return encoder(x)[-1]
    if arch == "resnet50_attention_unet":
        e = encoder
        x = e.maxpool(e.act(e.bn1(e.conv1(x))))
        return e.layer4(e.layer3(e.layer2(e.layer1(x))))
    return encoder(x)[1]


class EncoderClassifier(nn.Module):
    """Encoder of a 2D segmentation arch + global average pooling + linear head (pretraining).

    Maps ``(B, in_channels, H, W)`` to ``(B, num_classes)`` logits. ``encoder.*`` parameters are
    named as in the segmentation network (see the module docstring); ``arch_kwargs`` go to the
    network (e.g. ``channels`` of ``unet2d``).
    """

    def __init__(self, arch: str, num_classes: int, in_channels: int = 3, image_size: int | Sequence[int] = 224,
                 **arch_kwargs):
        super().__init__()
        self.arch = _check(arch)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.encoder = build_thesis_network(arch, in_channels, 1, image_size, **arch_kwargs).encoder
        deepest = DEEPEST_CHANNELS[arch]
        if arch == "unet2d" and "channels" in arch_kwargs:  # a narrower U-Net (tests, small data)
            deepest = int(arch_kwargs["channels"][-1])
        if arch == "swin_unet":  # 8 * embed_dim (768 by default): read from the encoder's final norm
            deepest = int(self.encoder.norm.normalized_shape[0])
        self.classifier = nn.Linear(deepest, num_classes)

    def deepest_features(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`encoder_features` of ``self.encoder``, told apart by the encoder's modules
        (TorchScript resolves these ``hasattr`` tests when compiling and compiles only the branch taken)."""
        if hasattr(self.encoder, "levels"):  # UNet2DEncoder
            return self.encoder(x)[-1]
        if hasattr(self.encoder, "patch_embed"):  # SwinEncoder
            return self.encoder(x)[1]
        e = self.encoder  # MONAI resnet50 (resnet50_attention_unet)
        x = e.maxpool(e.act(e.bn1(e.conv1(x))))
        return e.layer4(e.layer3(e.layer2(e.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.deepest_features(x).mean(dim=(2, 3)))
