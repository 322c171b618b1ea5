"""Basic 2D U-Net of the thesis (SPEC section 7): Ronneberger et al. 2015 with batch norm, padding, a
3x3 stem and interpolating up-convolutions.

References: O. Ronneberger, P. Fischer, T. Brox, "U-Net: Convolutional networks for biomedical image
segmentation", MICCAI 2015; thesis section 1.1.1 (the up-convolution: "a bilinear interpolation
followed by a 2x2 convolution"), section 2.1 ("Basic U-Net") and Table 2.1; the authors' code
(aielte-research/MedSegPretrainImageNet, ``segmentation/models``) where the thesis is silent.

Architecture (defaults: ``channels=(64, 128, 256, 512, 1024)``, ``stem=True``,
``up_mode="bilinear"``; input ``(B, in_channels, H, W)``):

========================= ============================================= ==================
module                    operation                                     output
========================= ============================================= ==================
``encoder.stem``          3x3 conv ``in_channels -> 64`` (with bias;    (B, 64, H, W)
                          no norm / activation, as the authors' code)
``encoder.levels.0``      2 x (3x3 conv - BN - ReLU) 64 -> 64           (B, 64, H, W)
``encoder.levels.1``      2x2 max-pool, 2 x (3x3 conv - BN - ReLU)      (B, 128, H/2, W/2)
``encoder.levels.2``      same                                          (B, 256, H/4, W/4)
``encoder.levels.3``      same                                          (B, 512, H/8, W/8)
``encoder.levels.4``      same (the bottleneck, deepest level)          (B, 1024, H/16, W/16)
``decoder.stages.0``      up-conv 1024 -> 512 (``up``: x2 interpolation (B, 512, H/8, W/8)
                          - 2x2 conv - ReLU), concat ``[up, skip]``,
                          2 x (3x3 conv - BN - ReLU) 1024 -> 512
``decoder.stages.1..3``   same, down to 64 channels                     ... (B, 64, H, W)
``head``                  1x1 conv 64 -> ``out_channels`` (logits)      (B, out, H, W)
========================= ============================================= ==================

Parameters (defaults, ``in_channels=3``, ``out_channels=1``): encoder 18,884,096, decoder 12,190,400,
head 65, total 31,074,561. The encoder (``encoder.*``, stem and bottleneck included) is 5.1 % below the
19.9 M of thesis Table 2.4 for the "U-Net encoder": the thesis most likely counted the ImageNet
classification head it pretrained with (section 2.2.2: pooling + one dense layer 1024 -> 1000 =
1.03 M; 18.88 M + 1.03 M = 19.91 M) and the conv biases of the authors' code (3,968 parameters).

The up-convolution (:class:`InterpUpCat`, written here: MONAI's ``UpSample`` puts its convolution
*before* a non-trainable interpolation, and ``UpCat`` concatenates ``[skip, up]``): ``nn.Upsample``
(scale 2, ``up_mode``), a 2x2 ``nn.Conv2d`` with bias and "same" padding (one zero row / column at
the bottom / right, what PyTorch's ``padding="same"`` of the authors' code does for an even kernel), ReLU; then ``torch.cat([up, skip])`` and MONAI
``basic_unet.TwoConv``. The up-conv maps to the channels of the next level (half of the input for
the doubling channel lists, as the authors' ``channel_decrease_ratio=0.5``).

Choices where the thesis is silent, from the authors' code: the stem is a bare conv (no BN / ReLU);
the up-conv is followed by a ReLU and has no batch norm; concatenation order ``[up, skip]``.

Remaining deviations (each a reasoned choice, not an accident):

* ``up_mode="bilinear"`` follows the thesis text (section 1.1.1); the authors' code runs
  ``nn.Upsample(scale_factor=2)``, i.e. nearest-neighbour: ``up_mode="nearest"`` gives that.
* No bias in the 3x3 convs before batch norm (``bias=False``; the authors' ``ConvBlock`` keeps them):
  a bias followed by batch norm is cancelled by the mean subtraction, so outputs and gradients of
  every other parameter are the same; ``bias=True`` builds the authors' parameter set.
* ``up_mode="deconv"``, ``stem=False`` is medxfer's earlier U-Net (2x2 transposed-conv up steps,
  MONAI ``UpCat`` with ``[skip, up]``, first level ``in_channels -> 64``), kept for its model-bank
  entries: the same state dict as before (``decoder.stages.i.upsample.deconv.*``). ``up_mode="deconv"``
  with the stem is also allowed.

Batch norm after every conv and padded convs (output size = input size) as in the thesis.
Initialisation as thesis section 2.1: He normal (fan-in, gain 2) for conv weights, zero biases,
batch norm weight 1 / bias 0.

Input sides must be multiples of ``2 ** (len(channels) - 1)`` (16 for 5 levels); ``forward``
raises ``ValueError`` otherwise.

TorchScript: ``torch.jit.script(net)`` (what ``monai.bundle ckpt_export`` runs) works and matches
eager for every ``up_mode``; the size check stays in the scripted network (its message prints the
shape as a list, which TorchScript can format).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from medxfer.networks.layout import ArchLayout

__all__ = ["ARCH", "UNET2D_CHANNELS", "UP_MODES", "UNet2D", "UNet2DEncoder", "UNet2DDecoder", "InterpUpCat",
           "up_conv", "unet2d_layout", "he_init_"]

#: Architecture name (``ArchLayout.arch``).
ARCH = "unet2d"
#: Channels of the 5 levels (Ronneberger et al. 2015).
UNET2D_CHANNELS = (64, 128, 256, 512, 1024)
#: Up-step kinds: x2 interpolation (``nn.Upsample`` mode) + 2x2 conv + ReLU, or a 2x2 transposed conv.
UP_MODES = ("bilinear", "nearest", "deconv")

_ACT = ("relu", {"inplace": True})
_NORM = "batch"


def _check_up_mode(up_mode: str, owner: str) -> str:
    if up_mode not in UP_MODES:
        raise ValueError(f"{owner}: up_mode must be one of {list(UP_MODES)}, got {up_mode!r}")
    return up_mode


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


def up_conv(in_channels: int, out_channels: int, mode: str = "bilinear") -> nn.Sequential:
    """The thesis' up-convolution ``(B, in, h, w) -> (B, out, 2h, 2w)``: ``nn.Upsample(scale_factor=2,
    mode)``, ``nn.ZeroPad2d((0, 1, 0, 1))`` and a 2x2 ``nn.Conv2d`` with bias (together: the authors'
    ``padding="same"`` conv), ReLU (as the authors' ``UpConvBlock``). Indices: ``0`` upsample, ``2`` conv."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"up_conv: mode must be 'bilinear' or 'nearest', got {mode!r}")
    upsample = nn.Upsample(scale_factor=2.0, mode=mode) if mode == "nearest" else \
        nn.Upsample(scale_factor=2.0, mode=mode, align_corners=False)
    # "same" padding of a 2x2 conv written out (one zero row / column at the bottom / right, what
    # ``padding="same"`` does, without its warning about the padded copy)
    return nn.Sequential(upsample, nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(in_channels, out_channels, kernel_size=2),
                         nn.ReLU(inplace=True))


class InterpUpCat(nn.Module):
    """Decoder stage with an interpolating up-conv: ``(B, in, h, w)``, skip ``(B, skip, 2h, 2w)`` ->
    ``(B, out, 2h, 2w)``.

    ``up`` (:func:`up_conv`, ``in -> out``), concatenation ``[up(x), skip]`` (``out + skip`` channels),
    ``convs`` (MONAI ``TwoConv``: two 3x3 conv - BN - ReLU ``out + skip -> out -> out``).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, mode: str = "bilinear",
                 bias: bool = False) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import TwoConv

        self.up = up_conv(in_channels, out_channels, mode)
        self.convs = TwoConv(2, out_channels + skip_channels, out_channels, _ACT, _NORM, bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class UNet2DEncoder(nn.Module):
    """U-Net encoder: ``(B, in_channels, H, W)`` -> list of ``len(channels)`` feature maps.

    ``stem`` (with ``stem=True``): 3x3 conv ``in_channels -> channels[0]`` with bias. Feature ``k``
    (0-based) is ``(B, channels[k], H / 2**k, W / 2**k)``, the output of ``levels[k]``: ``levels[0]`` is
    MONAI ``TwoConv``, ``levels[k>0]`` MONAI ``Down`` (2x2 max-pool then ``TwoConv``). The last feature is
    the bottleneck. The stem output is not a feature (no skip leaves it).
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = UNET2D_CHANNELS, bias: bool = False,
                 stem: bool = True) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import Down, TwoConv

        chans = [int(c) for c in channels]
        self.stem = nn.Conv2d(in_channels, chans[0], kernel_size=3, padding=1) if stem else nn.Identity()
        first_in = chans[0] if stem else in_channels
        self.levels = nn.ModuleList([TwoConv(2, first_in, chans[0], _ACT, _NORM, bias)])
        for cin, cout in zip(chans[:-1], chans[1:]):
            self.levels.append(Down(2, cin, cout, _ACT, _NORM, bias))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class UNet2DDecoder(nn.Module):
    """U-Net decoder: encoder features (shallow -> deep) -> ``(B, channels[0], H, W)``.

    ``stages[i]`` maps ``(B, channels[n-1-i], h, w)`` and the encoder feature of the next scale to
    ``(B, channels[n-2-i], 2h, 2w)``: :class:`InterpUpCat` for ``up_mode`` ``"bilinear"`` / ``"nearest"``
    (up-conv, ``[up, skip]``, two 3x3 conv - BN - ReLU); MONAI ``UpCat`` (``upsample="deconv"``: 2x2
    transposed conv, stride 2, channels halved; ``[skip, up]``; two 3x3 conv - BN - ReLU) for
    ``"deconv"``. Stage outputs are the decoder feature maps, deepest first.
    """

    def __init__(self, channels: Sequence[int] = UNET2D_CHANNELS, bias: bool = False,
                 up_mode: str = "bilinear") -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import UpCat

        up_mode = _check_up_mode(up_mode, "UNet2DDecoder")
        deep_first = [int(c) for c in channels][::-1]  # 1024, 512, 256, 128, 64
        pairs = list(zip(deep_first[:-1], deep_first[1:]))
        if up_mode == "deconv":
            self.stages = nn.ModuleList(UpCat(2, cin, cout, cout, _ACT, _NORM, bias, upsample="deconv", halves=True)
                                        for cin, cout in pairs)
        else:
            self.stages = nn.ModuleList(InterpUpCat(cin, cout, cout, up_mode, bias) for cin, cout in pairs)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        n = len(features)
        x = features[n - 1]
        for i, stage in enumerate(self.stages):
            x = stage(x, features[n - 2 - i])
        return x


