"""Networks: every segmentation network by name (:mod:`medxfer.networks.registry`: MONAI UNet /
UNETR / SwinUNETR, the TATL EfficientNet-b0 U and Link shapes, the thesis' 2D networks, truncated
ResNet50 / DenseNet121), with the layout transfer learning and feature extraction read
(:class:`~medxfer.networks.layout.ArchLayout`). No file is read here: weights are loaded by
:mod:`medxfer.transfer.weights`."""

from medxfer.networks.layout import ArchLayout
from medxfer.networks.registry import (REGISTRY, NetworkSpec, arch_layout, build_network, fit_patch, network_spec,
                                       register, registered, size_divisor)

__all__ = ["ArchLayout", "REGISTRY", "NetworkSpec", "arch_layout", "build_network", "fit_patch", "network_spec",
           "register", "registered", "size_divisor"]
