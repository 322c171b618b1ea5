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
256, 128, 64, 32, 16 channels (thesis). Defaults (``gate="coarse"``, ``up_mode="bilinear"``): stage ``i``
takes the previous output ``x`` (``layer4`` for ``i = 0``), up-samples it with the thesis'
up-convolution (:func:`medxfer.networks.unet2d.up_conv`: x2 interpolation, 2x2 conv, ReLU) to half its
channels (2048 -> 1024, 256 -> 128, 128 -> 64, 64 -> 32, 32 -> 16: the authors' ``channel_decrease_ratio``
0.5), gates the encoder feature of that scale with :class:`CoarseAttentionGate` (gating signal ``x``,
at ``x``'s resolution), concatenates ``[up, gated skip]`` (the authors' order) and applies two
3x3 conv - BN - ReLU to the stage's channels. Stage outputs: ``(B, 256, H/16)``, ``(B, 128, H/8)``,
``(B, 64, H/4)``, ``(B, 32, H/2)``, ``(B, 16, H)``. The last stage has no skip (only 4 encoder levels
lie above the bottleneck, thesis: "the final decoder level did not receive a lateral skip connection").

Attention gate (thesis eq. 1.1, ``alpha(Q, K, V) = sigma_hat(Psi(phi(Q + K))) * V``, written here as
:class:`CoarseAttentionGate`: MONAI's ``AttentionBlock`` works at the skip's resolution): ``V`` is the
skip ``x_s`` ``(B, C_s, 2h, 2w)``; ``K = BN(W_K x_s)`` with ``W_K`` a 2x2 conv of stride 2 (the
"1x1 convolution and downsampling" of the thesis, done as one strided conv as in the authors' code and
Oktay et al.); ``Q = BN(W_Q(gating(g)))`` from the coarse decoder signal ``g = x`` ``(B, C_g, h, w)``,
``W_Q`` 1x1; ``phi`` = ReLU, ``Psi`` = 1x1 conv + BN; ``sigma_hat`` = sigmoid at ``(h, w)`` followed by
nearest x2 up-sampling; output ``alpha * x_s``. Choices where the thesis is silent, from the authors'
``AttentionBlock``: a "gating signal" block ``gating`` (1x1 conv - BN - ReLU, ``C_g -> C_g``) before
``W_Q``; BN after ``W_Q``, ``W_K`` and ``Psi``; ``F_int = C_g`` intermediate channels; ``Psi`` has
``C_s`` outputs (one coefficient per skip channel and coarse pixel, ``coefficients="channel"``;
``coefficients="pixel"`` gives Oktay's single coefficient per pixel); nearest up-sampling
(``nn.Upsample(scale_factor=2)``).

``gate="skip"``, ``up_mode="deconv"`` is medxfer's earlier decoder, kept for its model-bank entries
(same state dict as before): a 2x2 transposed conv to the stage's channels (MONAI ``UpSample``), MONAI
``monai.networks.nets.attentionunet.AttentionBlock`` at the skip's resolution with the up-sampled signal
as ``g`` (one coefficient per pixel, ``F_int = C_s // 2``), ``[gated skip, up]``. In general
``up_mode`` picks the up step (``"bilinear"`` thesis text, ``"nearest"`` the authors' ``nn.Upsample``
default; both halve the channels; ``"deconv"`` maps to the stage's channels) and ``gate`` the gate
(``"coarse"``: :class:`CoarseAttentionGate` on ``x``, ``[up, gated]``; ``"skip"``: MONAI's on ``up(x)``,
``[gated, up]``).

Head (``head``): 1x1 conv ``16 -> out_channels``, logits at the input resolution ``(B, out, H, W)``.

Remaining deviations from the thesis / the authors' code, kept on purpose:

* ``up_mode="bilinear"`` (thesis section 1.1.1) where the authors' code up-samples nearest-neighbour
  (``up_mode="nearest"``).
* The ResNet50 is torchvision's (projection shortcuts, ``shortcut_type="B"``) so that torchvision /
  MONAI ImageNet weights and state dicts load; the authors' ``DeepResNet`` uses parameter-free
  shortcuts (1x1 average pool of stride 2 and zero-filled channels, MONAI's ``shortcut_type="A"``) and
  has a max-pool padding of 1 (as here).
* No stochastic depth in the ResNet50 (thesis: rate 0.1 in pretraining; the authors' downstream configs
  also set 0.1): MONAI's ``ResNetBottleneck`` has no drop-path; adding it would need a second
  bottleneck class. The Swin U-Net has it (``drop_path_rate``).

Reused from MONAI: ``basic_unet.TwoConv`` (the two conv - BN - ReLU) and, for ``up_mode="deconv"`` /
``gate="skip"``, ``UpSample(mode="deconv")`` and ``AttentionBlock``. Written here:
:class:`CoarseAttentionGate`, :class:`AttentionUpBlock` (wiring) and the network.
Initialisation as thesis section 2.1 (:func:`medxfer.networks.unet2d.he_init_`: He normal fan-in
for every conv, encoder and gates included; zero biases; batch norm 1 / 0).

Input sides must be multiples of 32 (5 stride-2 steps); ``forward`` raises ``ValueError`` otherwise.
Parameters (``in_channels=3``, ``out_channels=1``): encoder 23,508,032, decoder 34,935,856, head 17,
total 58,443,905 (the thesis gives no decoder size; most of it is stage 0 as in the authors' code:
2048 -> 1024 up-conv 8.4 M, gate 18.9 M). Earlier decoder (``up_mode="deconv", gate="skip"``):
7,829,788, total 31,337,837.

TorchScript: ``torch.jit.script(net)`` (what ``monai.bundle ckpt_export`` runs) works and matches
eager, size check included (its message prints the shape as a list, which TorchScript can format).
"""

from __future__ import annotations

import torch
from torch import nn

from medxfer.networks.layout import ArchLayout
from medxfer.networks.unet2d import UP_MODES, he_init_, up_conv

__all__ = ["ARCH", "RESNET50_KWARGS", "RESNET50_CHANNELS", "DECODER_CHANNELS", "SIZE_DIVISOR", "GATES",
           "build_resnet50_encoder", "CoarseAttentionGate", "AttentionUpBlock", "AttentionUNetDecoder",
           "ResNet50AttentionUNet", "resnet50_attention_unet_layout"]

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
#: Attention gates: thesis eq. 1.1 at the coarse resolution, or MONAI's at the skip's resolution.
GATES = ("coarse", "skip")

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


def _conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride), nn.BatchNorm2d(cout))


class CoarseAttentionGate(nn.Module):
    """Additive attention gate of thesis eq. 1.1, computed at the gating signal's (coarse) resolution.

    ``forward(g, skip)``: ``g`` ``(B, C_g, h, w)`` (the decoder signal before up-sampling), ``skip``
    ``(B, C_s, 2h, 2w)`` -> ``alpha * skip`` ``(B, C_s, 2h, 2w)`` with
    ``alpha = up2(sigmoid(psi(relu(w_q(gating(g)) + w_k(skip)))))``:

    * ``gating``: 1x1 conv ``C_g -> C_g`` - BN - ReLU (the authors' gating-signal block);
    * ``w_q``: 1x1 conv ``C_g -> F_int`` - BN (``Q``); ``w_k``: 2x2 conv of stride 2 ``C_s -> F_int`` - BN (``K``);
    * ``psi``: 1x1 conv ``F_int -> C_s`` (``coefficients="channel"``, the authors') or ``-> 1``
      (``"pixel"``, Oktay et al.) - BN; sigmoid; ``upsample``: nearest x2 (``sigma_hat``).

    ``inter_channels`` (``F_int``) defaults to ``C_g`` (the authors'). Written by hand: no MONAI block
    computes the gate at the coarse resolution.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int | None = None,
                 coefficients: str = "channel") -> None:
        super().__init__()
        if coefficients not in ("channel", "pixel"):
            raise ValueError(f"CoarseAttentionGate: coefficients must be 'channel' or 'pixel', got {coefficients!r}")
        cg, cs = int(gate_channels), int(skip_channels)
        ci = int(inter_channels) if inter_channels is not None else cg
        self.gating = nn.Sequential(nn.Conv2d(cg, cg, kernel_size=1), nn.BatchNorm2d(cg), nn.ReLU(inplace=True))
        self.w_q = _conv_bn(cg, ci)
        self.w_k = _conv_bn(cs, ci, kernel=2, stride=2)
        self.psi = _conv_bn(ci, cs if coefficients == "channel" else 1)
        self.upsample = nn.Upsample(scale_factor=2.0, mode="nearest")

    def coefficients(self, g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``alpha`` at the skip's resolution: ``(B, C_s or 1, 2h, 2w)``, values in (0, 1)."""
        q = self.w_q(self.gating(g))
        k = self.w_k(skip)
        return self.upsample(torch.sigmoid(self.psi(torch.relu(q + k))))

    def forward(self, g: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if skip.shape[-2] != 2 * g.shape[-2] or skip.shape[-1] != 2 * g.shape[-1]:
            raise ValueError(f"CoarseAttentionGate: skip {list(skip.shape)} must be twice the size of the gating "
                             f"signal {list(g.shape)}")
        return self.coefficients(g, skip) * skip


class AttentionUpBlock(nn.Module):
    """One decoder stage: ``(B, in, h, w)`` [+ skip ``(B, skip, 2h, 2w)``] -> ``(B, out, 2h, 2w)``.

    ``up``: :func:`~medxfer.networks.unet2d.up_conv` ``in -> in // 2`` (``up_mode`` ``"bilinear"`` /
    ``"nearest"``) or MONAI ``UpSample(mode="deconv")`` ``in -> out`` (``"deconv"``). With a skip, ``gate``:
    :class:`CoarseAttentionGate` on ``(x, skip)`` and ``[up(x), gated]`` (``gate="coarse"``), or MONAI
    ``AttentionBlock`` on ``(up(x), skip)`` (``F_int = skip // 2``) and ``[gated, up(x)]`` (``"skip"``).
    Then ``convs`` (MONAI ``TwoConv``: two 3x3 conv - BN - ReLU to ``out``). ``skip_channels=0``: no gate,
    no concatenation.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bias: bool = False,
                 up_mode: str = "bilinear", gate: str = "coarse") -> None:
        super().__init__()
        from monai.networks.blocks import UpSample
        from monai.networks.nets.attentionunet import AttentionBlock
        from monai.networks.nets.basic_unet import TwoConv

        if up_mode not in UP_MODES:
            raise ValueError(f"AttentionUpBlock: up_mode must be one of {list(UP_MODES)}, got {up_mode!r}")
        if gate not in GATES:
            raise ValueError(f"AttentionUpBlock: gate must be one of {list(GATES)}, got {gate!r}")
        self.skip_channels = int(skip_channels)
        self.coarse_gate = gate == "coarse"
        if up_mode == "deconv":
            up_channels = int(out_channels)
            self.up = UpSample(2, in_channels, up_channels, scale_factor=2, mode="deconv")
        else:
            up_channels = int(in_channels) // 2
            self.up = up_conv(in_channels, up_channels, up_mode)
        self.gate = None
        if self.skip_channels and self.coarse_gate:
            self.gate = CoarseAttentionGate(in_channels, self.skip_channels)
        elif self.skip_channels:
            self.gate = AttentionBlock(2, f_int=max(self.skip_channels // 2, 1), f_g=up_channels, f_l=self.skip_channels)
        self.convs = TwoConv(2, up_channels + self.skip_channels, out_channels, _ACT, _NORM, bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        up = self.up(x)
        if self.gate is not None:
            if skip is None:
                raise ValueError("AttentionUpBlock: this stage needs a skip feature map")
            if self.coarse_gate:
                up = torch.cat([up, self.gate(x, skip)], dim=1)
            else:
                up = torch.cat([self.gate(up, skip), up], dim=1)
        return self.convs(up)


class AttentionUNetDecoder(nn.Module):
    """The 5 decoder stages over the 5 ResNet50 features (shallow -> deep) -> ``(B, 16, H, W)``.

    ``stages[i]`` (:class:`AttentionUpBlock`) takes the previous output (``layer4`` for ``i = 0``),
    channels ``2048, 256, 128, 64, 32 -> 256, 128, 64, 32, 16``, with the gated skips ``layer3``,
    ``layer2``, ``layer1``, stem for ``i = 0..3`` and none for ``i = 4``.
    """

    def __init__(self, encoder_channels=RESNET50_CHANNELS, decoder_channels=DECODER_CHANNELS,
                 up_mode: str = "bilinear", gate: str = "coarse") -> None:
        super().__init__()
        enc, dec = tuple(encoder_channels), tuple(decoder_channels)
        ins = (enc[-1],) + dec[:-1]                     # 2048, 256, 128, 64, 32
        skips = enc[-2::-1] + (0,) * (len(dec) - len(enc) + 1)  # 1024, 512, 256, 64, none
        self.stages = nn.ModuleList(AttentionUpBlock(i, s, o, up_mode=up_mode, gate=gate)
                                    for i, s, o in zip(ins, skips, dec))

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
        up_mode: ``"bilinear"`` (default, thesis), ``"nearest"`` (authors' code) or ``"deconv"``.
        gate: ``"coarse"`` (default, thesis eq. 1.1, :class:`CoarseAttentionGate`) or ``"skip"`` (MONAI's
            ``AttentionBlock`` at the skip's resolution); ``up_mode="deconv", gate="skip"`` is medxfer's
            earlier network.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, up_mode: str = "bilinear",
                 gate: str = "coarse") -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.size_divisor = SIZE_DIVISOR
        self.up_mode, self.gate = str(up_mode), str(gate)
        self.encoder = build_resnet50_encoder(in_channels)
        self.decoder = AttentionUNetDecoder(up_mode=up_mode, gate=gate)
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
