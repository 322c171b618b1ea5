"""The 2D segmentation networks of the thesis (SPEC section 7) behind one name, and their encoders
as image classifiers for pretraining.

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
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["SEG2D_ARCHS", "build_seg2d", "seg2d_layout", "EncoderClassifier", "encoder_features"]

#: Truncated encoders (SPEC section 8) with a U-Net-style decoder: :class:`~medxfer.transfer.truncated.TruncatedSegmenter`
#: (``level`` keyword: 1..3 truncated, 4 full encoder).
TRUNCATED_ARCHS = {"truncated_resnet50": "resnet50", "truncated_densenet121": "densenet121"}
SEG2D_ARCHS = ("unet2d", "resnet50_attention_unet", "swin_unet", *TRUNCATED_ARCHS)
#: Channels of the deepest encoder feature map.
DEEPEST_CHANNELS = {"unet2d": 1024, "resnet50_attention_unet": 2048, "swin_unet": 768}


def _check(arch: str) -> str:
    if arch not in SEG2D_ARCHS:
        raise ValueError(f"unknown 2D arch {arch!r}; choose one of {list(SEG2D_ARCHS)}")
    return arch


def build_seg2d(arch: str, in_channels: int = 3, out_channels: int = 1, image_size: int | Sequence[int] = 224,
                **kwargs) -> nn.Module:
    """2D segmentation network ``arch``: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits.

    ``image_size`` is used by the Swin U-Net only (its window layout; see its module); the others
    take any multiple of their size divisor (U-Net 16, ResNet50 Attention U-Net 32).
    ``encoder_classifier=True`` builds the pretraining :class:`EncoderClassifier` instead, with
    ``out_channels`` classes (how model-bank entries of pretrained encoders are rebuilt).
    """
    arch = _check(arch)
    if kwargs.pop("encoder_classifier", False):
        return EncoderClassifier(arch, out_channels, in_channels, image_size, **kwargs)
    if arch in TRUNCATED_ARCHS:
        from medxfer.transfer.truncated import TruncatedSegmenter

        return TruncatedSegmenter(TRUNCATED_ARCHS[arch], kwargs.pop("level", 3), out_channels, in_channels, **kwargs)
    if arch == "unet2d":
        from medxfer.networks.unet2d import UNet2D

        return UNet2D(in_channels, out_channels, **kwargs)
    if arch == "resnet50_attention_unet":
        from medxfer.networks.attention_unet import ResNet50AttentionUNet

        return ResNet50AttentionUNet(in_channels, out_channels, **kwargs)
    from medxfer.networks.swin_unet import SwinUNet

    size = image_size if isinstance(image_size, int) else int(image_size[0])
    return SwinUNet(in_channels, out_channels, img_size=size, **kwargs)


def seg2d_layout(arch: str, network: nn.Module | None = None):
    """:class:`~medxfer.networks.factory.ArchLayout` of a 2D network (or of its :class:`EncoderClassifier`:
    same encoder names, head ``classifier``)."""
    arch = _check(arch)
    if arch in TRUNCATED_ARCHS:
        from medxfer.networks.factory import ArchLayout

        kept = [n for n, m in network.encoder.named_children() if any(True for _ in m.parameters())] \
            if network is not None else []
        return ArchLayout(arch, [["encoder"]], [f"decoder.{i}" for i in range(len(network.decoder))]
                          if network is not None else [], ["head"],
                          f"encoder.{kept[-2]}" if len(kept) >= 2 else "encoder")
    if isinstance(network, EncoderClassifier):
        from medxfer.networks.factory import ArchLayout

        layout = seg2d_layout(arch)
        return ArchLayout(arch, layout.encoder_levels, [], ["classifier"], layout.penultimate_encoder)
    if arch == "unet2d":
        from medxfer.networks.unet2d import unet2d_layout

        return unet2d_layout(network)
    if arch == "resnet50_attention_unet":
        from medxfer.networks.attention_unet import resnet50_attention_unet_layout

        return resnet50_attention_unet_layout(network)
    from medxfer.networks.swin_unet import swin_unet_layout

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
        if arch in TRUNCATED_ARCHS:
            raise ValueError(f"{arch}: pretrain the full encoder (resnet50_attention_unet) and truncate it downstream")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.encoder = build_seg2d(arch, in_channels, 1, image_size, **arch_kwargs).encoder
        deepest = DEEPEST_CHANNELS[arch]
        if arch == "unet2d" and "channels" in arch_kwargs:  # a narrower U-Net (tests, small data)
            deepest = int(arch_kwargs["channels"][-1])
        self.classifier = nn.Linear(deepest, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = encoder_features(self.arch, self.encoder, x)
        return self.classifier(features.mean(dim=(2, 3)))
