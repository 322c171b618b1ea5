"""ResNet50 Attention U-Net of the thesis (SPEC section 7): ResNet50 encoder, U-Net decoder, attention-gated skips.

References: K. He et al., "Deep residual learning for image recognition", CVPR 2016 (ResNet50);
O. Oktay et al., "Attention U-Net: Learning where to look for the pancreas", MIDL 2018 (additive
attention gates); thesis section 2.1 ("ResNet50 Attention U-Net"), Table 2.1 and eq. (1.1).

Encoder (``encoder``): MONAI's ``monai.networks.nets.resnet50`` built 2D and configured to be
torchvision's ResNet50 (v1.5) layer for layer (:data:`RESNET50_KWARGS`): 7x7 stride-2 stem conv
(``conv1_t_size=7, conv1_t_stride=2``; MONAI's default stride 1 is the 3D MedicalNet variant),
batch norm, ReLU, 3x3 stride-2 max-pool, bottleneck stages ``[3, 4, 6, 3]`` (stride on the 3x3 conv),
projection shortcuts (``shortcut_type="B"``) whose 1x1 convs have no bias
(``bias_downsample=False``), no bias in any conv. ``feed_forward=False``: the ImageNet classifier
``fc`` is not built (its ``avgpool`` is parameter-free and never called), so ``encoder.*`` is the
backbone only, 23,508,032 parameters for RGB input (= torchvision ``resnet50`` without ``fc``), and its
parameter names are MONAI's (``encoder.conv1``, ``encoder.bn1``, ``encoder.layer1`` ..
``encoder.layer4``): the state dict of a MONAI ``resnet50`` classifier built with the same arguments
loads into ``encoder`` with only ``fc.weight`` / ``fc.bias`` left over. Thesis Table 2.4 gives 22.8 M
for its ResNet50 (this encoder is 3.1 % larger; the thesis does not say what it counted).

=============== =========================== ====================== ===================================
encoder level   modules                     feature                skip of decoder stage
=============== =========================== ====================== ===================================
1 (stem)        ``conv1``, ``bn1``, ReLU    (B, 64, H/2, W/2)      ``decoder.stages.3``
2               max-pool, ``layer1``        (B, 256, H/4, W/4)     ``decoder.stages.2``
3               ``layer2``                  (B, 512, H/8, W/8)     ``decoder.stages.1``
4               ``layer3``                  (B, 1024, H/16, W/16)  ``decoder.stages.0``
5 (bottleneck)  ``layer4``                  (B, 2048, H/32, W/32)  decoder input
=============== =========================== ====================== ===================================

Decoder (``decoder.stages.0..4``, :class:`AttentionUpBlock`), a five-level basic U-Net decoder of
256, 128, 64, 32, 16 channels (thesis): stage ``i`` up-samples by 2 with an up-conv (2x2 transposed
conv, stride 2, to the stage's channels), gates the encoder feature of that scale with an additive
attention gate whose gating signal is the up-sampled decoder signal (thesis Fig. 1.3: "x^up is the
signal coming from the previous up-block"), concatenates ``[gated skip, up]`` and applies two
3x3 conv - BN - ReLU. Stage outputs: ``(B, 256, H/16)``, ``(B, 128, H/8)``, ``(B, 64, H/4)``,
``(B, 32, H/2)``, ``(B, 16, H)``. The last stage has no skip (only 4 encoder levels lie above the
bottleneck, thesis: "the final decoder level did not receive a lateral skip connection").

Attention gate (Oktay et al. 2018; thesis eq. 1.1), MONAI ``monai.networks.nets.attentionunet.AttentionBlock``
unchanged: ``alpha = sigmoid(psi(ReLU(W_g g + W_x x)))``, output ``alpha * x`` (one coefficient in
(0, 1) per pixel, broadcast over the skip's channels); ``W_g``, ``W_x`` are 1x1 conv + BN to
``F_int = skip_channels // 2`` channels (Oktay's choice), ``psi`` is 1x1 conv + BN to one channel.
The gate works at the skip's resolution, with the up-sampled decoder signal as ``g`` (as MONAI's
``AttentionUnet`` and thesis Fig. 1.3); Oktay et al. instead compute ``alpha`` at the coarser
resolution of ``g`` (strided ``W_x``) and up-sample it (the thesis' sigma-hat in eq. 1.1).

Head (``head``): 1x1 conv ``16 -> out_channels``, logits at the input resolution ``(B, out, H, W)``.

Also reused from MONAI: ``UpSample(mode="deconv")`` (the up-conv) and ``basic_unet.TwoConv`` (the two
conv - BN - ReLU). Written here: :class:`AttentionUpBlock` (wiring) and the network.
Initialisation as thesis section 2.1 (:func:`medxfer.networks.unet2d.he_init_`: He normal fan-in
for every conv, encoder included; zero biases; batch norm 1 / 0).

Input sides must be multiples of 32 (5 stride-2 steps); ``forward`` raises ``ValueError`` otherwise.
Parameters (``in_channels=3``, ``out_channels=1``): encoder 23,508,032, decoder 7,829,788, head 17,
total 31,337,837.

TorchScript: ``torch.jit.script(net)`` (what ``monai.bundle ckpt_export`` runs) works and matches
eager, size check included (its message prints the shape as a list, which TorchScript can format).
"""

