"""Networks: every segmentation network by name (:mod:`medxfer.networks.registry`: MONAI UNet /
UNETR / SwinUNETR / SegResNet / DynUNet / BasicUNet / FlexibleUNet, nnU-Net v2's plans networks, any
``network_def`` of a MONAI bundle, the TATL EfficientNet-b0 U and Link shapes, the thesis' 2D
networks, truncated ResNet50 / DenseNet121), with the layout transfer learning and feature
extraction read (:class:`~medxfer.networks.layout.ArchLayout`; read from a mapping, checked against
a network, or found automatically by :func:`~medxfer.networks.auto_layout.auto_layout`). No file is
read here: weights are loaded by :mod:`medxfer.transfer.weights`."""

from medxfer.networks.auto_layout import auto_layout
from medxfer.networks.layout import ArchLayout, LayoutError, check_layout, layout_from_dict
from medxfer.networks.registry import (REGISTRY, NetworkSpec, arch_layout, build_network, fit_patch, network_spec,
                                       register, registered, size_divisor)

__all__ = ["ArchLayout", "LayoutError", "REGISTRY", "NetworkSpec", "arch_layout", "auto_layout", "build_network",
           "check_layout", "fit_patch", "layout_from_dict", "network_spec", "register", "registered", "size_divisor"]
