"""Swin U-Net of the thesis (SPEC section 7): a pure-transformer U-Net built from MONAI's Swin blocks.

References: H. Cao et al., "Swin-Unet: Unet-like pure transformer for medical image segmentation",
ECCV 2022 Workshops (architecture and its official code, followed here); Z. Liu et al., "Swin
Transformer: Hierarchical vision transformer using shifted windows", ICCV 2021 (blocks, patch
merging); thesis section 1.1.3 and 2.1 ("Swin U-Net").

Architecture (``embed_dim=96``, ``depths=(2, 2, 2, 2)``, ``num_heads=(3, 6, 12, 24)``, window 7, MLP
ratio 4, qkv bias; input ``(B, in_channels, H, W)``, 224 x 224 in the paper):

======================= ======================================================= ======================
module                  operation                                               output (channel-first)
======================= ======================================================= ======================
``encoder.patch_embed`` 4x4 patch partition + linear embedding (4x4 conv,       (B, 96, H/4, W/4)
                        stride 4) + LayerNorm
``encoder.layers.0``    2 Swin blocks (W-MSA, SW-MSA), 3 heads                  (B, 96, H/4, W/4)
``encoder.merges.0``    patch merging (2x2 -> LayerNorm(4C) -> linear 4C->2C)   (B, 192, H/8, W/8)
``encoder.layers.1``    2 Swin blocks, 6 heads                                  (B, 192, H/8, W/8)
``encoder.merges.1``    patch merging                                           (B, 384, H/16, W/16)
``encoder.layers.2``    2 Swin blocks, 12 heads                                 (B, 384, H/16, W/16)
``encoder.merges.2``    patch merging                                           (B, 768, H/32, W/32)
``encoder.layers.3``    2 Swin blocks, 24 heads (the bottleneck)                (B, 768, H/32, W/32)
``encoder.norm``        LayerNorm(768)                                          (B, 768, H/32, W/32)
``decoder.expand.0``    patch expanding x2 (768 -> 384)                         (B, 384, H/16, W/16)
``decoder.stages.0``    concat skip (384) + linear 768->384, 2 Swin blocks, 12h (B, 384, H/16, W/16)
``decoder.expand.1``    patch expanding x2 (384 -> 192)                         (B, 192, H/8, W/8)
``decoder.stages.1``    concat skip (192) + linear 384->192, 2 Swin blocks, 6h  (B, 192, H/8, W/8)
``decoder.expand.2``    patch expanding x2 (192 -> 96)                          (B, 96, H/4, W/4)
``decoder.stages.2``    concat skip (96) + linear 192->96, 2 Swin blocks, 3h    (B, 96, H/4, W/4)
``decoder.norm``        LayerNorm(96)                                           (B, 96, H/4, W/4)
``head.expand``         final patch expanding x4 (linear 96->16*96, LayerNorm)  (B, 96, H, W)
``head.proj``           1x1 conv 96 -> ``out_channels``, no bias (Cao et al.)  (B, out, H, W)
======================= ======================================================= ======================

Skip connections follow Cao et al.'s code: the skip of each decoder stage is the *input* of the
encoder level of that scale, i.e. the patch embedding (H/4), the output of ``merges.0`` (H/8) and of
``merges.1`` (H/16). The thesis places the head as "a patch expanding layer, upsampling by 4, and a
linear projection", so both form ``head``.

Encoder = ``encoder.*`` (patch embedding + 4 levels with their merging + final norm): 20.41 M
parameters. Thesis Table 2.4 gives 21.2 M for its Swin Transformer (3.7 % more), consistent with this
encoder plus the ImageNet classification head it was pretrained with (thesis 2.2.2: pooling + one
dense layer, 768 -> 1000 = 0.77 M; 20.41 M + 0.77 M = 21.18 M).

Reused from MONAI: ``monai.networks.nets.swin_unetr.BasicLayer`` (2 ``SwinTransformerBlock``
with regular / shifted windows, relative position bias, attention mask; channel-first in and out;
``downsample=None``) for every level and decoder stage, ``PatchMergingV2`` (2D: the original Swin
concatenation order) and ``monai.networks.blocks.patchembedding.PatchEmbed``, built by MONAI's own
constructors (their parameters, buffers, initialisation and state-dict keys are MONAI's), with
MONAI's ``WindowAttention`` and ``MLPBlock`` running unchanged inside. Written by hand here: the
patch expanding layers (:class:`PatchExpand`; MONAI has none), the skip fusion (concat + linear),
the wiring, and the 2D forwards below.

TorchScript: ``torch.jit.script(net)`` works (and matches eager). MONAI's Swin blocks cannot be
scripted as they are: one ``forward`` serves 2D and 3D (``len(x.size())`` branches that index a
third window side TorchScript sees as out of range, tuples of varying length), with einops
``rearrange``, ``numpy.ceil``, ``itertools.product``, Python ``slice`` objects and
``torch.utils.checkpoint`` in it. So the stages, blocks, patch merging and patch embedding here are
thin subclasses (:class:`SwinStage2D`, :class:`SwinBlock2D`, :class:`PatchMerging2D`,
:class:`PatchEmbed2D`) that keep MONAI's constructors and restate only MONAI's 2D forward path,
operation for operation (tests/test_torchscript.py checks each against MONAI's own forward). Two
choices there: a block without a shift gets an all-zero attention mask instead of none (adding 0 is
exact, and MONAI's ``WindowAttention.forward`` then compiles with a tensor mask), and gradient
checkpointing (``use_checkpoint``, off in MONAI and here) is not offered.

Input sizes: ``H`` and ``W`` must be multiples of 32 (patch 4 x three merges); ``forward`` raises
``ValueError`` otherwise. Multiples of 224 (= 32 x window 7) give exactly the windows of the paper at
every level (56, 28, 14, 7 tokens at 224). Other multiples of 32 also work through MONAI's handling
in ``SwinTransformerBlock``: a feature map not larger than the window gets one window of its own size
(no shift), and a larger one that is not a multiple of 7 is zero-padded to one for the window
attention (the padded tokens are not masked) and cropped back; this is MONAI's behaviour for
SwinUNETR, not the original code (which fixes ``img_size``). ``img_size`` is therefore only the
nominal training size, checked to be a multiple of 32 and kept as ``net.img_size``.

Initialisation as thesis section 2.1: linear weights truncated normal (std 0.02, cut at +-2),
biases 0, LayerNorm 1 / 0; the patch embedding conv and the final patch expanding linear He-like
normal with gain 1/3 (``std = sqrt(1 / (3 * fan_in))``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks.patchembedding import PatchEmbed
from monai.networks.nets.swin_unetr import BasicLayer, PatchMergingV2, SwinTransformerBlock
from torch import nn

from medxfer.networks.layout import ArchLayout

__all__ = ["ARCH", "SIZE_DIVISOR", "PatchExpand", "SwinEncoder", "SwinDecoderStage", "SwinDecoder", "SwinHead",
           "SwinUNet", "swin_unet_layout", "PatchEmbed2D", "PatchMerging2D", "SwinBlock2D", "SwinStage2D"]

#: Architecture name (``ArchLayout.arch``).
ARCH = "swin_unet"
#: Input sides must be multiples of this (patch 4 x 2**3 merges).
SIZE_DIVISOR = 32


def _to_last(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H, W, C)``."""
    return x.permute(0, 2, 3, 1)