from __future__ import annotations

import torch
from torch import nn

from medxfer.networks.layout import ArchLayout
from medxfer.networks.unet2d import he_init_

__all__ = ["ARCH", "RESNET50_KWARGS", "RESNET50_CHANNELS", "DECODER_CHANNELS", "SIZE_DIVISOR",
           "build_resnet50_encoder", "AttentionUpBlock", "AttentionUNetDecoder", "ResNet50AttentionUNet", "resnet50_attention_unet_layout"]

#: Architecture name (``ArchLayout.arch``).
ARCH = "resnet50_attention_unet"
#: Arguments of ``monai.networks.nets.resnet50`` that make it torchvision's 2D ResNet50 (without ``fc``).
RESNET50_KWARGS = {"spatial_dims": 2, "conv1_t_size": 7, "conv1_t_stride": 2, "no_max_pool": False,
                   "shortcut_type": "B", "bias_downsample": False, "feed_forward": False}
#: Channels of the encoder features: stem (H/2), layer1 (H/4) .. layer4 (H/32).
RESNET50_CHANNELS = (64, 256, 512, 1024, 2048)
#: Channels of the decoder stages, deep -> shallow (thesis).
DECODER_CHANNELS = (256, 128, 64, 32, 16)
#: Input sides must be multiples of this.
SIZE_DIVISOR = 32

_ACT = ("relu", {"inplace": True})
_NORM = "batch"


def build_resnet50_encoder(in_channels: int = 3) -> nn.Module:
    """MONAI ``resnet50`` with :data:`RESNET50_KWARGS`: torchvision's ResNet50 backbone, 2D, no ``fc``.

    Random initialisation (MONAI's: kaiming normal fan-out, as torchvision); never downloads (MONAI's
    pretrained weights are 3D MedicalNet ones). ``(B, in_channels, H, W)``; call the parts
    (``conv1, bn1, act, maxpool, layer1..4``) for features, as :class:`ResNet50AttentionUNet` does.
    """
    from monai.networks.nets import resnet50

    return resnet50(pretrained=False, n_input_channels=in_channels, **RESNET50_KWARGS)


