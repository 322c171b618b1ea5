"""Truncated transfer learning (SPEC section 8): a pretrained encoder cut after level k (or at one of the
paper's cuts, Res-T1..T5 / Dens-T1..F), fine-tuned whole.

Method (Peng, Liang, Luo, Li & Sun, "Rethink Transfer Learning in Medical Image Classification",
2021): medical pathologies are mostly low- to mid-level features (textures, blobs), so instead of
fine-tuning a whole ImageNet network, keep its bottom layers up to a level "commensurate with the
level of features needed", drop the top, put a new head on the cut and fine-tune **every kept
layer** from the pretrained weights (only the new head starts from random; nothing is frozen).
Paper facts used here (and, where the paper is silent, the authors' code, PL97/TTL):

* DenseNet121 truncated after its first 1 / 2 / 3 dense blocks (Dens-T1/T2/T3) against the full
  network (Dens-F); on their COVID-19 chest X-rays Dens-T1 and Dens-T2 were the two best models and
  Dens-T1 beat Dens-F "with 79% parameter reduction"; on CheXpert Dens-T3 was best.
* ResNet50 truncated at the first 25 / 37 / 43 / 46 / 49 conv layers (Res-T1..T5). Counting the
  main path (stem conv + 3 convs per bottleneck, the 4 1x1 downsample shortcuts not counted; the
  authors cut their unrolled ResNet50 at bottleneck boundaries, ``layerttl_resnet50``), that is the
  stem + 8 / 12 / 14 / 15 / 16 bottlenecks: Res-T1 ends after ``layer3.0`` (1024 ch, /16), Res-T2
  after ``layer3.4`` (1024, /16), Res-T3 after ``layer4.0`` (2048, /32), Res-T4 after ``layer4.1``
  and Res-T5 after ``layer4.2``, i.e. the whole encoder (:data:`PAPER_CUTS`; build them by name,
  ``TruncatedClassifier("resnet50", "Res-T2", ...)``). Encoder parameters 2,957,376 / 7,426,112 /
  14,582,848 / 19,045,440 / 23,508,032.
* The head (authors' code): the truncated feature map flattened into one new linear layer
  (``flatten``; global average pooling + linear is their ``--pooling`` option, ``head="gap"`` here).
  Training: Adam (lr 1e-5), batches of 64, 224x224 inputs, 200 epochs, lr halved when the
  validation AUPRC stops improving, the best-validation model on a separate test set, 3 repeats
  (:mod:`medxfer.workflows.truncated_classification`, ``configs/truncated_paper.yaml``).
* AUPRC is reported beside AUROC because AUROC saturates under class imbalance (their example, 10
  positives in 1000: AUROC 0.999 vs 0.991 but AUPRC 0.990 vs 0.354); see
  :mod:`medxfer.metrics.classification`.

Levels (SPEC section 8; input ``(B, C, H, W)``, output of the truncated encoder
``(B, C_k, H / s_k, W / s_k)``):

=====  ==============================================  ==========================================
level  ResNet50 (torchvision layout)                   DenseNet121
=====  ==============================================  ==========================================
1      after ``layer1``: 256 ch, stride 4              after ``features.transition1``: 128 ch, /8
2      after ``layer2``: 512 ch, stride 8              after ``features.transition2``: 256 ch, /16
3      after ``layer3``: 1024 ch, stride 16            after ``features.transition3``: 512 ch, /32
4      after ``layer4`` (full encoder): 2048 ch, /32   full ``features`` (``denseblock4``,
                                                       ``norm5``, then ReLU): 1024 ch, /32
=====  ==============================================  ==========================================

The integer levels are the SPEC's stage boundaries (after layer1/2/3 = the first 10 / 22 / 40
main-path conv layers, 49 in all; the authors' block-wise ``--trunc 1/2/3``), kept beside the
paper's cuts. DenseNet levels include the transition that follows dense block k (1x1 conv halving
the channels, 2x2 average pool), as the SPEC and the authors' code (``features[:4 + 2k]``) do; the
paper's depth shares 12% / 32% for Dens-T1 / Dens-T2 match the 14 / 39 of the 121
weight layers kept by levels 1 / 2 (level 3 keeps 88 of 121, 73%; the paper prints "88%").

Remaining deviations from the authors' code: Dens-F (level 4) ends with a ReLU after ``norm5``
(torchvision's and MONAI's DenseNet forward); the authors' flatten head reads ``norm5`` without it.
The encoders are MONAI's, whose random initialisation differs from torchvision's (it only matters
without pretrained weights).

Parameters of the encoders (random init, ``in_channels=3``; :func:`parameter_count`):
ResNet50 225,344 / 1,444,928 / 8,543,296 / 23,508,032 and DenseNet121 377,856 / 1,429,632 /
4,793,728 / 6,953,856 for levels 1 / 2 / 3 / 4 (level 4 = torchvision's counts without the fc).
The paper's "79% parameter reduction" of Dens-T1 matches our DenseNet level 2 (1.43 M of 6.95 M),
not level 1 (95% reduction): the paper's own numbers do not pin the cut down further.

Encoders are MONAI's (``monai.networks.nets.resnet50``, ``DenseNet121``) with MONAI's module names,
so state dicts of those networks load (an ``encoder.`` / ``module.`` / ``_orig_mod.`` prefix is
stripped; torchvision ResNet50 keys are the same as MONAI's, torchvision DenseNet keys
``denselayerN.norm1`` / ``norm.1`` are mapped to MONAI's ``denselayerN.layers.norm1``).
:func:`truncate_encoder` *shares* the kept modules with the source encoder (same parameter
objects, same names), so ``truncated.load_state_dict(full_encoder_state, strict=False)`` reports
exactly the dropped deeper layers as unexpected.

The networks here start from random initialisation and never download anything; pretrained
encoder weights (a state dict or a local file) are loaded by the one weight path,
:func:`medxfer.transfer.weights.load_pretrained` (mode ``encoder_only``, keys named by
:func:`truncated_key`), which reports what was loaded and what the cut dropped.

TorchScript: :class:`TruncatedSegmenter` and :class:`TruncatedClassifier` script with
``torch.jit.script`` and match eager at every level; :class:`TruncatedEncoder` runs its kept modules
through ``named_children`` (which TorchScript unrolls) instead of looking them up by name.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet121, resnet50
from monai.networks.nets.basic_unet import UpCat

from medxfer.networks.layout import ArchLayout

__all__ = [
    "ARCHS", "PAPER_CUTS", "HEADS", "TruncationLevel", "truncation_levels", "truncation_cuts", "resnet50_encoder", "densenet121_encoder",
    "DenseNet121Encoder", "TruncatedEncoder", "truncate_encoder", "truncated_key", "truncated_layout",
    "TruncatedClassifier", "TruncatedSegmenter", "parameter_count",
]

@dataclass(frozen=True)
class TruncationLevel:
    """One cut point: the encoder runs up to and including ``last_module``.

    ``channels`` (C_k) and ``stride`` (s_k) describe the output ``(B, C_k, H / s_k, W / s_k)``;
    ``kept`` are the top-level module names kept (relative to the encoder, ``features.`` included for
    DenseNet121); ``conv_layers`` counts the kept main-path conv layers (ResNet50: without the 4
    1x1 downsample shortcuts; DenseNet121: stem, dense-layer and transition convs). ``level`` is
    what the networks take (an integer level or a paper cut name such as ``"Res-T1"``), ``name``
    a label (``"level2"``, ``"Res-T1"``); ``blocks``: bottleneck blocks kept of the last stage when
    the cut is inside it (``last_module`` is then that stage, e.g. ``layer3`` with 1 of its 6
    blocks for Res-T1), else ``None``.
    """

    level: int | str
    channels: int
    stride: int
    last_module: str
    kept: tuple[str, ...]
    conv_layers: int
    name: str = ""
    blocks: int | None = None


@dataclass(frozen=True)
class _ArchSpec:
    container: str | None          # "features" for DenseNet (modules live under encoder.features)
    order: tuple[str, ...]         # forward order of the top-level modules
    downsampling: frozenset        # modules that halve the resolution
    level_end: dict                # level -> last kept module
    table: dict                    # level -> (channels, stride, conv layers), default configuration


_SPECS = {
    "resnet50": _ArchSpec(
        container=None,
        order=("conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4"),
        downsampling=frozenset({"conv1", "maxpool", "layer2", "layer3", "layer4"}),
        level_end={1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"},
        table={1: (256, 4, 10), 2: (512, 8, 22), 3: (1024, 16, 40), 4: (2048, 32, 49)},
    ),
    "densenet121": _ArchSpec(
        container="features",
        order=("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2",
               "denseblock3", "transition3", "denseblock4", "norm5"),
        downsampling=frozenset({"conv0", "pool0", "transition1", "transition2", "transition3"}),
        level_end={1: "transition1", 2: "transition2", 3: "transition3", 4: "norm5"},
        table={1: (128, 8, 14), 2: (256, 16, 39), 3: (512, 32, 88), 4: (1024, 32, 120)},
    ),
}
#: Architectures understood by :func:`truncate_encoder` and the truncated networks.
ARCHS = tuple(_SPECS)

#: The paper's named cuts. ResNet50: name -> (stage, bottleneck blocks of that stage kept); every
#: block of the earlier stages is kept, so the main-path conv count is 1 (stem) + 3 per kept block:
#: 25 / 37 / 43 / 46 / 49. DenseNet121: name -> level (Dens-Tk = after dense block k and its
#: transition; Dens-F = the full features).
PAPER_CUTS = {
    "resnet50": {"Res-T1": ("layer3", 1), "Res-T2": ("layer3", 5), "Res-T3": ("layer4", 1),
                 "Res-T4": ("layer4", 2), "Res-T5": ("layer4", 3)},
    "densenet121": {"Dens-T1": 1, "Dens-T2": 2, "Dens-T3": 3, "Dens-F": 4},
}
_RESNET50_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
_RESNET50_STAGE = {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16), "layer4": (2048, 32)}


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class _Cut:
    value: int | str            # what the caller gave, canonical (an int level or the paper's name)
    last_module: str            # last kept top-level module
    blocks: int | None          # ResNet50: blocks kept of ``last_module`` (None: all of it)


def _spec(arch: str) -> _ArchSpec:
    if arch not in _SPECS:
        raise ValueError(f"unknown architecture {arch!r} for truncated transfer; choose one of {list(ARCHS)}")
    return _SPECS[arch]


def _resolve(arch: str, level) -> _Cut:
    """An integer level 1..4 or a paper cut name (``"Res-T1"``; case, ``-`` and ``_`` ignored)."""
    spec = _spec(arch)
    if isinstance(level, str):
        names = {_norm_name(n): n for n in PAPER_CUTS[arch]}
        name = names.get(_norm_name(level))
        if name is not None:
            cut = PAPER_CUTS[arch][name]
            if isinstance(cut, int):
                return _Cut(name, spec.level_end[cut], None)
            return _Cut(name, cut[0], cut[1])
    elif not isinstance(level, bool) and isinstance(level, int) and level in spec.level_end:
        return _Cut(level, spec.level_end[level], None)
    raise ValueError(f"{arch}: truncation level must be one of {sorted(spec.level_end)} (4 = the full encoder) "
                     f"or a cut name {list(PAPER_CUTS[arch])}, got {level!r}")


def _check_level(arch: str, level) -> int | str:
    return _resolve(arch, level).value


def _kept(spec: _ArchSpec, level: int) -> tuple[str, ...]:
    return spec.order[: spec.order.index(spec.level_end[level]) + 1]


def truncation_levels(arch: str) -> list[TruncationLevel]:
    """The integer levels of ``arch`` ("resnet50" or "densenet121") with C_k, s_k and the kept modules."""
    spec = _spec(arch)
    prefix = f"{spec.container}." if spec.container else ""
    out = []
    for level, (channels, stride, convs) in sorted(spec.table.items()):
        out.append(TruncationLevel(level=level, channels=channels, stride=stride,
                                   last_module=prefix + spec.level_end[level],
                                   kept=tuple(prefix + m for m in _kept(spec, level)), conv_layers=convs,
                                   name=f"level{level}"))
    return out


def truncation_cuts(arch: str) -> list[TruncationLevel]:
    """Every cut of ``arch``: the integer levels (:func:`truncation_levels`), then the paper's named
    cuts (:data:`PAPER_CUTS`; DenseNet121's are the levels 1..4 under the paper's names)."""
    spec = _spec(arch)
    out = truncation_levels(arch)
    by_level = {lv.level: lv for lv in out}
    for name, cut in PAPER_CUTS[arch].items():
        if isinstance(cut, int):
            out.append(replace(by_level[cut], level=name, name=name))
            continue
        stage, blocks = cut
        kept = _kept(spec, next(k for k, m in spec.level_end.items() if m == stage))
        convs = 1 + 3 * (sum(_RESNET50_BLOCKS[m] for m in kept[:-1] if m in _RESNET50_BLOCKS) + blocks)
        channels, stride = _RESNET50_STAGE[stage]
        out.append(TruncationLevel(level=name, channels=channels, stride=stride, last_module=stage, kept=kept,
                                   conv_layers=convs, name=name,
                                   blocks=None if blocks == _RESNET50_BLOCKS[stage] else blocks))
    return out


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --- encoders ---------------------------------------------------------------------------------

def resnet50_encoder(in_channels: int = 3) -> nn.Module:
    """MONAI ``resnet50`` in torchvision's 2D ImageNet layout, without its fully-connected layer.

    ``monai.networks.nets.resnet50(spatial_dims=2, n_input_channels=in_channels, conv1_t_size=7,
    conv1_t_stride=2, no_max_pool=False, shortcut_type="B", bias_downsample=False, feed_forward=False)``:
    7x7 stride-2 stem conv, BN, ReLU, 3x3 stride-2 max-pool, bottleneck stages [3, 4, 6, 3] (stride
    on the 3x3 conv, as torchvision v1.5), 1x1-conv + BN shortcuts without bias. MONAI's defaults
    (stride-1 stem, biased shortcuts, 400-class fc) are those of the 3D video ResNets and do not
    match ImageNet checkpoints. Module names ``conv1, bn1, act, maxpool, layer1..layer4`` (same as
    torchvision); random initialisation (MONAI's Kaiming normal), no download.

    Calling the returned module maps ``(B, in_channels, H, W)`` to the pooled ``(B, 2048)``; use
    :func:`truncate_encoder` (level 4) for the ``(B, 2048, H/32, W/32)`` feature map.
    """
    return resnet50(pretrained=False, spatial_dims=2, n_input_channels=in_channels, conv1_t_size=7,
                    conv1_t_stride=2, no_max_pool=False, shortcut_type="B", bias_downsample=False,
                    feed_forward=False)


class DenseNet121Encoder(nn.Module):
    """The ``features`` of MONAI ``DenseNet121(spatial_dims=2)`` (its classifier dropped), then ReLU.

    ``(B, in_channels, H, W)`` -> ``(B, 1024, H/32, W/32)``. State-dict keys are MONAI
    ``DenseNet121``'s ``features.*`` (its ``class_layers.*`` are absent).
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.features = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1, pretrained=False).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


