"""Networks: MONAI 3D segmentation networks behind one factory, with their layout (encoder levels,
decoder stages, head) described for transfer learning and feature extraction; the 2D
EfficientNet-b0 U-shape (MONAI FlexibleUNet) and Link-shape networks of TATL."""

from medxfer.networks.effnet_unet import (EFFB0_ARCHS, ENCODER_PREFIX, EncoderWeightsReport, effb0_layout,
                                          load_encoder_weights, parameter_counts, unet_effb0)
from medxfer.networks.factory import ARCHS, ArchLayout, arch_layout, build_network
from medxfer.networks.linknet import LinkNetEffB0

__all__ = ["ARCHS", "ArchLayout", "arch_layout", "build_network", "EFFB0_ARCHS", "ENCODER_PREFIX",
           "EncoderWeightsReport", "effb0_layout", "load_encoder_weights", "parameter_counts", "unet_effb0",
           "LinkNetEffB0"]