class AttentionUpBlock(nn.Module):
    """One decoder stage: ``(B, in, h, w)`` [+ skip ``(B, skip, 2h, 2w)``] -> ``(B, out, 2h, 2w)``.

    ``up`` (MONAI ``UpSample``, ``mode="deconv"``: 2x2 transposed conv, stride 2, ``in -> out``), then,
    with a skip, ``gate`` (MONAI ``AttentionBlock``, gating signal ``g = up(x)``, ``F_int = skip // 2``)
    and concatenation ``[gate(g, skip), up(x)]``, then ``convs`` (MONAI ``TwoConv``: two 3x3
    conv - BN - ReLU, ``out + skip -> out -> out``). ``skip_channels=0``: no gate, no concatenation.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bias: bool = False) -> None:
        super().__init__()
        from monai.networks.blocks import UpSample
        from monai.networks.nets.attentionunet import AttentionBlock
        from monai.networks.nets.basic_unet import TwoConv

        self.skip_channels = int(skip_channels)
        self.up = UpSample(2, in_channels, out_channels, scale_factor=2, mode="deconv")
        self.gate = (AttentionBlock(2, f_int=max(self.skip_channels // 2, 1), f_g=out_channels, f_l=self.skip_channels)
                     if self.skip_channels else None)
        self.convs = TwoConv(2, out_channels + self.skip_channels, out_channels, _ACT, _NORM, bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        up = self.up(x)
        if self.gate is not None:
            if skip is None:
                raise ValueError("AttentionUpBlock: this stage needs a skip feature map")
            up = torch.cat([self.gate(up, skip), up], dim=1)
        return self.convs(up)


class AttentionUNetDecoder(nn.Module):
    """The 5 decoder stages over the 5 ResNet50 features (shallow -> deep) -> ``(B, 16, H, W)``.

    ``stages[i]`` (:class:`AttentionUpBlock`) takes the previous output (``layer4`` for ``i = 0``),
    channels ``2048, 256, 128, 64, 32 -> 256, 128, 64, 32, 16``, with the gated skips ``layer3``,
    ``layer2``, ``layer1``, stem for ``i = 0..3`` and none for ``i = 4``.
    """

    def __init__(self, encoder_channels=RESNET50_CHANNELS, decoder_channels=DECODER_CHANNELS) -> None:
        super().__init__()
        enc, dec = tuple(encoder_channels), tuple(decoder_channels)
        ins = (enc[-1],) + dec[:-1]                     # 2048, 256, 128, 64, 32
        skips = enc[-2::-1] + (0,) * (len(dec) - len(enc) + 1)  # 1024, 512, 256, 64, none
        self.stages = nn.ModuleList(AttentionUpBlock(i, s, o) for i, s, o in zip(ins, skips, dec))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        n = len(features)
        y = features[n - 1]
        for i, stage in enumerate(self.stages):
            y = stage(y, features[n - 2 - i] if i < n - 1 else None)
        return y


class ResNet50AttentionUNet(nn.Module):
    """ResNet50 Attention U-Net (thesis section 2.1): ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``.

    ``H, W`` must be multiples of 32 (``ValueError`` otherwise). Submodules: ``encoder`` (MONAI
    ``resnet50``, :func:`build_resnet50_encoder`), ``decoder`` (:class:`AttentionUNetDecoder`;
    ``decoder.stages.0..4``, :class:`AttentionUpBlock`,
    256/128/64/32/16 channels at H/16 .. H), ``head`` (1x1 conv ``16 -> out_channels``). See the
    module docstring; :func:`resnet50_attention_unet_layout` gives the layout.

    Args:
        in_channels: image channels (default 3; the stem conv takes them).
        out_channels: logit maps (default 1).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.size_divisor = SIZE_DIVISOR
        self.encoder = build_resnet50_encoder(in_channels)
        self.decoder = AttentionUNetDecoder()
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], out_channels, kernel_size=1)
        he_init_(self)

    def encoder_parameters(self) -> int:
        """Number of parameters whose name starts with ``encoder.`` (the ResNet50 backbone, no ``fc``)."""
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith("encoder."))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The 5 encoder features (table in the module docstring): stem H/2 (64 ch) .. ``layer4`` H/32 (2048 ch)."""
        e = self.encoder
        stem = e.act(e.bn1(e.conv1(x)))
        f1 = e.layer1(e.maxpool(stem))
        f2 = e.layer2(f1)
        f3 = e.layer3(f2)
        return [stem, f1, f2, f3, e.layer4(f3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits."""
        if x.ndim != 4 or x.shape[-1] % self.size_divisor or x.shape[-2] % self.size_divisor:
            raise ValueError(f"ResNet50AttentionUNet: input {list(x.shape)} must be (B, C, H, W) with H and W "
                             f"multiples of {self.size_divisor}")
        return self.head(self.decoder(self.encode(x)))


def resnet50_attention_unet_layout(network: ResNet50AttentionUNet | None = None) -> ArchLayout:
    """:class:`~medxfer.networks.layout.ArchLayout` of :class:`ResNet50AttentionUNet` (``network`` is unused).

    Encoder levels: ``[encoder.conv1, encoder.bn1]`` (stem), ``encoder.layer1`` .. ``encoder.layer4``;
    decoder stages ``decoder.stages.0`` (H/16) .. ``decoder.stages.4`` (H); head ``head``; penultimate
    encoder level ``encoder.layer3`` (``(B, 1024, H/16, W/16)``).
    """
    del network
    levels = [["encoder.conv1", "encoder.bn1"]] + [[f"encoder.layer{k}"] for k in range(1, 5)]
    return ArchLayout(ARCH, levels, [f"decoder.stages.{i}" for i in range(5)], ["head"], "encoder.layer3")