class UNet2D(nn.Module):
    """Basic 2D U-Net of the thesis (3x3 stem, batch norm, padded convs, interpolating up-convs).

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits; ``H, W`` multiples of
    ``2 ** (len(channels) - 1)`` (16 by default), ``ValueError`` otherwise.

    Submodules: ``encoder`` (:class:`UNet2DEncoder`: ``stem``, levels incl. the bottleneck), ``decoder``
    (:class:`UNet2DDecoder`), ``head`` (1x1 conv ``channels[0] -> out_channels``, with bias). See the
    module docstring for the table of shapes, the choices and deviations; :func:`unet2d_layout` gives
    the :class:`~medxfer.networks.layout.ArchLayout`.

    Args:
        in_channels: image channels (default 3). out_channels: logit maps (default 1).
        channels: channels per level, shallow -> deep, at least 2 (default 64 .. 1024).
        bias: bias in the 3x3 convs (default ``False``: each is followed by batch norm); the stem and the
            up convs always have theirs.
        up_mode: ``"bilinear"`` (default, thesis), ``"nearest"`` (the authors' code) or ``"deconv"``
            (2x2 transposed conv, medxfer's earlier U-Net).
        stem: the 3x3 stem conv (default ``True``, thesis); ``False`` with ``up_mode="deconv"`` is
            medxfer's earlier U-Net.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, channels: Sequence[int] = UNET2D_CHANNELS,
                 bias: bool = False, up_mode: str = "bilinear", stem: bool = True) -> None:
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        if len(self.channels) < 2:
            raise ValueError(f"UNet2D needs at least 2 levels, got channels={self.channels}")
        self.up_mode = _check_up_mode(up_mode, "UNet2D")
        self.has_stem = bool(stem)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.size_divisor = 2 ** (len(self.channels) - 1)
        self.encoder = UNet2DEncoder(in_channels, self.channels, bias, self.has_stem)
        self.decoder = UNet2DDecoder(self.channels, bias, self.up_mode)
        self.head = nn.Conv2d(self.channels[0], out_channels, kernel_size=1)
        he_init_(self)

    def encoder_parameters(self) -> int:
        """Number of parameters whose name starts with ``encoder.`` (stem, levels incl. the bottleneck)."""
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith("encoder."))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits."""
        if x.ndim != 4 or x.shape[-1] % self.size_divisor or x.shape[-2] % self.size_divisor:
            raise ValueError(f"UNet2D: input {list(x.shape)} must be (B, C, H, W) with H and W multiples of "
                             f"{self.size_divisor}")
        return self.head(self.decoder(self.encoder(x)))


def unet2d_layout(network: UNet2D | None = None) -> ArchLayout:
    """:class:`~medxfer.networks.layout.ArchLayout` of :class:`UNet2D` (``network`` gives the depth and
    whether there is a stem; 5 levels with a stem otherwise).

    Encoder level 1 = ``encoder.stem`` + ``encoder.levels.0``, level ``k`` = ``encoder.levels.{k-1}`` (the
    last is the bottleneck); decoder stages ``decoder.stages.0`` (H/8) .. ``decoder.stages.3`` (H); head
    ``head``; penultimate encoder level ``encoder.levels.3`` (``(B, 512, H/8, W/8)``).
    """
    n = len(network.channels) if network is not None else len(UNET2D_CHANNELS)
    stem = network.has_stem if network is not None else True
    levels = [[f"encoder.levels.{k}"] for k in range(n)]
    if stem:
        levels[0] = ["encoder.stem"] + levels[0]
    return ArchLayout(ARCH, levels, [f"decoder.stages.{i}" for i in range(n - 1)], ["head"], f"encoder.levels.{n - 2}")
