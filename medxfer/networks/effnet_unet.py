"""U-shape EfficientNet-b0 segmenter of TATL (SPEC section 6), and the encoder it shares with the Link shape.

The U shape is MONAI's ``FlexibleUNet`` (``backbone="efficientnet-b0"``), unchanged: EfficientNet-b0
encoder (Tan & Le 2019, MONAI's port of lukemelas/EfficientNet-PyTorch) and a U-Net decoder
(Ronneberger et al. 2015) whose stages *concatenate* the encoder feature of the same scale
(TATL, Nguyen et al. 2023, section 4.1: "combined by either the adding or concatenating operations").

The encoder is held as ``network.encoder`` (state-dict prefix :data:`ENCODER_PREFIX`), an
``EfficientNetEncoder`` that returns 5 feature maps for an input ``(B, C, H, W)``:

======= ======== ========= ===============================================
level   channels scale     modules (relative to ``encoder``)
======= ======== ========= ===============================================
1       16       H/2       ``_conv_stem``, ``_bn0``, ``_blocks.0``
2       24       H/4       ``_blocks.1``
3       40       H/8       ``_blocks.2``
4       112      H/16      ``_blocks.3``, ``_blocks.4``
5       320      H/32      ``_blocks.5``, ``_blocks.6`` (+ ``_conv_head``, ``_bn1``, ``_fc``: the
                           ImageNet classifier, kept so that state dicts match, unused in forward)
======= ======== ========= ===============================================

:class:`medxfer.networks.linknet.LinkNetEffB0` builds the same encoder the same way, so encoder keys
(and weights) move between U and Link shapes; :func:`effb0_layout` describes both for the transfer
modes (``apply_transfer(..., layout=effb0_layout(arch))``).

Offline weights: ``FlexibleUNet(pretrained=True)`` downloads
``efficientnet-b0-355c32eb.pth`` from GitHub (MONAI ``efficientnet.url_map``) and fails without
internet. Here ``pretrained=True`` never downloads: pass ``weights_file=`` a local copy of that file
(lukemelas naming, ``_blocks.<i>.*`` with a flat block index), or any state dict of a MONAI
EfficientNet-b0 encoder / ``FlexibleUNet`` / ``LinkNetEffB0`` (see :func:`load_encoder_weights`).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from os import PathLike

import torch

from medxfer.networks.factory import ArchLayout

__all__ = [
    "ENCODER_PREFIX", "EFFB0_CHANNELS", "EFFB0_ARCHS", "IMAGENET_URL", "build_effb0_encoder", "unet_effb0",
    "load_encoder_weights", "EncoderWeightsReport", "lukemelas_key", "effb0_layout", "parameter_counts",
]

logger = logging.getLogger("medxfer.networks")

BACKBONE = "efficientnet-b0"
#: State-dict prefix of the encoder in :func:`unet_effb0` and ``LinkNetEffB0`` (FlexibleUNet's attribute).
ENCODER_PREFIX = "encoder."
#: Channels of the 5 encoder feature maps, scales H/2 .. H/32.
EFFB0_CHANNELS = (16, 24, 40, 112, 320)
#: Architecture names understood by :func:`effb0_layout`.
EFFB0_ARCHS = ("unet_effb0", "linknet_effb0")
#: What ``FlexibleUNet(pretrained=True)`` would download (never fetched here).
IMAGENET_URL = "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/efficientnet-b0-355c32eb.pth"
#: Encoder modules of the ImageNet classifier: in the state dict, never used by the segmenters.
UNUSED_ENCODER_MODULES = ("_conv_head", "_bn1", "_fc")


def _no_download(pretrained: bool, weights_file) -> None:
    if pretrained and weights_file is None:
        raise ValueError(
            "pretrained=True would download the ImageNet EfficientNet-b0 weights (" + IMAGENET_URL + "), "
            "which is not possible offline; copy that file here and pass weights_file=<path> instead")


def build_effb0_encoder(in_channels: int = 3, spatial_dims: int = 2) -> torch.nn.Module:
    """The EfficientNet-b0 encoder exactly as ``FlexibleUNet`` builds it, random init, never downloading.

    Same class (MONAI ``EfficientNetEncoder``) and arguments as ``FLEXUNET_BACKBONE``'s registry entry
    (BatchNorm eps 1e-3, momentum 0.01; 1000-class ``_fc`` kept), ``pretrained=False``. The registry
    dict is copied (``FlexibleUNet`` updates it in place).
    """
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    entry = FLEXUNET_BACKBONE.register_dict[BACKBONE]
    params = dict(entry["parameter"])
    params.update({"spatial_dims": spatial_dims, "in_channels": in_channels, "pretrained": False})
    return entry["type"](**params)


def unet_effb0(in_channels: int = 3, out_channels: int = 1, weights_file: str | PathLike | None = None,
               spatial_dims: int = 2, pretrained: bool = False, strict_weights: bool = False,
               **kwargs) -> torch.nn.Module:
    """U-shape segmenter: MONAI ``FlexibleUNet`` with an EfficientNet-b0 encoder (skip concatenation).

    Maps ``(B, in_channels, H, W)`` to ``(B, out_channels, H, W)`` logits (``(B, C, H, W, D)`` for
    ``spatial_dims=3``). ``FlexibleUNet`` pads internally, but keep sides multiples of 32 (TATL
    trains at 384x512) so that both shapes see the same feature maps.

    Args:
        in_channels: image channels (3 for RGB dermoscopy). out_channels: output maps (1: a binary
            mask; apply sigmoid outside).
        weights_file: local encoder weights, loaded by :func:`load_encoder_weights` (ImageNet
            ``efficientnet-b0-355c32eb.pth`` or a state dict of another effb0 segmenter).
            ``None``: random initialisation (MONAI's TensorFlow-style init).
        spatial_dims: 2 (default) or 3.
        pretrained: ``True`` only documents intent; it requires ``weights_file`` (never downloads,
            raises ``ValueError`` without one).
        strict_weights: raise if any encoder key is missing from ``weights_file`` or mismatched.
        kwargs: passed to ``FlexibleUNet`` (``decoder_channels=(256, 128, 64, 32, 16)``,
            ``norm``, ``act``, ``dropout``, ``upsample="nontrainable"``, ``interp_mode``, ``is_pad``...).
    """
    from monai.networks.nets import FlexibleUNet

    backbone = kwargs.pop("backbone", BACKBONE)
    if backbone != BACKBONE:
        raise ValueError(f"unet_effb0: backbone is fixed to {BACKBONE!r}, got {backbone!r}")
    _no_download(pretrained, weights_file)
    net = FlexibleUNet(in_channels=in_channels, out_channels=out_channels, backbone=BACKBONE, pretrained=False,
                       spatial_dims=spatial_dims, **kwargs)
    if weights_file is not None:
        load_encoder_weights(net, weights_file, strict=strict_weights)
    return net


def lukemelas_key(key: str) -> str:
    """MONAI encoder key -> EfficientNet-PyTorch (lukemelas) key: ``_blocks.<stack>.<i>.x`` -> ``_blocks.<i>.x``.

    MONAI nests the blocks per stack but numbers them globally, so dropping the stack index gives
    the flat index of the original implementation (the mapping MONAI's own ``_load_state_dict`` uses).
    Keys outside ``_blocks`` are the same in both.
    """
    return re.sub(r"^_blocks\.\d+\.(\d+\.)", r"_blocks.\1", key)


@dataclass
class EncoderWeightsReport:
    """What :func:`load_encoder_weights` did; keys are encoder keys without :data:`ENCODER_PREFIX`."""

    weights_file: str
    naming: str = ""  # of the _blocks keys: "monai", "lukemelas", "mixed"; "common": no _blocks key loaded
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)              # encoder keys the file lacks
    shape_mismatch: dict[str, list] = field(default_factory=dict)  # key -> [file shape, network shape]
    unexpected: list[str] = field(default_factory=list)           # file keys matching no encoder key
    ignored: list[str] = field(default_factory=list)              # decoder/head keys of a full network

    def summary(self) -> str:
        return (f"{self.weights_file} ({self.naming} naming): loaded {len(self.loaded)} encoder tensors, "
                f"missing {len(self.missing)}, shape mismatch {len(self.shape_mismatch)}, "
                f"unexpected {len(self.unexpected)}, ignored decoder/head keys {len(self.ignored)}")


_WRAPPERS = ("state_dict", "model_state_dict", "model", "network", "net")
_STRIP = ("module.", "_orig_mod.")


def _read_state_dict(weights_file) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled modules, foreign formats: weights_only refuses them
        raise ValueError(f"{weights_file}: cannot be read as a state dict with torch.load(weights_only=True) "
                         f"(save network.state_dict(), not the module): {err}") from err
    for _ in range(2):  # {"state_dict": {...}}, {"model": {...}}, checkpoint dicts of trainers
        if isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{weights_file}: not a state dict (expected a mapping of parameter names to tensors, "
                         f"or a checkpoint holding one under {list(_WRAPPERS)})")
    state = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        for prefix in _STRIP:
            key = key[len(prefix):] if key.startswith(prefix) else key
        state[key] = value
    return state


def load_encoder_weights(network: torch.nn.Module, weights_file: str | PathLike,
                         strict: bool = False) -> EncoderWeightsReport:
    """Load EfficientNet-b0 encoder weights from a local file into ``network.encoder``.

    Accepted (``torch.load(weights_only=True)``; ``module.`` / ``_orig_mod.`` prefixes and
    ``{"state_dict"|"model"|"network": ...}`` wrappers are looked through):

    - a full ``FlexibleUNet`` / ``LinkNetEffB0`` state dict (``encoder.*`` keys; decoder and head
      keys are ignored and counted);
    - a MONAI encoder state dict (``EfficientNetBNFeatures`` / ``EfficientNetEncoder`` / ``EfficientNetBN``,
      ``_blocks.<stack>.<i>.*``);
    - the original EfficientNet-PyTorch file that ``pretrained=True`` would download
      (``efficientnet-b0-355c32eb.pth``, flat ``_blocks.<i>.*``, mapped by :func:`lukemelas_key`).

    Tensors whose shape differs (e.g. ``_conv_stem`` for ``in_channels != 3``) keep their
    initialisation. Missing keys, shape mismatches and unexpected keys are reported (a
    ``UserWarning`` and the returned :class:`EncoderWeightsReport`; missing BatchNorm
    ``num_batches_tracked`` counters are not reported: files converted from TensorFlow may lack them).

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file, when no conv/linear weight of the encoder matches (unrelated
            file, or 2D weights for a 3D encoder); with ``strict``, when anything is missing or
            mismatched.
    """
    from pathlib import Path

    path = Path(weights_file)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    encoder = getattr(getattr(network, "module", network), "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(network).__name__} has no 'encoder' attribute to load {path} into")
    file_state = _read_state_dict(path)
    own = encoder.state_dict()
    report = EncoderWeightsReport(weights_file=str(path))
    used, namings, to_load = set(), set(), {}
    for key, value in own.items():
        flat = lukemelas_key(key)  # keys outside _blocks are named alike in both: they tell no naming
        candidates = [(ENCODER_PREFIX + key, "monai"), (key, "monai" if flat != key else None), (flat, "lukemelas")]
        hit = next(((k, n) for k, n in candidates if k in file_state), None)
        if hit is None:
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
            continue
        fkey, naming = hit
        used.add(fkey)
        if tuple(file_state[fkey].shape) != tuple(value.shape):
            report.shape_mismatch[key] = [list(file_state[fkey].shape), list(value.shape)]
            continue
        if naming:
            namings.add(naming)
        to_load[key] = file_state[fkey].to(value.dtype)
    report.naming = namings.pop() if len(namings) == 1 else ("mixed" if namings else "common")
    for fkey in file_state:
        if fkey in used:
            continue
        (report.ignored if fkey.startswith(("decoder.", "segmentation_head.")) else report.unexpected).append(fkey)
    report.loaded = sorted(to_load)
    if not any(own[k].ndim >= 2 for k in to_load):
        raise ValueError(
            f"{path}: no EfficientNet-b0 encoder weight matches this file (expected keys like "
            f"'_conv_stem.weight', '_blocks.1.1._expand_conv.weight' (MONAI), '_blocks.1._expand_conv.weight' "
            f"(EfficientNet-PyTorch) or 'encoder._conv_stem.weight'; the file has e.g. {list(file_state)[:5]}; "
            f"shape mismatches: {len(report.shape_mismatch)})")
    if strict and (report.missing or report.shape_mismatch):
        raise ValueError(f"strict encoder loading failed: {report.summary()}; missing e.g. {report.missing[:5]}, "
                         f"mismatched e.g. {list(report.shape_mismatch.items())[:3]}")
    encoder.load_state_dict(to_load, strict=False)
    logger.info("encoder weights %s", report.summary())
    if report.missing or report.shape_mismatch or report.unexpected:
        warnings.warn(
            f"encoder weights {report.summary()}; missing e.g. {report.missing[:5]}; "
            f"mismatched (kept initialisation) e.g. {list(report.shape_mismatch.items())[:3]}; "
            f"unexpected e.g. {report.unexpected[:5]}", UserWarning, stacklevel=2)
    return report


def effb0_layout(arch: str = "unet_effb0") -> ArchLayout:
    """:class:`~medxfer.networks.factory.ArchLayout` of :func:`unet_effb0` or ``LinkNetEffB0``.

    Both shapes share the encoder levels of the module table; decoder stages are
    ``decoder.blocks.0`` (H/16) .. ``decoder.blocks.4`` (H), head ``segmentation_head``; the
    penultimate encoder level is ``encoder._blocks.4`` (112 channels, H/16).
    """
    if arch not in EFFB0_ARCHS:
        raise ValueError(f"unknown effb0 arch {arch!r}; choose one of {list(EFFB0_ARCHS)}")
    e = ENCODER_PREFIX
    levels = [[e + "_conv_stem", e + "_bn0", e + "_blocks.0"], [e + "_blocks.1"], [e + "_blocks.2"],
              [e + "_blocks.3", e + "_blocks.4"],
              [e + "_blocks.5", e + "_blocks.6"] + [e + m for m in UNUSED_ENCODER_MODULES]]
    return ArchLayout(arch, levels, [f"decoder.blocks.{i}" for i in range(5)], ["segmentation_head"],
                      e + "_blocks.4")


def parameter_counts(network: torch.nn.Module) -> dict[str, int]:
    """Parameters of an effb0 segmenter: ``total``, ``encoder``, ``encoder_used`` (without the unused
    ImageNet classifier ``_conv_head``/``_bn1``/``_fc``), ``decoder``, ``head``."""
    counts = {"total": 0, "encoder": 0, "encoder_used": 0, "decoder": 0, "head": 0}
    unused = tuple(ENCODER_PREFIX + m + "." for m in UNUSED_ENCODER_MODULES)
    for name, p in network.named_parameters():
        counts["total"] += p.numel()
        if name.startswith(ENCODER_PREFIX):
            counts["encoder"] += p.numel()
            counts["encoder_used"] += 0 if name.startswith(unused) else p.numel()
        elif name.startswith("decoder."):
            counts["decoder"] += p.numel()
        elif name.startswith("segmentation_head."):
            counts["head"] += p.numel()
    return counts
