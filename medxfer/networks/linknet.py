"""Link-shape EfficientNet-b0 segmenter of TATL (SPEC section 6): decoder stages joined to the encoder by skip *addition*.

TATL (Nguyen et al., section 4.1) describes every decoder stage of its networks the same way: "an
up-sampling layer and a sequence of convolutional blocks where each block has two 3x3 convolution
filters with activation functions in between"; the Link shape *adds* the encoder feature of the same
scale (LinkNet, Chaurasia & Culurciello 2017), the U shape concatenates it
(:func:`medxfer.networks.effnet_unet.unet_effb0`). Two decoder blocks are offered
(``decoder_block``):

``"paper"`` (default, :class:`PaperDecoderBlock`)
    section 4.1: x2 up-sampling (interpolation) -> 3x3 conv -> norm -> act -> 3x3 conv -> norm -> act,
    then ``+ skip``. The first conv maps the deeper channels to the skip's, so the sum is defined.
``"linknet"`` (:class:`LinkDecoderBlock`, medxfer's block before issue 17)
    LinkNet's bottleneck block, as in the authors' library (qubvel ``segmentation_models``
    ``Linknet``): 1x1 conv (in -> in/4) -> x2 up + 3x3 conv -> 1x1 conv (in/4 -> out), then ``+ skip``.
    Table 7's Link-shape count (6,096,333) is this block on the Keras EfficientNet-b0 taps; see the
    ``tatl_skin`` model card ("Parameter counts") for the arithmetic.

Where the paper is silent (chosen here): batch norm after each conv (as the authors' library and
MONAI's ``TwoConv``), ReLU, nearest-neighbour x2 interpolation (Keras ``UpSampling2D``), no
activation after the addition, no skip for the last block (there is no encoder feature at the input
resolution).

Remaining deviations from Table 7 (reasons in the model card): MONAI's encoder gives the block
outputs (16/24/40/112/320 channels) where the Keras encoder taps the expansion activations
(96/144/240/672) and the 1280-channel head conv; the unused ImageNet classifier stays in the state
dict (so that MONAI / lukemelas weights load unchanged) and is counted.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets.basic_unet import TwoConv
from monai.networks.nets.flexible_unet import SegmentationHead
from torch import nn

from medxfer.networks.effnet_unet import EFFB0_CHANNELS, build_effb0_encoder, no_download

__all__ = ["LinkNetEffB0", "PaperDecoderBlock", "LinkDecoderBlock", "LinkNetDecoder", "DECODER_BLOCKS",
           "SIZE_DIVISOR"]

#: Every side of the input must be a multiple of this (5 stride-2 stages of EfficientNet-b0).
SIZE_DIVISOR = 32
#: ``decoder_block`` values: section 4.1's two-conv block, LinkNet's bottleneck block.
DECODER_BLOCKS = ("paper", "linknet")


class PaperDecoderBlock(nn.Module):
    """TATL section 4.1 decoder stage: ``(B, in, S) -> (B, out, 2S)``, plus the encoder feature ``(B, out, 2S)`` if given.

    ``up`` (x2: MONAI ``UpSample``, interpolation without a conv for ``upsample="nontrainable"``, or a
    2x2 transposed conv ``in -> in`` for ``"deconv"``) -> ``convs`` (MONAI ``TwoConv``: 3x3 conv
    ``in -> out``, norm, act, 3x3 conv ``out -> out``, norm, act) -> ``+ skip``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act, norm, dropout,
                 bias: bool = False, upsample: str = "nontrainable", interp_mode: str = "nearest") -> None:
        super().__init__()
        if upsample == "nontrainable":
            self.up = UpSample(spatial_dims, scale_factor=2, mode="nontrainable", pre_conv=None,
                               interp_mode=interp_mode, align_corners=None)
        elif upsample == "deconv":
            self.up = UpSample(spatial_dims, in_channels, in_channels, scale_factor=2, mode="deconv", bias=bias)
        else:
            raise ValueError(f"upsample must be 'nontrainable' or 'deconv', got {upsample!r}")
        self.convs = TwoConv(spatial_dims, in_channels, out_channels, act, norm, bias, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.convs(self.up(x))
        if skip is not None:
            x = x + skip
        return x


class LinkDecoderBlock(nn.Module):
    """LinkNet decoder block (``decoder_block="linknet"``): ``(B, in, S) -> (B, out, 2S)``, plus the encoder feature.

    ``conv 1x1 (in -> in/4) -> x2 up (in/4 -> in/4) -> conv 1x1 (in/4 -> out)``, each conv followed by
    norm and activation (MONAI ``Convolution``), then ``+ skip`` (Chaurasia & Culurciello 2017, Fig. 3).
    The x2 up is ``upsample="nontrainable"``: interpolation (MONAI ``UpSample``) then a 3x3 conv, as in
    the upsampling decoder block the TATL authors' library uses; or ``"deconv"``: a 3x3 transposed conv
    with stride 2, the LinkNet paper's "full-conv".
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act, norm, dropout,
                 bias: bool = False, upsample: str = "nontrainable", interp_mode: str = "nearest") -> None:
        super().__init__()
        mid = max(in_channels // 4, 1)

        def conv(cin, cout, kernel, **kw):
            return Convolution(spatial_dims, cin, cout, kernel_size=kernel, act=act, norm=norm, dropout=dropout,
                               bias=bias, **kw)

        self.reduce = conv(in_channels, mid, 1)
        if upsample == "deconv":
            self.up = conv(mid, mid, 3, strides=2, is_transposed=True)
        elif upsample == "nontrainable":
            self.up = nn.Sequential(
                UpSample(spatial_dims, scale_factor=2, mode="nontrainable", pre_conv=None, interp_mode=interp_mode,
                         align_corners=None),
                conv(mid, mid, 3))
        else:
            raise ValueError(f"upsample must be 'nontrainable' or 'deconv', got {upsample!r}")
        self.expand = conv(mid, out_channels, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.expand(self.up(self.reduce(x)))
        if skip is not None:
            x = x + skip
        return x


class LinkNetDecoder(nn.Module):
    """Deep -> shallow LinkNet decoder over 5 encoder features (scales 1/2 .. 1/32 of the input).

    ``blocks[i]`` for ``i < 4`` maps encoder channels ``c[4-i] -> c[3-i]`` and adds encoder feature
    ``3-i``; ``blocks[4]`` maps ``c[0] -> c[0]`` up to the input resolution, without a skip.
    """

    def __init__(self, spatial_dims: int, encoder_channels=EFFB0_CHANNELS, decoder_block: str = "paper",
                 **block_kwargs) -> None:
        super().__init__()
        if decoder_block not in DECODER_BLOCKS:
            raise ValueError(f"LinkNetEffB0: decoder_block must be one of {DECODER_BLOCKS}, got {decoder_block!r}")
        block = PaperDecoderBlock if decoder_block == "paper" else LinkDecoderBlock
        chans = list(encoder_channels)
        ins = chans[::-1]                   # 320, 112, 40, 24, 16
        outs = chans[::-1][1:] + [chans[0]]  # 112, 40, 24, 16, 16
        self.blocks = nn.ModuleList(block(spatial_dims, i, o, **block_kwargs) for i, o in zip(ins, outs))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        n = len(features)
        x = features[n - 1]
        for i, block in enumerate(self.blocks):
            skip: torch.Tensor | None = None
            if i < n - 1:
                skip = features[n - 2 - i]  # same scale as the block's output
            x = block(x, skip)
        return x


class LinkNetEffB0(nn.Module):
    """LinkNet-style segmenter on MONAI's EfficientNet-b0 encoder (TATL "Link shape").

    Shapes: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits (``(B, C, H, W, D)``
    with ``spatial_dims=3``); ``H, W`` must be multiples of 32 (e.g. 64x64, 384x512).

    Encoder features ``f1..f5`` (16, 24, 40, 112, 320 channels at H/2 .. H/32) are decoded as
    ``d4 = B0(f5) + f4, d3 = B1(d4) + f3, d2 = B2(d3) + f2, d1 = B3(d2) + f1, d0 = B4(d1)``, with
    decoder blocks ``B*`` (:class:`PaperDecoderBlock` by default, :class:`LinkDecoderBlock` with
    ``decoder_block="linknet"``); the head is a 3x3 conv ``16 -> out_channels``. Compared with the
    U shape (skip concatenation, :func:`medxfer.networks.effnet_unet.unet_effb0`), the decoder
    outputs exactly the encoder's channels, so it is smaller: 0.52 M decoder parameters with the
    paper block, 0.11 M with the LinkNet block, against 1.77 M / 2.45 M for the U shape.

    Reused from MONAI, unchanged: the encoder (``EfficientNetEncoder`` built as ``FlexibleUNet`` builds
    it, held as ``self.encoder`` so that its state-dict keys ``encoder.*`` equal ``FlexibleUNet``'s),
    ``Convolution`` / ``UpSample`` blocks, and ``FlexibleUNet``'s ``SegmentationHead``
    (``self.segmentation_head``). Module names follow ``FlexibleUNet`` (``decoder.blocks.<i>``), so
    :func:`medxfer.networks.effnet_unet.effb0_layout` describes both. ``torch.export.export`` and
    ``torch.jit.script`` both work as built (MONAI's memory-efficient swish is ``F.silu`` now, so no
    ``set_swish(memory_efficient=False)`` is needed) and match eager.

    Args:
        in_channels: image channels (default 3). out_channels: output maps (default 1).
        spatial_dims: 2 (default) or 3.
        pretrained: must stay ``False`` (never downloads; load local ImageNet encoder weights with
            :func:`medxfer.transfer.weights.load_encoder_weights`). Random initialisation.
        norm: decoder normalisation, default ``("batch", {"eps": 1e-3, "momentum": 0.1})`` (as
            ``FlexibleUNet``); the encoder keeps its own BatchNorm (eps 1e-3, momentum 0.01).
        act: decoder activation, default ``("relu", {"inplace": True})``. dropout: decoder dropout, 0.
        decoder_bias: bias in decoder convs (default ``False``, a norm follows).
        decoder_block: ``"paper"`` (default: TATL section 4.1, x2 up + two 3x3 convs + skip
            addition) or ``"linknet"`` (1x1 -> x2 up + 3x3 -> 1x1 + skip addition; the networks
            medxfer built before issue 17). The two have different state dicts.
        upsample: the x2 up-sampling. ``"nontrainable"`` (default): interpolation (paper block), or
            interpolation + 3x3 conv (LinkNet block); ``"deconv"``: a transposed conv (2x2 ``in -> in``
            in the paper block, 3x3 stride 2 in the LinkNet block).
        interp_mode: interpolation of ``"nontrainable"``, default ``"nearest"``.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, spatial_dims: int = 2, pretrained: bool = False,
                 norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.1}),
                 act: str | tuple = ("relu", {"inplace": True}), dropout: float | tuple = 0.0,
                 decoder_bias: bool = False, decoder_block: str = "paper", upsample: str = "nontrainable",
                 interp_mode: str = "nearest") -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError("spatial_dims can only be 2 or 3.")
        no_download(pretrained)
        self.spatial_dims = spatial_dims
        self.size_divisor = SIZE_DIVISOR
        self.encoder = build_effb0_encoder(in_channels=in_channels, spatial_dims=spatial_dims)
        self.decoder = LinkNetDecoder(spatial_dims, EFFB0_CHANNELS, decoder_block, act=act, norm=norm,
                                      dropout=dropout if dropout else None,  # no identity Dropout(0) modules
                                      bias=decoder_bias, upsample=upsample, interp_mode=interp_mode)
        self.segmentation_head = SegmentationHead(spatial_dims, EFFB0_CHANNELS[0], out_channels, kernel_size=3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W[, D])`` -> ``(B, out_channels, H, W[, D])`` logits."""
        sides = inputs.shape[2:]
        bad = len(sides) != self.spatial_dims
        for side in sides:
            bad = bad or side % self.size_divisor != 0
        if bad:  # written for TorchScript as well as torch.export
            raise ValueError("LinkNetEffB0: input spatial size " + str(sides) + " must have "
                             + str(self.spatial_dims) + " sides, each a multiple of " + str(self.size_divisor))
        return self.segmentation_head(self.decoder(self.encoder(inputs)))
