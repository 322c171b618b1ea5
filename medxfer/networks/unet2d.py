"""Basic 2D U-Net of the thesis (SPEC section 7): Ronneberger et al. 2015 with batch norm and padding.

Reference: O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional networks for biomedical image
segmentation", MICCAI 2015; as described in thesis section 2.1 ("Basic U-Net") and Table 2.1.

Architecture (``channels=(64, 128, 256, 512, 1024)``, input ``(B, in_channels, H, W)``):

========================= ============================================= ==================
module                    operation                                     output
========================= ============================================= ==================
``encoder.levels.0``      2 x (3x3 conv - BN - ReLU)                    (B, 64, H, W)
``encoder.levels.1``      2x2 max-pool, 2 x (3x3 conv - BN - ReLU)      (B, 128, H/2, W/2)
``encoder.levels.2``      same                                          (B, 256, H/4, W/4)
``encoder.levels.3``      same                                          (B, 512, H/8, W/8)
``encoder.levels.4``      same (the bottleneck, deepest level)          (B, 1024, H/16, W/16)
``decoder.stages.0``      2x2 up-conv 1024->512, concat skip (512),     (B, 512, H/8, W/8)
                          2 x (3x3 conv - BN - ReLU) 1024->512
``decoder.stages.1..3``   same, down to 64 channels                     ... (B, 64, H, W)
``head``                  1x1 conv 64 -> ``out_channels`` (logits)      (B, out, H, W)
========================= ============================================= ==================

Parameters (``in_channels=3``, ``out_channels=1``): encoder 18,847,168, decoder 12,190,400, head 65,
total 31,037,633.

The encoder (``encoder.*``, bottleneck included) has 18.85 M parameters, 5.3 % below the 19.9 M of
thesis Table 2.4 for the "U-Net encoder". The difference is most likely the ImageNet classification
head the thesis pretrained the encoder with (section 2.2.2: spatial pooling + one dense layer,
1024 -> 1000 = 1.03 M parameters; 18.85 M + 1.03 M = 19.87 M); it is not part of this network.

Reused from MONAI, unchanged (``monai.networks.nets.basic_unet``): ``TwoConv`` (two MONAI
``Convolution`` blocks, conv -> norm -> act, padding 1) for ``encoder.levels.0``; ``Down``
(max-pool 2 + ``TwoConv``) for the deeper levels; ``UpCat`` (``UpSample(mode="deconv")``: a 2x2
transposed conv of stride 2 that halves the channels, then concatenation ``[skip, up]`` and
``TwoConv``) for the decoder stages. Only the wiring and the 1x1 head are written here.

Deviations from the 2015 paper, as in the thesis: padded convolutions (no cropping of the skips;
output size = input size), batch norm after every conv (conv bias dropped: it is redundant before
batch norm). Initialisation as thesis section 2.1: He normal (fan-in, gain 2) for conv weights,
zero biases, batch norm weight 1 / bias 0.

Input sides must be multiples of ``2 ** (len(channels) - 1)`` (16 for 5 levels); ``forward``
raises ``ValueError`` otherwise.

TorchScript: ``torch.jit.script(net)`` (what ``monai.bundle ckpt_export`` runs) works and matches
eager; the size check stays in the scripted network (its message prints the shape as a list, which
TorchScript can format).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medxfer.networks.layout import ArchLayout

__all__ = ["ARCH", "UNET2D_CHANNELS", "UNet2D", "UNet2DEncoder", "UNet2DDecoder", "unet2d_layout", "he_init_"]

#: Architecture name (``ArchLayout.arch``).
ARCH = "unet2d"
#: Channels of the 5 levels (Ronneberger et al. 2015).
UNET2D_CHANNELS = (64, 128, 256, 512, 1024)

_ACT = ("relu", {"inplace": True})
_NORM = "batch"


def he_init_(module: nn.Module) -> nn.Module:
    """Thesis initialisation (section 2.1) in place: conv / transposed-conv weights ``N(0, 2/fan_in)``
    (He et al. 2015), conv biases 0, batch-norm weight 1 and bias 0. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                          nn.ConvTranspose3d)):
            # for transposed convs PyTorch's "fan_in" is weight.size(1) * kernel = output channels x kernel:
            # the number of inputs that feed one output pixel of the equivalent (adjoint) conv
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class UNet2DEncoder(nn.Module):
    """U-Net encoder: ``(B, in_channels, H, W)`` -> list of ``len(channels)`` feature maps.

    Feature ``k`` (0-based) is ``(B, channels[k], H / 2**k, W / 2**k)``, the output of
    ``levels[k]``: ``levels[0]`` is MONAI ``TwoConv``, ``levels[k>0]`` MONAI ``Down`` (2x2 max-pool then
    ``TwoConv``). The last feature is the bottleneck.
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = UNET2D_CHANNELS, bias: bool = False) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import Down, TwoConv

        chans = [int(c) for c in channels]
        self.levels = nn.ModuleList([TwoConv(2, in_channels, chans[0], _ACT, _NORM, bias)])
        for cin, cout in zip(chans[:-1], chans[1:]):
            self.levels.append(Down(2, cin, cout, _ACT, _NORM, bias))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class UNet2DDecoder(nn.Module):
    """U-Net decoder: encoder features (shallow -> deep) -> ``(B, channels[0], H, W)``.

    ``stages[i]`` (MONAI ``UpCat``, ``upsample="deconv"``) maps ``(B, channels[n-1-i], h, w)`` to
    ``(B, channels[n-2-i], 2h, 2w)``: 2x2 transposed conv (stride 2, channels halved), concatenation
    with the encoder feature of that scale (``[skip, up]``, ``2 * channels[n-2-i]`` channels), then
    two 3x3 conv - BN - ReLU. Stage outputs are the decoder feature maps, deepest first.
    """

    def __init__(self, channels: Sequence[int] = UNET2D_CHANNELS, bias: bool = False) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import UpCat

        deep_first = [int(c) for c in channels][::-1]  # 1024, 512, 256, 128, 64
        self.stages = nn.ModuleList(
            UpCat(2, cin, cout, cout, _ACT, _NORM, bias, upsample="deconv", halves=True)
            for cin, cout in zip(deep_first[:-1], deep_first[1:]))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        n = len(features)
        x = features[n - 1]
        for i, stage in enumerate(self.stages):
            x = stage(x, features[n - 2 - i])
        return x


class UNet2D(nn.Module):
    """Basic 2D U-Net (Ronneberger et al. 2015, batch norm, padded convs; thesis "Basic U-Net").

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits; ``H, W`` multiples of
    ``2 ** (len(channels) - 1)`` (16 by default), ``ValueError`` otherwise.

    Submodules: ``encoder`` (:class:`UNet2DEncoder`, levels incl. the bottleneck), ``decoder``
    (:class:`UNet2DDecoder`), ``head`` (1x1 conv ``channels[0] -> out_channels``, with bias). See
    the module docstring for the table of shapes and what comes from MONAI; :func:`unet2d_layout`
    gives the :class:`~medxfer.networks.layout.ArchLayout`.

    Args:
        in_channels: image channels (default 3). out_channels: logit maps (default 1).
        channels: channels per level, shallow -> deep, at least 2 (default 64 .. 1024).
        bias: bias in the 3x3 / up convs (default ``False``: each is followed by batch norm; the up
            convs of MONAI's ``UpSample`` always keep theirs).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, channels: Sequence[int] = UNET2D_CHANNELS,
                 bias: bool = False) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        if len(self.channels) < 2:
            raise ValueError(f"UNet2D needs at least 2 levels, got channels={self.channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.size_divisor = 2 ** (len(self.channels) - 1)
        self.encoder = UNet2DEncoder(in_channels, self.channels, bias)
        self.decoder = UNet2DDecoder(self.channels, bias)
        self.head = nn.Conv2d(self.channels[0], out_channels, kernel_size=1)
        he_init_(self)

    def encoder_parameters(self) -> int:
        """Number of parameters whose name starts with ``encoder.`` (levels incl. the bottleneck)."""
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith("encoder."))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits."""
        if x.ndim != 4 or x.shape[-1] % self.size_divisor or x.shape[-2] % self.size_divisor:
            raise ValueError(f"UNet2D: input {list(x.shape)} must be (B, C, H, W) with H and W multiples of "
                             f"{self.size_divisor}")
        return self.head(self.decoder(self.encoder(x)))


def unet2d_layout(network: UNet2D | None = None) -> ArchLayout:
    """:class:`~medxfer.networks.layout.ArchLayout` of :class:`UNet2D` (``network`` gives the depth; 5 levels
    otherwise).

    Encoder level ``k`` = ``encoder.levels.{k-1}`` (the last is the bottleneck); decoder stages
    ``decoder.stages.0`` (H/8) .. ``decoder.stages.3`` (H); head ``head``; penultimate encoder level
    ``encoder.levels.3`` (``(B, 512, H/8, W/8)``).
    """
    n = len(network.channels) if network is not None else len(UNET2D_CHANNELS)
    levels = [[f"encoder.levels.{k}"] for k in range(n)]
    return ArchLayout(ARCH, levels, [f"decoder.stages.{i}" for i in range(n - 1)], ["head"], f"encoder.levels.{n - 2}")