def densenet121_encoder(in_channels: int = 3) -> DenseNet121Encoder:
    """MONAI DenseNet121 features (2D, growth 32, blocks (6, 12, 24, 16), 64 initial features), random init.

    Stem: 7x7 stride-2 conv ``conv0``, ``norm0``, ``relu0``, 3x3 stride-2 max-pool ``pool0``; dense
    blocks ``denseblock1..4`` separated by ``transition1..3`` (BN, ReLU, 1x1 conv halving the
    channels, 2x2 average pool); final ``norm5``. See :class:`DenseNet121Encoder`.
    """
    return DenseNet121Encoder(in_channels)


# --- truncation --------------------------------------------------------------------------------

class TruncatedEncoder(nn.Module):
    """An encoder run up to and including level k; its modules are the source encoder's modules.

    ``forward``: ``(B, C_in, H, W)`` -> ``(B, C_k, H / s_k, W / s_k)`` (:attr:`channels`,
    :attr:`stride`). :meth:`forward_features` also returns the last feature map at every finer
    scale (U-Net skips), shallow to deep, with :attr:`feature_channels` / :attr:`feature_strides`.
    Parameter names are the source's (``conv1.weight``, ``layer2.0.conv1.weight``;
    ``features.denseblock1...``). Build it with :func:`truncate_encoder`.
    """

    def __init__(self, arch: str, level: int | str, modules: list[tuple[str, nn.Module]],
                 taps: list[tuple[str, int, int]], container: str | None, final_relu: bool,
                 dropped: tuple[str, ...] = ()):
        super().__init__()
        if container not in (None, "features"):  # the forwards name the container (TorchScript)
            raise ValueError(f"TruncatedEncoder: container must be None or 'features', got {container!r}")
        self.arch, self.level = arch, level
        self._container = container
        self._names = tuple(name for name, _ in modules)
        # source modules deeper than the cut, relative to the container ("layer3.1", "layer4"):
        # a plain list of str (TorchScript leaves it alone, the forwards never read it)
        self.dropped: list[str] = list(dropped)
        if container:
            self.add_module(container, nn.Sequential(OrderedDict(modules)))
        else:
            for name, module in modules:
                self.add_module(name, module)
        self._final_relu = final_relu
        self._taps = tuple(name for name, _, _ in taps)
        self.feature_channels = tuple(c for _, c, _ in taps)
        self.feature_strides = tuple(s for _, _, s in taps)
        self.channels, self.stride = self.feature_channels[-1], self.feature_strides[-1]

    def _parent(self) -> nn.Module:
        return self._modules[self._container] if self._container else self

    # The forwards run the kept modules through ``named_children`` of the container (``features``,
    # DenseNet121) or of the encoder itself (ResNet50), which TorchScript compiles (it unrolls the
    # loop and resolves ``hasattr`` when compiling); the modules hold nothing else.
    def _tap(self, name: str, x: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        if self._final_relu and name == self._names[-1]:
            x = F.relu(x)
        if name in self._taps:
            feats.append(x)
        return x

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[(B, feature_channels[i], H / feature_strides[i], W / feature_strides[i])]``, shallow to deep."""
        feats: list[torch.Tensor] = []
        if hasattr(self, "features"):
            for name, module in self.features.named_children():
                x = self._tap(name, module(x), feats)
        else:
            for name, module in self.named_children():
                x = self._tap(name, module(x), feats)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "features"):
            for module in self.features.children():
                x = module(x)
        else:
            for module in self.children():
                x = module(x)
        return F.relu(x) if self._final_relu else x

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, level={self.level}, channels={self.channels}, stride={self.stride}"


def _tap_channels(arch: str, root: nn.Module, name: str, module: nn.Module) -> int:
    """Output channels of top-level module ``name`` (kept as ``module``: a stage cut inside is a
    shorter ``nn.Sequential``), read from the modules (not assumed)."""
    if arch == "resnet50":
        if name == "act":
            return root.bn1.num_features
        block = module[-1]
        last_norm = block.bn3 if hasattr(block, "bn3") else block.bn2  # bottleneck / basic block
        return last_norm.num_features
    if name == "relu0":
        return root.norm0.num_features
    if name.startswith("denseblock"):
        nxt = f"transition{name[-1]}"
        return root._modules[nxt].norm.num_features if nxt in root._modules else root.norm5.num_features
    if name.startswith("transition"):
        return root._modules[name].conv.out_channels
    return root.norm5.num_features  # norm5


def truncate_encoder(encoder: nn.Module, arch: str, level: int) -> TruncatedEncoder:
    """The part of ``encoder`` up to and including level ``level``, sharing its parameters.

    Args:
        encoder: ``arch == "resnet50"``: a MONAI ``ResNet`` with the torchvision stem (e.g.
            :func:`resnet50_encoder`; ``conv1`` stride 2 and max-pool are required).
            ``arch == "densenet121"``: any module with MONAI DenseNet ``features`` (
            :func:`densenet121_encoder` or a MONAI ``DenseNet121``).
        arch: "resnet50" or "densenet121".
        level: 1..4, see the module table (4 = the whole encoder, DenseNet121 with the final ReLU),
            or a paper cut name (:data:`PAPER_CUTS`: ``"Res-T1"`` .. ``"Res-T5"``, ``"Dens-T1"`` ..
            ``"Dens-F"``). A ResNet50 cut inside a stage keeps that stage's first blocks as a new
            ``nn.Sequential`` holding the source's block modules under their source names
            (``layer3.0``), so names and parameters are still the source's.

    Returns:
        a :class:`TruncatedEncoder` whose modules *are* the source's (no copy: changing a source
        weight changes the truncated output) under the source names; deeper modules are not
        referenced. ``(B, C, H, W)`` -> ``(B, C_k, H / s_k, W / s_k)``.
    """
    spec = _spec(arch)
    cut = _resolve(arch, level)
    root = getattr(encoder, spec.container) if spec.container and hasattr(encoder, spec.container) else encoder
    if spec.container and root is encoder:
        raise ValueError(f"{arch}: the encoder has no '{spec.container}' module (expected a MONAI DenseNet121 "
                         f"or densenet121_encoder(), got {type(encoder).__name__})")
    absent = [m for m in spec.order if m not in root._modules or root._modules[m] is None]
    if absent:
        raise ValueError(f"{arch}: the encoder ({type(encoder).__name__}) lacks the modules {absent}; "
                         f"expected {list(spec.order)}")
    if arch == "resnet50":
        if getattr(encoder, "no_max_pool", False):
            raise ValueError("resnet50: the encoder was built with no_max_pool=True; the torchvision layout "
                             "(and the strides documented here) needs the max-pool")
        if tuple(root.conv1.stride) != (2, 2):
            raise ValueError(f"resnet50: conv1 has stride {tuple(root.conv1.stride)}; build it with "
                             "conv1_t_stride=2 (torchvision layout), e.g. resnet50_encoder()")
    kept = spec.order[: spec.order.index(cut.last_module) + 1]
    modules = [(m, root._modules[m]) for m in kept]
    dropped = list(spec.order[len(kept):])
    if cut.blocks is not None:
        stage = root._modules[cut.last_module]
        blocks = list(stage.named_children())
        if cut.blocks > len(blocks):
            raise ValueError(f"{arch}: cut {cut.value!r} keeps {cut.blocks} blocks of {cut.last_module}, "
                             f"the encoder's {cut.last_module} has {len(blocks)}")
        if cut.blocks < len(blocks):  # the first blocks, same module objects under the same names
            modules[-1] = (cut.last_module, nn.Sequential(OrderedDict(blocks[: cut.blocks])))
            dropped = [f"{cut.last_module}.{n}" for n, _ in blocks[cut.blocks:]] + dropped
    taps, stride = [], 1
    for i, (name, module) in enumerate(modules):
        stride *= 2 if name in spec.downsampling else 1
        last = i == len(kept) - 1
        if last or (kept[i + 1] in spec.downsampling and stride > 1):
            taps.append((name, _tap_channels(arch, root, name, module), stride))
    final_relu = arch == "densenet121" and kept[-1] == "norm5"
    return TruncatedEncoder(arch, cut.value, modules, taps, spec.container, final_relu, tuple(dropped))


# --- checkpoint keys ---------------------------------------------------------------------------

_TV_DENSE = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(.+)$")


def truncated_key(key: str) -> str:
    """A pretrained encoder's checkpoint key as a truncated network names it: ``encoder.`` + the
    encoder key (an ``encoder.`` prefix of the source, e.g. a pretraining encoder classifier, is
    not doubled); torchvision DenseNet keys ``denselayerN.norm1`` / ``norm.1`` become MONAI's
    ``denselayerN.layers.norm1``. Pure key naming: the weights are loaded by
    :func:`medxfer.transfer.weights.init_from_checkpoint` (transfer mode ``encoder_only``)."""
    if key.startswith("encoder."):
        key = key[len("encoder."):]
    if ".layers." not in key:  # torchvision DenseNet: denselayerN.norm1 / norm.1 -> denselayerN.layers.norm1
        m = _TV_DENSE.match(key)
        if m:
            key = f"{m.group(1)}.layers.{m.group(2)}{m.group(3)}.{m.group(4)}"
    return "encoder." + key


def _build_truncated(arch: str, level: int | str, in_channels: int) -> TruncatedEncoder:
    _check_level(arch, level)
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    full = resnet50_encoder(in_channels) if arch == "resnet50" else densenet121_encoder(in_channels)
    return truncate_encoder(full, arch, level)


def truncated_layout(network: nn.Module | None) -> ArchLayout:
    """:class:`~medxfer.networks.layout.ArchLayout` of a :class:`TruncatedClassifier` or
    :class:`TruncatedSegmenter`: one encoder level (``encoder``: everything kept), the decoder stages
    of a segmenter, head ``head``; the penultimate encoder module is the second-to-last kept encoder
    module with parameters (``encoder.layer1`` for ResNet50 level 2, ``encoder.features.denseblock1``
    for DenseNet121 level 1; a module the segmenter's forward really runs); ``cut_off`` names the source
    encoder's modules deeper than the cut (``encoder.layer4`` ...; the dropped blocks of a stage cut
    inside it, ``encoder.layer3.1`` .. ``encoder.layer3.5`` for Res-T1): a transfer skips their
    checkpoint keys by design."""
    if network is None:
        return ArchLayout("truncated", [["encoder"]], [], ["head"], "encoder")
    encoder = network.encoder
    spec = _spec(encoder.arch)
    prefix = f"encoder.{spec.container}." if spec.container else "encoder."
    kept = [n for n, m in encoder._parent().named_children() if any(True for _ in m.parameters())]
    decoder = getattr(network, "decoder", None)
    return ArchLayout(f"truncated_{encoder.arch}", [["encoder"]],
                      [f"decoder.{i}" for i in range(len(decoder))] if decoder is not None else [], ["head"],
                      prefix + kept[-2] if len(kept) >= 2 else prefix + kept[-1],
                      cut_off=[prefix + m for m in encoder.dropped])


# --- networks ----------------------------------------------------------------------------------

#: Classifier heads: ``flatten`` (the authors' code: flatten the whole feature map, then linear) and
#: ``gap`` (global average pooling, then linear).
HEADS = ("flatten", "gap")


def _pair(size, what: str) -> tuple[int, int]:
    size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"TruncatedClassifier: {what} must be a positive int or (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def _feature_size(encoder: nn.Module, in_channels: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """Spatial size of the encoder's output for ``image_size`` inputs, from a forward pass on the
    meta device (shapes only: no compute, no memory, the real weights and BN statistics untouched)."""
    state = {k: torch.empty_like(v, device="meta") for k, v in encoder.state_dict(keep_vars=True).items()}
    x = torch.empty(1, in_channels, *image_size, device="meta")
    out = torch.func.functional_call(encoder, state, (x,))
    return int(out.shape[2]), int(out.shape[3])


class TruncatedClassifier(nn.Module):
    """Truncated encoder + a new linear head (the paper's Res-T / Dens-T models).

    Head ``flatten`` (default, the authors' code): the whole ``(C_k, h, w)`` feature map flattened
    into ``nn.Linear(C_k * h * w, num_classes)``, so the network is built for one input size
    (``image_size``; 224 in the paper: Res-T1 has a 1024 x 14 x 14 map, 200,704 inputs per class)
    and refuses others with a one-line error. Head ``gap``: global average pooling first
    (``nn.Linear(C_k, num_classes)``, any input size). ResNet50 heads start from Kaiming-normal
    weights (``torch.nn.init.kaiming_normal_``, as the authors' ``resnet50``), DenseNet121 heads from
    PyTorch's default ``nn.Linear`` init (as their ``densenet121``).

    ``forward``: ``(B, in_channels, H, W)`` -> ``(B, num_classes)`` logits: softmax outside for
    multi-class, sigmoid per output for multi-label (CheXpert-style; see
    :mod:`medxfer.workflows.truncated_classification`). Every parameter is trainable.

    Args:
        arch: "resnet50" or "densenet121". level: 1..4 (see the module table) or a paper cut name
            (``"Res-T1"`` .. ``"Res-T5"``, ``"Dens-T1"`` .. ``"Dens-F"``).
        num_classes: outputs of the new head (random init).
        in_channels: image channels (3: ImageNet weights load fully; otherwise ``conv1``/``conv0`` is
            reported as a shape mismatch and keeps its random init).
        dropout: dropout probability before the head (0: none).
        head: ``"flatten"`` or ``"gap"`` (:data:`HEADS`).
        image_size: the input size ``H`` or ``(H, W)`` a ``flatten`` head is built for (unused by ``gap``).

    Attributes: ``encoder`` (:class:`TruncatedEncoder`), ``pool`` (identity for ``flatten``),
    ``dropout``, ``head``, ``head_type``.
    """

    def __init__(self, arch: str, level: int | str, num_classes: int, in_channels: int = 3, dropout: float = 0.0,
                 head: str = "flatten", image_size: int | tuple[int, int] = 224):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if head not in HEADS:
            raise ValueError(f"TruncatedClassifier: head must be one of {list(HEADS)}, got {head!r}")
        self.encoder = _build_truncated(arch, level, in_channels)
        self.head_type = head
        if head == "gap":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            self.image_size = [0, 0]  # any size
            self._feature_hw = [1, 1]
        else:
            self.pool = nn.Identity()
            self.image_size = list(_pair(image_size, "image_size"))
            self._feature_hw = list(_feature_size(self.encoder, int(in_channels), tuple(self.image_size)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.encoder.channels * self._feature_hw[0] * self._feature_hw[1], int(num_classes))
        if arch == "resnet50":  # the authors' resnet50 head init; their densenet121 keeps PyTorch's default
            nn.init.kaiming_normal_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pool(self.encoder(x))
        if f.shape[2] != self._feature_hw[0] or f.shape[3] != self._feature_hw[1]:
            raise ValueError("TruncatedClassifier: the flatten head was built for " + str(self.image_size[0]) + "x"
                             + str(self.image_size[1]) + " inputs, got " + str(x.shape[2]) + "x" + str(x.shape[3])
                             + " (build it with that image_size, or use head='gap')")
        return self.head(self.dropout(torch.flatten(f, 1)))


class TruncatedSegmenter(nn.Module):
    """Truncated encoder + a light U-Net decoder back to the input resolution.

    Decoder (MONAI blocks): a 1x1 conv-BN-ReLU ``bottleneck`` maps the level-k feature
    ``(B, C_k, H/s_k, W/s_k)`` to the decoder width; then one stage per factor 2 (log2 s_k stages),
    each a bilinear 2x upsample, concatenation of the encoder skip feature of that scale when there
    is one (:meth:`TruncatedEncoder.forward_features`: the stem at H/2, then the last feature of
    each kept stage) and two 3x3 conv-BN-ReLU (``monai.networks.nets.basic_unet.UpCat``); the last
    stage (H/2 -> H) has no skip. A 1x1 conv ``head`` gives the logits.

    ``forward``: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` logits. Sides that are
    not multiples of s_k (32 for the deep levels) are replicate-padded at the bottom/right up to
    the next multiple and the logits cropped back to ``(H, W)``.

    Args:
        arch, level, in_channels: as :class:`TruncatedClassifier`.
        out_channels: output maps (1 for a binary mask, sigmoid outside).
        decoder_channels: widths of the stage outputs at H/16, H/8, H/4, H/2, H; a level with
            stride s_k uses the last log2(s_k) of them (the bottleneck has the width of the first).
    """

    def __init__(self, arch: str, level: int, out_channels: int, in_channels: int = 3,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)):
        super().__init__()
        if int(out_channels) < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        if len(decoder_channels) != 5 or any(int(c) < 1 for c in decoder_channels):
            raise ValueError(f"decoder_channels must be 5 positive widths (H/16 .. H), got {decoder_channels}")
        self.encoder = _build_truncated(arch, level, in_channels)
        strides, chans = self.encoder.feature_strides, self.encoder.feature_channels
        n_stages = int(strides[-1]).bit_length() - 1            # log2 s_k
        widths = [int(c) for c in decoder_channels[-n_stages:]]
        skip_ch = {s: c for s, c in zip(strides[:-1], chans[:-1])}
        norm, act = "batch", ("relu", {"inplace": True})
        self.bottleneck = Convolution(2, chans[-1], widths[0], kernel_size=1, act=act, norm=norm, bias=False)
        stages, in_ch, scale = [], widths[0], strides[-1]
        for width in widths:
            scale //= 2
            stages.append(UpCat(2, in_ch, skip_ch.get(scale, 0), width, act=act, norm=norm, bias=False,
                                upsample="nontrainable", pre_conv=None, interp_mode="bilinear", align_corners=False))
            in_ch = width
        self.decoder = nn.ModuleList(stages)
        # per stage, the index of its skip in forward_features' list, -1 for none
        self._skip_index = [strides.index(s) if s in skip_ch else -1
                            for s in [strides[-1] // 2 ** (i + 1) for i in range(n_stages)]]
        self.head = Convolution(2, widths[-1], int(out_channels), kernel_size=1, conv_only=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        s = self.encoder.stride
        pad_h, pad_w = (-h) % s, (-w) % s
        if pad_h or pad_w:  # bottom/right replicate padding to a multiple of s_k, cropped below
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        feats = self.encoder.forward_features(x)
        y = self.bottleneck(feats[-1])
        for i, stage in enumerate(self.decoder):
            idx = self._skip_index[i]
            y = stage(y, feats[idx] if idx >= 0 else None)
        return self.head(y)[:, :, :h, :w]