def _to_first(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, C, H, W)`` (contiguous)."""
    return x.permute(0, 3, 1, 2).contiguous()


# --- MONAI's Swin blocks with a 2D forward TorchScript compiles (module docstring) ----------------
# Written by hand: the 2D path of MONAI's forwards (monai.networks.nets.swin_unetr and
# monai.networks.blocks.patchembedding, MONAI 1.6), restated with fixed-rank, typed code.

def _window_and_shift(size: list[int], window: list[int], shift: list[int]) -> tuple[list[int], list[int]]:
    """MONAI's ``get_window_size``: a side not larger than the window is one window, unshifted."""
    ws, ss = [window[0], window[1]], [shift[0], shift[1]]
    for i in range(2):
        if size[i] <= window[i]:
            ws[i], ss[i] = size[i], 0
    return ws, ss


def _window_partition(x: torch.Tensor, ws: list[int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * windows, ws0 * ws1, C)`` (MONAI's ``window_partition``, 2D)."""
    b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    x = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws[0] * ws[1], c)


def _window_reverse(windows: torch.Tensor, ws: list[int], b: int, h: int, w: int) -> torch.Tensor:
    """``(B * windows, ws0, ws1, C)`` -> ``(B, H, W, C)`` (MONAI's ``window_reverse``, 2D)."""
    x = windows.view(b, h // ws[0], w // ws[1], ws[0], ws[1], -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def _shift_mask(hp: int, wp: int, ws: list[int], ss: list[int], device: torch.device) -> torch.Tensor:
    """MONAI's ``compute_mask`` (2D): ``(windows, n, n)``, 0 within a region, -100 across regions.

    The regions are MONAI's slices ``slice(-ws)``, ``slice(-ws, -ss)``, ``slice(-ss, None)`` per side,
    written as tensor slices with the same bounds (a shift of 0 gives the same empty / full slices)."""
    img_mask = torch.zeros((1, hp, wp, 1), device=device)
    cnt = 0
    for h0, h1 in [(0, -ws[0]), (-ws[0], -ss[0]), (-ss[0], hp)]:
        for w0, w1 in [(0, -ws[1]), (-ws[1], -ss[1]), (-ss[1], wp)]:
            img_mask[:, h0:h1, w0:w1, :] = cnt
            cnt += 1
    mask_windows = _window_partition(img_mask, ws).squeeze(-1)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


class PatchEmbed2D(PatchEmbed):
    """MONAI ``PatchEmbed`` (``spatial_dims=2``) with its 2D forward: ``(B, C, H, W)`` -> ``(B, E, H/p, W/p)``
    (sides padded up to multiples of the patch, conv, LayerNorm over the channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        ph, pw = self.patch_size[0], self.patch_size[1]
        if w % pw != 0:
            x = F.pad(x, [0, pw - w % pw])
        if h % ph != 0:
            x = F.pad(x, [0, 0, 0, ph - h % ph])
        x = self.proj(x)
        if self.norm is not None:
            wh, ww = x.shape[2], x.shape[3]
            x = self.norm(x.flatten(2).transpose(1, 2))
            x = x.transpose(1, 2).view(-1, self.embed_dim, wh, ww)
        return x


class PatchMerging2D(PatchMergingV2):
    """MONAI ``PatchMergingV2`` (``spatial_dims=2``) with its 2D forward: ``(B, H, W, C)`` ->
    ``(B, H/2, W/2, 2C)`` (odd sides zero-padded; the 2x2 neighbours concatenated in MONAI's order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        if h % 2 == 1 or w % 2 == 1:
            x = F.pad(x, [0, 0, 0, w % 2, 0, h % 2])
        # MONAI: [x[:, j::2, i::2] for i, j in itertools.product(range(2), range(2))]
        x = torch.cat([x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class SwinBlock2D(SwinTransformerBlock):
    """MONAI ``SwinTransformerBlock`` with its 2D forward: ``(B, H, W, C)`` and the stage's shift mask ->
    ``(B, H, W, C)``: LayerNorm, (shifted) window attention with padding to whole windows, residual;
    LayerNorm, MLP, residual. A block without a shift gets an all-zero mask (MONAI passes none; adding
    0 to the attention logits changes nothing). Made from MONAI's blocks by :class:`SwinStage2D`."""

    def forward(self, x: torch.Tensor, mask_matrix: torch.Tensor) -> torch.Tensor:
        shortcut = x
        b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        ws, ss = _window_and_shift([h, w], [self.window_size[0], self.window_size[1]],
                                   [self.shift_size[0], self.shift_size[1]])
        x = self.norm1(x)
        pad_b = (ws[0] - h % ws[0]) % ws[0]
        pad_r = (ws[1] - w % ws[1]) % ws[1]
        x = F.pad(x, [0, 0, 0, pad_r, 0, pad_b])
        hp, wp = x.shape[1], x.shape[2]
        shifted = ss[0] > 0 or ss[1] > 0
        if shifted:
            x = torch.roll(x, shifts=[-ss[0], -ss[1]], dims=[1, 2])
            mask = mask_matrix
        else:
            mask = torch.zeros_like(mask_matrix)
        windows = self.attn(_window_partition(x, ws), mask)
        x = _window_reverse(windows.view(-1, ws[0], ws[1], c), ws, b, hp, wp)
        if shifted:
            x = torch.roll(x, shifts=[ss[0], ss[1]], dims=[1, 2])
        if pad_r > 0 or pad_b > 0:
            x = x[:, :h, :w, :].contiguous()
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage2D(BasicLayer):
    """MONAI ``BasicLayer`` (2D window, no downsampling) with its 2D forward: ``(B, C, H, W)`` ->
    ``(B, C, H, W)`` through its Swin blocks (regular / shifted windows) with MONAI's shift mask.

    MONAI's constructor builds the layer and its ``SwinTransformerBlock`` s; the blocks are then given
    the class :class:`SwinBlock2D` (a subclass that only adds a forward: no parameter, buffer or
    random draw changes), since ``BasicLayer`` offers no way to choose the block class.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(self.window_size) != 2 or self.downsample is not None or self.use_hyena or self.use_checkpoint:
            raise ValueError("SwinStage2D: a 2D window, no downsample, no Hyena blocks and no checkpointing only")
        for block in self.blocks:
            block.__class__ = SwinBlock2D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        ws, ss = _window_and_shift([h, w], [self.window_size[0], self.window_size[1]],
                                   [self.shift_size[0], self.shift_size[1]])
        hp = (h + ws[0] - 1) // ws[0] * ws[0]  # MONAI: int(np.ceil(h / ws)) * ws
        wp = (w + ws[1] - 1) // ws[1] * ws[1]
        mask = _shift_mask(hp, wp, ws, ss, x.device)
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x, mask)
        return x.permute(0, 3, 1, 2)


def _basic_layer(dim: int, depth: int, heads: int, window: int, drop_path: Sequence[float]) -> nn.Module:
    return SwinStage2D(dim=dim, depth=depth, num_heads=heads, window_size=(window, window), drop_path=list(drop_path),
                       mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, norm_layer=nn.LayerNorm,
                       downsample=None)


# Written by hand: MONAI has no patch expanding layer (Cao et al. 2022, PatchExpand / FinalPatchExpand_X4).
class PatchExpand(nn.Module):
    """Patch expanding (Cao et al. 2022): ``(B, C, H, W)`` -> ``(B, out_dim, scale*H, scale*W)``.

    Linear ``C -> scale**2 * out_dim`` (no bias) per token, rearrange ``b h w (p1 p2 c) -> b (h p1) (w p2) c``
    (``p1 = p2 = scale``), LayerNorm(``out_dim``). Cao et al. use ``scale=2, out_dim=C/2`` between
    decoder stages (linear ``C -> 2C``, then half the channels at twice the resolution) and
    ``scale=4, out_dim=C`` as the final x4 expansion. Channel-first in and out, as MONAI's ``BasicLayer``.
    """

    def __init__(self, dim: int, scale: int = 2, out_dim: int | None = None) -> None:
        super().__init__()
        self.scale = int(scale)
        self.out_dim = int(out_dim) if out_dim is not None else dim // 2
        self.expand = nn.Linear(dim, self.scale ** 2 * self.out_dim, bias=False)
        self.norm = nn.LayerNorm(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        s, c = self.scale, self.out_dim
        x = self.expand(_to_last(x))                                  # (B, H, W, s*s*c)
        x = x.reshape(b, h, w, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, c)
        return _to_first(self.norm(x))


class SwinEncoder(nn.Module):
    """Swin Transformer encoder of Swin U-Net: ``(B, in_channels, H, W)`` -> ``(skips, bottleneck)``.

    ``skips`` = the inputs of levels 1..3: patch embedding ``(B, C, H/4)``, ``merges.0`` output
    ``(B, 2C, H/8)``, ``merges.1`` output ``(B, 4C, H/16)`` (Cao et al.); ``bottleneck`` = ``norm(layers.3)``
    ``(B, 8C, H/32, W/32)``; ``C = embed_dim``. Modules: ``patch_embed`` (MONAI ``PatchEmbed``, LayerNorm),
    ``layers.0..3`` (MONAI ``BasicLayer``), ``merges.0..2`` (MONAI ``PatchMergingV2``, channel-last),
    ``norm`` (LayerNorm(8C)).
    """

    def __init__(self, in_channels: int = 3, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 4,
                 drop_path: Sequence[float] | None = None) -> None:
        super().__init__()
        n = len(depths)
        dpr = list(drop_path) if drop_path is not None else [0.0] * sum(depths)
        self.patch_embed = PatchEmbed2D(patch_size=patch_size, in_chans=in_channels, embed_dim=embed_dim,
                                        norm_layer=nn.LayerNorm, spatial_dims=2)
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.layers = nn.ModuleList(
            _basic_layer(dims[i], depths[i], num_heads[i], window_size, dpr[sum(depths[:i]):sum(depths[:i + 1])])
            for i in range(n))
        self.merges = nn.ModuleList(PatchMerging2D(dims[i], norm_layer=nn.LayerNorm, spatial_dims=2)
                                    for i in range(n - 1))
        self.norm = nn.LayerNorm(dims[-1])

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.patch_embed(x)
        skips: list[torch.Tensor] = []
        for layer, merge in zip(self.layers, self.merges):  # levels 1..n-1, each ending in its merging
            skips.append(x)
            x = _to_first(merge(_to_last(layer(x.contiguous()))))
        x = self.layers[-1](x.contiguous())  # the bottleneck level
        return skips, _to_first(self.norm(_to_last(x)))


class SwinDecoderStage(nn.Module):
    """Decoder stage of Swin U-Net: ``(B, C, h, w)`` and skip ``(B, C, h, w)`` -> ``(B, C, h, w)``.

    Concatenation ``[x, skip]`` (2C channels) and a linear ``2C -> C`` per token (Cao et al.'s
    ``concat_back_dim``), then MONAI ``BasicLayer`` (``depth`` Swin blocks, regular / shifted windows).
    """

    def __init__(self, dim: int, depth: int, heads: int, window_size: int, drop_path: Sequence[float]) -> None:
        super().__init__()
        self.fuse = nn.Linear(2 * dim, dim)
        self.layer = _basic_layer(dim, depth, heads, window_size, drop_path)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = _to_first(self.fuse(_to_last(torch.cat([x, skip], dim=1))))
        return self.layer(x)


class SwinDecoder(nn.Module):
    """Swin U-Net decoder: ``(skips, bottleneck (B, 8C, H/32))`` -> ``(B, C, H/4, W/4)``.

    ``expand.i`` (:class:`PatchExpand`, x2, channels halved) then ``stages.i`` (:class:`SwinDecoderStage`
    with the skip of that scale), for scales H/16, H/8, H/4; then ``norm`` (LayerNorm(C)).
    """

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 drop_path: Sequence[float] | None = None) -> None:
        super().__init__()
        n = len(depths)
        dpr = list(drop_path) if drop_path is not None else [0.0] * sum(depths)
        levels = list(range(n - 2, -1, -1))  # encoder level of each stage's scale: 2, 1, 0
        dims = [embed_dim * 2 ** i for i in levels]
        self.expand = nn.ModuleList(PatchExpand(2 * d, scale=2, out_dim=d) for d in dims)
        self.stages = nn.ModuleList(
            SwinDecoderStage(embed_dim * 2 ** i, depths[i], num_heads[i], window_size,
                             dpr[sum(depths[:i]):sum(depths[:i + 1])])  # Cao et al.: the encoder level's rates
            for i in levels)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, skips: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        n = len(skips)
        for i, (expand, stage) in enumerate(zip(self.expand, self.stages)):
            x = stage(expand(x), skips[n - 1 - i])
        return _to_first(self.norm(_to_last(x)))


class SwinHead(nn.Module):
    """Swin U-Net head: ``(B, C, H/4, W/4)`` -> ``(B, out_channels, H, W)`` logits.

    ``expand``: final patch expanding x4 (:class:`PatchExpand`, ``C -> 16C``, LayerNorm(C)); ``proj``:
    1x1 conv ``C -> out_channels`` without bias (Cao et al.).
    """

    def __init__(self, dim: int, out_channels: int, scale: int = 4) -> None:
        super().__init__()
        self.expand = PatchExpand(dim, scale=scale, out_dim=dim)
        self.proj = nn.Conv2d(dim, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.expand(x))


class SwinUNet(nn.Module):
    """Swin U-Net (Cao et al. 2022; thesis "Swin U-Net"): ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``.

    ``H, W`` multiples of 32 (``ValueError`` otherwise); multiples of 224 give the paper's exact
    window partition (module docstring). Submodules ``encoder`` (:class:`SwinEncoder`), ``decoder``
    (:class:`SwinDecoder`), ``head`` (:class:`SwinHead`); :func:`swin_unet_layout` gives the layout.

    Args:
        in_channels: image channels (default 3). out_channels: logit maps (default 1).
        img_size: nominal input side (int) or ``(H, W)``, default 224; must be multiples of 32. The
            network does not depend on it (MONAI computes windows and masks per input).
        embed_dim, depths, num_heads, window_size, patch_size: Swin hyper-parameters (defaults: the
            thesis / Cao et al. "tiny" U-Net: 96, 2 blocks per level, 3/6/12/24 heads, window 7, patch 4).
        drop_path_rate: stochastic depth, linearly increasing over the encoder blocks (Swin); each decoder
            stage uses the rates of the encoder level of its scale (Cao et al.). Default 0.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, img_size: int | Sequence[int] = 224,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, patch_size: int = 4, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(depths) != len(num_heads) or len(depths) < 2:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have the same length >= 2")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.size_divisor = int(patch_size) * 2 ** (len(depths) - 1)
        sides = (int(img_size),) * 2 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(sides) != 2 or any(s % self.size_divisor for s in sides):
            raise ValueError(f"SwinUNet: img_size {img_size} must be one side or (H, W), each a multiple of "
                             f"{self.size_divisor}")
        self.img_size = sides
        dpr = [float(r) for r in torch.linspace(0, float(drop_path_rate), sum(depths))]
        self.encoder = SwinEncoder(in_channels, embed_dim, depths, num_heads, window_size, patch_size, dpr)
        self.decoder = SwinDecoder(embed_dim, depths, num_heads, window_size, dpr)
        self.head = SwinHead(embed_dim, out_channels, scale=patch_size)
        self._init_weights()

    def _init_weights(self) -> None:
        """Thesis section 2.1 (module docstring)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for weight in (self.encoder.patch_embed.proj.weight, self.head.expand.expand.weight):
            fan_in = weight[0].numel()  # conv: in_channels * kernel; linear: in_features
            nn.init.normal_(weight, std=math.sqrt(1.0 / (3.0 * fan_in)))
        if self.encoder.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.encoder.patch_embed.proj.bias)
        nn.init.kaiming_normal_(self.head.proj.weight, mode="fan_in", nonlinearity="relu")

    def encoder_parameters(self) -> int:
        """Number of parameters whose name starts with ``encoder.`` (patch embedding, 4 levels, merging, norm)."""
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith("encoder."))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits."""
        if x.ndim != 4 or x.shape[-1] % self.size_divisor or x.shape[-2] % self.size_divisor:
            raise ValueError(f"SwinUNet: input {list(x.shape)} must be (B, C, H, W) with H and W multiples of "
                             f"{self.size_divisor} (multiples of {self.size_divisor * 7} give the paper's windows)")
        skips, bottleneck = self.encoder(x)
        return self.head(self.decoder(skips, bottleneck))


def swin_unet_layout(network: SwinUNet | None = None) -> ArchLayout:
    """:class:`~medxfer.networks.layout.ArchLayout` of :class:`SwinUNet` (4 levels; ``network`` gives the depth).

    Encoder levels (deepest last): 1 = ``encoder.patch_embed``, ``encoder.layers.0``, ``encoder.merges.0``;
    2 = ``encoder.layers.1``, ``encoder.merges.1``; 3 = ``encoder.layers.2``, ``encoder.merges.2``;
    4 = ``encoder.layers.3``, ``encoder.norm`` (each level with the merging that ends it, as in Swin).
    Decoder stages ``decoder.stages.0`` (H/16) .. ``decoder.stages.2`` (H/4), channel-first outputs;
    the ``decoder.expand.*`` / ``decoder.norm`` parameters are decoder parameters too. Head: ``head``
    (final x4 patch expanding + 1x1 conv). Penultimate encoder level: ``encoder.layers.2`` — MONAI's
    ``BasicLayer`` returns channel-first ``(B, 384, H/16, W/16)`` (the level-3 Swin blocks' output,
    before ``merges.2``), so no reshaping module is needed.
    """
    n = len(network.encoder.layers) if network is not None else 4
    levels = [["encoder.patch_embed", "encoder.layers.0", "encoder.merges.0"]]
    levels += [[f"encoder.layers.{k}", f"encoder.merges.{k}"] for k in range(1, n - 1)]
    levels += [[f"encoder.layers.{n - 1}", "encoder.norm"]]
    return ArchLayout(ARCH, levels, [f"decoder.stages.{i}" for i in range(n - 1)], ["head"], f"encoder.layers.{n - 2}")
