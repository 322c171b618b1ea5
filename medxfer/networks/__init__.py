"""Networks: MONAI 3D segmentation networks behind one factory, with their layout (encoder levels,
decoder stages, head) described for transfer learning and feature extraction."""

from medxfer.networks.factory import ARCHS, ArchLayout, arch_layout, build_network

__all__ = ["ARCHS", "ArchLayout", "arch_layout", "build_network"]
