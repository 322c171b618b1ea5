"""The one weight-transfer path: read a checkpoint, load it into a network as a transfer mode says,
report every key (SPEC section 4).

*Reading* (:func:`read_checkpoint`): always ``torch.load(weights_only=True)``, so a checkpoint that
holds pickled Python objects is refused without executing it; trainer containers are unwrapped
(``{"state_dict": ...}``, ``{"model": ...}``, MONAI CheckpointSaver's ``{"network": ...}``,
nnU-Net's ``{"network_weights": ...}``, ``model_state_dict``, ``net``); wrapper prefixes
``module.`` (DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) are stripped, and
``encoder.`` too when asked. Every problem is a :class:`CheckpointError` naming the file. The model
bank adds its own integrity check (sha256 against the manifest) before calling this reader.

*Loading* (:func:`init_from_checkpoint`): one vocabulary of transfer modes, one per-key
:class:`TransferReport`:

==================  =========================================================  ====================
mode                loaded from the checkpoint                                 trained
==================  =========================================================  ====================
``all_but_head``    every key except the head (CC-FV protocol, Yang et al.      everything
                    2023: "all but the last conv")
``frozen_encoder``  every key except the head                                   decoder + head only
``full``            every key, head included (TATL-NF: same classes)            everything
``truncated:k``     encoder levels 1..k only; deeper levels, decoder and head   everything
                    keep their fresh initialisation (truncated TL)
``encoder_only``    the encoder (every level); decoder and head stay fresh      everything
                    (thesis "full fine-tuning" from a pretrained encoder,
                    ImageNet encoders, truncated encoders)
``decoder_only``    the encoder, which is then frozen (thesis "decoder only")   decoder + head only
``scratch``         nothing                                                     everything
==================  =========================================================  ====================

Which keys are "head" and "encoder level k" comes from the network's
:class:`~medxfer.networks.layout.ArchLayout` (:func:`medxfer.networks.arch_layout`).

*Contract* (:func:`required_keys`): after loading, every network tensor the mode promises must have
come from the checkpoint (same name, same shape): ``all_but_head`` / ``frozen_encoder`` every tensor
but the head's, ``full`` every tensor, ``encoder_only`` / ``decoder_only`` / ImageNet encoders
(:func:`load_encoder_weights`) every encoder tensor, ``truncated:k`` every tensor of encoder levels
1..k, ``scratch`` none (BatchNorm ``num_batches_tracked`` counters are never required: converted
files often lack them and they do not change the function). A shortfall raises a one-line
:class:`PartialTransferError` (the file, the mode, "loaded N of M required tensors", the first
missing / mismatched keys with shapes) before the network is touched, unless the caller passes
``allow_partial=True`` (e.g. an RGB encoder on a grey-scale task: the first conv keeps its
initialisation). A checkpoint of which no weight tensor fits the network at all is always an error
(:class:`NoMatchingWeights`): a wrong ``arch`` / ``arch_kwargs``, not a partial transfer. Chosen
because a transfer that quietly loads less than its mode says trains a different experiment
with exit 0 (issue 13). The report is logged as one line on logger ``medxfer.transfer``: WARNING
whenever a required tensor was not loaded or a checkpoint tensor was neither loaded nor skipped by
the mode (other shape, absent from the network), INFO otherwise.

Nothing is dropped silently: the report lists every loaded key, every checkpoint key skipped by the mode
(or cut off by a truncated network), absent from the network or of another shape, every network
key left at its initialisation, and every frozen parameter. Checkpoints named otherwise (the
EfficientNet-PyTorch file, torchvision DenseNet, a truncated network's ``encoder.`` keys) are
mapped by a ``key_map`` from the network's module (:func:`load_pretrained`).
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass, field, fields, replace
from os import PathLike
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from medxfer.networks import ArchLayout, arch_layout
from medxfer.networks.effnet_unet import ENCODER_PREFIX, lukemelas_key
from medxfer.networks.truncated import truncated_key

__all__ = ["CheckpointError", "CheckpointNotFound", "PartialTransferError", "NoMatchingWeights", "required_keys",
           "WRAPPER_PREFIXES", "CONTAINER_KEYS", "TRANSFER_MODES", "strip_prefixes",
           "read_checkpoint", "as_state_dict", "TransferReport", "parse_mode", "init_from_checkpoint",
           "freeze_encoder", "load_pretrained", "load_encoder_weights", "effb0_key_map", "truncated_encoder_weights", "resize_position_embeddings",
           "trainable_parameters"]

logger = logging.getLogger("medxfer.transfer")

#: Prefixes added by wrappers: DistributedDataParallel / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Keys under which trainers store the state dict (MONAI CheckpointSaver, nnU-Net, Lightning-style, others).
CONTAINER_KEYS = ("state_dict", "model_state_dict", "network_weights", "network", "model", "net")
#: The transfer modes (``truncated:k`` with an integer k >= 1).
TRANSFER_MODES = ("all_but_head", "frozen_encoder", "full", "truncated:k", "encoder_only", "decoder_only", "scratch")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or not a state dict. The message names the file."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


class PartialTransferError(CheckpointError):
    """A transfer would load fewer tensors than its mode requires (see the module doc); ``report``
    holds what it would have loaded. Pass ``allow_partial=True`` to accept it."""

    def __init__(self, path, reason: str, report: "TransferReport | None" = None):
        super().__init__(path, reason)
        self.report = report


class NoMatchingWeights(CheckpointError):
    """No weight tensor of the checkpoint fits the network (name and shape): another architecture
    or other ``arch_kwargs``. Never accepted as a partial transfer."""


def strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: Sequence[str] = WRAPPER_PREFIXES) -> dict[str, torch.Tensor]:
    """Remove ``prefixes`` (repeatedly: ``module._orig_mod.x`` -> ``x``) from every key."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def as_state_dict(obj, source, strip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """``obj`` (what ``torch.load`` returned, or a mapping in memory) as a flat state dict: trainer
    containers (:data:`CONTAINER_KEYS`) unwrapped while the level holds no tensor, wrapper prefixes
    and ``strip`` removed. Raises :class:`CheckpointError` naming ``source``."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(torch.is_tensor(v) for v in obj.values()):
            inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(source, "not a state dict (expected a mapping of parameter names to tensors, or a "
                                      f"checkpoint holding one under one of {list(CONTAINER_KEYS)})")
    bad = next((k for k, v in obj.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise CheckpointError(source, f"not a state dict: entry {bad!r} holds a {type(obj[bad]).__name__}, not a tensor")
    return strip_prefixes(obj, (*WRAPPER_PREFIXES, *strip))


def read_checkpoint(path, map_location="cpu", strip: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read with ``torch.load(weights_only=True)`` (see the module doc).

    Args:
        path: a ``.pt`` / ``.pth`` file.
        strip: extra key prefixes to remove (e.g. ``("encoder.",)``), after the wrapper prefixes.

    Raises:
        CheckpointError: naming the file: not found, not a readable PyTorch checkpoint, holding
            pickled Python objects (refused, not executed), or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFound(path, "checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(path, "refused: the checkpoint holds pickled Python objects, not only tensors "
                                    f"(torch.load weights_only=True: {first}). Re-save it as a plain state dict "
                                    "(torch.save(network.state_dict(), path)).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from None
    return as_state_dict(obj, path, strip)


@dataclass
class TransferReport:
    """What a transfer did, key by key (parameter/buffer names of the target network)."""

    mode: str
    loaded: list[str] = field(default_factory=list)
    skipped_by_mode: list[str] = field(default_factory=list)      # in the checkpoint, excluded by the mode or cut off
    shape_mismatch: dict[str, list] = field(default_factory=dict)  # key -> [checkpoint shape, network shape]
    not_in_network: list[str] = field(default_factory=list)       # checkpoint keys the network lacks
    initialised: list[str] = field(default_factory=list)          # network keys not loaded
    frozen: list[str] = field(default_factory=list)               # parameters with requires_grad False
    required: list[str] = field(default_factory=list)             # network keys the mode's contract requires
    missing: list[str] = field(default_factory=list)              # required keys not loaded (absent or other shape)
    source: str = ""                                              # the file (or "state dict")
    naming: str = ""                                              # key naming of a foreign checkpoint, if mapped
    position_embeddings_resized: bool = False                     # ViT position embeddings resampled
    allow_partial: bool = False                                   # the caller accepted a shortfall

    def _lists(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), (list, dict))}

    def to_dict(self) -> dict:
        lists = self._lists()
        return {"mode": self.mode, "source": self.source, "naming": self.naming,
                "position_embeddings_resized": self.position_embeddings_resized,
                "allow_partial": self.allow_partial, "complete": self.complete,
                "counts": {k: len(v) for k, v in lists.items()}, **lists}

    def summary(self) -> str:
        return (f"{self.mode}{' from ' + self.source if self.source else ''}: loaded {len(self.loaded)}, "
                f"skipped by mode {len(self.skipped_by_mode)}, shape mismatch {len(self.shape_mismatch)}, "
                f"not in network {len(self.not_in_network)}, initialised {len(self.initialised)}, "
                f"frozen {len(self.frozen)}")

    @property
    def complete(self) -> bool:
        """Every required tensor loaded and every checkpoint tensor either loaded or skipped by the
        mode (nothing of another shape, nothing the network lacks)."""
        return not (self.missing or self.shape_mismatch or self.not_in_network)

    def line(self, examples: int = 3) -> str:
        """The one-line summary that is logged (WARNING when not :attr:`complete`)."""
        loaded = set(self.loaded)
        parts = [f"loaded {len(self.loaded)}/{len(self.loaded) + len(self.initialised)}"
                 f" (required {sum(k in loaded for k in self.required)}/{len(self.required)})"]
        absent = [k for k in self.missing if k not in self.shape_mismatch]
        if absent:
            parts.append(f"missing {len(absent)} ({_examples(absent, examples)})")
        if self.shape_mismatch:
            parts.append(f"shape mismatch {len(self.shape_mismatch)} ({_shape_examples(self.shape_mismatch, examples)})")
        if self.not_in_network:
            parts.append(f"not in network {len(self.not_in_network)} ({_examples(self.not_in_network, examples)})")
        parts.append(f"skipped by mode {len(self.skipped_by_mode)}")
        parts.append(f"initialised {len(self.initialised)}")
        if self.frozen:
            parts.append(f"frozen {len(self.frozen)}")
        if not self.complete and self.allow_partial:
            parts.append("partial transfer accepted (allow_partial)")
        return f"transfer {self.mode}{' from ' + self.source if self.source else ''}: " + ", ".join(parts)


def _examples(keys: Sequence[str], n: int) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _shape(shape) -> str:
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


def _shape_examples(mismatch: Mapping[str, list], n: int) -> str:
    items = list(mismatch.items())
    text = ", ".join(f"{k} {_shape(src)} vs {_shape(dst)}" for k, (src, dst) in items[:n])
    return text + (", ..." if len(items) > n else "")


def parse_mode(mode: str) -> tuple[str, int | None]:
    """``"truncated:3"`` -> ``("truncated", 3)``; other modes -> ``(mode, None)``; unknown -> ValueError."""
    mode = str(mode).strip()
    if mode.startswith("truncated"):
        _, _, k = mode.partition(":")
        if not k.strip().isdigit() or int(k) < 1:
            raise ValueError(f"transfer mode {mode!r}: write truncated:k with k >= 1 encoder levels to keep")
        return "truncated", int(k)
    if mode not in TRANSFER_MODES:
        raise ValueError(f"unknown transfer mode {mode!r}; choose one of {list(TRANSFER_MODES)}")
    return mode, None


def _wanted(key: str, mode: str, k: int | None, layout: ArchLayout) -> bool:
    if mode == "scratch":
        return False
    if mode in ("all_but_head", "frozen_encoder"):
        return not layout.in_head(key)
    if mode == "truncated":
        level = layout.encoder_level(key)
        return level is not None and level <= k
    if mode in ("encoder_only", "decoder_only"):
        return layout.encoder_level(key) is not None
    return True  # full


def required_keys(network_keys, mode: str, layout: ArchLayout) -> list[str]:
    """The network keys transfer ``mode`` must load (its contract, see the module doc): every key
    the mode takes from the checkpoint, BatchNorm ``num_batches_tracked`` counters excepted."""
    name, k = parse_mode(mode)
    return sorted(key for key in network_keys
                  if _wanted(key, name, k, layout) and not key.endswith("num_batches_tracked"))


def freeze_encoder(network: torch.nn.Module, layout: ArchLayout, batchnorm_inference: bool = False) -> list[str]:
    """``requires_grad=False`` on every encoder parameter; returns their names (an error when there
    is none). ``batchnorm_inference``: the encoder's batch-norm layers also keep their running
    statistics (inference mode) while the network trains, as Keras does for non-trainable layers
    (TATL-Freeze)."""
    frozen = []
    for name, param in network.named_parameters():
        if layout.encoder_level(name) is not None:
            param.requires_grad_(False)
            frozen.append(name)
    if not frozen:
        raise ValueError(f"no encoder parameters found to freeze in the {layout.arch} network")
    if batchnorm_inference:
        norms = [m for name, m in network.named_modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and layout.encoder_level(name) is not None]

        def inference_mode(module, args):
            for m in norms:
                m.eval()

        if norms:
            network.register_forward_pre_hook(inference_mode)
    return frozen


def init_from_checkpoint(network: torch.nn.Module, state: Mapping[str, torch.Tensor], mode: str,
                         layout: ArchLayout | str, *, key_map: Callable[[str], str] | None = None,
                         source: str = "", freeze: bool | None = None,
                         batchnorm_inference: bool = False, allow_partial: bool = False,
                         strict: bool = False) -> TransferReport:
    """Load ``state`` into ``network`` as transfer ``mode`` prescribes, check the mode's contract,
    freeze what it freezes.

    Args:
        network: the target network, freshly built (its initialisation is kept where not loaded).
        state: the pretrained state dict (:func:`read_checkpoint`).
        mode: one of :data:`TRANSFER_MODES`.
        layout: the network's :class:`ArchLayout`, or its registered arch name.
        key_map: checkpoint key -> network key, for checkpoints named otherwise.
        source: recorded in the report and named by errors (the file).
        freeze: override the mode's freezing of the encoder (``True``: freeze it, e.g. TATL-Freeze
            = ``full`` + frozen encoder); ``None``: as the mode says.
        batchnorm_inference: frozen encoder batch norms keep their running statistics (see
            :func:`freeze_encoder`).
        allow_partial: accept a transfer that loads fewer tensors than the mode requires (logged
            at WARNING); default: :class:`PartialTransferError`.
        strict: refuse anything but a complete transfer (also a checkpoint tensor the network
            lacks), whatever ``allow_partial`` says.

    Returns:
        the :class:`TransferReport`, also logged as one line (WARNING unless complete).

    Raises:
        NoMatchingWeights: (mode other than ``scratch``) no weight tensor of ``state`` fits the
            network by name and shape; never accepted.
        PartialTransferError: the contract is not met (see the module doc) and not
            ``allow_partial``, or ``strict`` and the transfer is not complete. Raised before the
            network is changed.
        ValueError: an unknown mode, or ``truncated:k`` with ``k`` larger than the number of
            encoder levels (it would silently mean "whole encoder").
    """
    name, k = parse_mode(mode)
    if isinstance(layout, str):
        layout = arch_layout(layout, network)
    if name == "truncated" and k > len(layout.encoder_levels):
        raise ValueError(f"truncated:{k}: {layout.arch} has only {len(layout.encoder_levels)} encoder levels")
    own = network.state_dict()
    report = TransferReport(mode=str(mode), source=str(source), allow_partial=bool(allow_partial))
    to_load, fits = {}, False
    for key, value in state.items():
        key = key_map(key) if key_map is not None else key
        if key in own and tuple(value.shape) == tuple(own[key].shape) and value.ndim >= 2:
            fits = True
        if key not in own:
            (report.skipped_by_mode if layout.is_cut_off(key) else report.not_in_network).append(key)
        elif not _wanted(key, name, k, layout):
            report.skipped_by_mode.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.shape_mismatch[key] = [list(value.shape), list(own[key].shape)]
        else:
            to_load[key] = value
    report.loaded = sorted(to_load)
    report.initialised = sorted(set(own) - set(to_load))
    report.required = required_keys(own, mode, layout)
    report.missing = sorted(set(report.required) - set(to_load))
    if name != "scratch" and not fits:
        raise NoMatchingWeights(source or "state dict", _no_match_reason(own, state, layout, report))
    if (report.missing and not allow_partial) or (strict and not report.complete):
        raise PartialTransferError(source or "state dict", _shortfall_reason(own, report, strict), report)
    if to_load:
        network.load_state_dict(to_load, strict=False)
    if freeze if freeze is not None else name in ("frozen_encoder", "decoder_only"):
        report.frozen = freeze_encoder(network, layout, batchnorm_inference)
    (logger.info if report.complete else logger.warning)("%s", report.line())
    return report


def _no_match_reason(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], layout: ArchLayout,
                     report: TransferReport) -> str:
    if not state:
        return f"the checkpoint holds no tensor; transfer {report.mode} needs {len(report.required)} of the {layout.arch} network"
    return (f"no tensor matches the {layout.arch} network (transfer {report.mode} would load 0 of "
            f"{len(report.required)} required tensors; not in network {len(report.not_in_network)}, shape mismatch "
            f"{len(report.shape_mismatch)}; the network's keys look like {next(iter(own))!r}, the file's like "
            f"{next(iter(state))!r}): the weights are of another architecture or other arch_kwargs")


def _shortfall_reason(own: Mapping[str, torch.Tensor], report: TransferReport, strict: bool, n: int = 3) -> str:
    loaded = set(report.loaded)
    parts = [f"{'strict ' if strict else ''}transfer {report.mode} loaded "
             f"{sum(k in loaded for k in report.required)} of {len(report.required)} required tensors"]
    absent = [k for k in report.missing if k not in report.shape_mismatch]
    if report.shape_mismatch:
        parts.append(f"shape mismatch {len(report.shape_mismatch)} (checkpoint vs network: "
                     f"{_shape_examples(report.shape_mismatch, n)})")
    if absent:
        shown = ", ".join(f"{k} {_shape(own[k].shape)}" for k in absent[:n]) + (", ..." if len(absent) > n else "")
        parts.append(f"missing from the checkpoint {len(absent)} ({shown})")
    if strict and report.not_in_network:
        parts.append(f"not in network {len(report.not_in_network)} ({_examples(report.not_in_network, n)})")
    hint = ("" if strict else "; pass allow_partial=True (bundle configs: --allow_partial true) to accept a "
            "partial transfer, or choose the transfer mode that matches the checkpoint")
    return "; ".join(parts) + hint


def _source_state(weights, source: str = "") -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(weights, (str, PathLike)):
        return read_checkpoint(weights), str(weights)
    if isinstance(weights, Mapping):
        return as_state_dict(weights, source or "state dict"), source or "state dict"
    raise ValueError(f"weights must be a state dict or a file path, got {type(weights).__name__}")


def load_pretrained(network: torch.nn.Module, weights, layout: ArchLayout | str, mode: str = "encoder_only", *,
                    key_map: Callable[[str], str] | None = None, strict: bool = False,
                    allow_partial: bool = False, source: str = "") -> TransferReport:
    """:func:`init_from_checkpoint` from a file or a state dict in memory (:func:`read_checkpoint` /
    :func:`as_state_dict`). ``source``: the name errors and the report give a state dict in memory
    (e.g. the bank file it was read from); a file is named by its path.

    Raises:
        CheckpointError: the file (see :func:`read_checkpoint`); :class:`NoMatchingWeights` when no
            weight tensor (``ndim >= 2``) of the network matches (an unrelated file);
            :class:`PartialTransferError` when the mode's contract is not met (unless
            ``allow_partial``) or, with ``strict``, when the transfer is not complete.
    """
    state, name = _source_state(weights, source)
    return init_from_checkpoint(network, state, mode, layout, key_map=key_map, source=name, strict=strict,
                                allow_partial=allow_partial)


def effb0_key_map(network: torch.nn.Module) -> Callable[[str], str]:
    """Checkpoint key -> key of the EfficientNet-b0 segmenter ``network`` (U or Link shape):
    ``encoder.*`` keys as they are, bare MONAI encoder keys (``_blocks.<stack>.<i>.*``) under
    ``encoder.``, and EfficientNet-PyTorch keys (flat ``_blocks.<i>.*``, :func:`lukemelas_key`)
    mapped back to MONAI's nesting."""
    own = set(network.state_dict())
    flat = {lukemelas_key(k[len(ENCODER_PREFIX):]): k for k in own if k.startswith(ENCODER_PREFIX)}

    def key_map(key: str) -> str:
        if key in own or key.startswith(("decoder.", "segmentation_head.")):
            return key
        if ENCODER_PREFIX + key in own:
            return ENCODER_PREFIX + key
        return flat.get(key, key)

    return key_map


def _effb0_naming(state: Mapping[str, torch.Tensor], key_map: Callable[[str], str], report: TransferReport) -> str:
    """Naming of the loaded checkpoint keys: ``monai`` (``encoder.*`` or nested ``_blocks.<stack>.<i>``),
    ``lukemelas`` (flat ``_blocks.<i>``), ``mixed``; ``common`` when no loaded key tells (only
    stem / head keys, named alike in both)."""
    loaded, namings = set(report.loaded), set()
    for key in state:
        target = key_map(key)
        if target not in loaded:
            continue
        if key == target:
            namings.add("monai")
        elif ENCODER_PREFIX + key == target:
            if lukemelas_key(key) != key:  # a nested MONAI _blocks key
                namings.add("monai")
        else:
            namings.add("lukemelas")
    return namings.pop() if len(namings) == 1 else ("mixed" if namings else "common")


def load_encoder_weights(network: torch.nn.Module, weights, strict: bool = False,
                         allow_partial: bool = False) -> TransferReport:
    """EfficientNet-b0 encoder weights (a local file or a state dict) into a TATL segmenter's encoder.

    Accepted: a full ``FlexibleUNet`` / ``LinkNetEffB0`` state dict (decoder and head keys are
    skipped by the mode), a MONAI encoder state dict, or the EfficientNet-PyTorch file that
    ``pretrained=True`` would download (``efficientnet-b0-355c32eb.pth``). Contract: every encoder
    tensor is loaded (``num_batches_tracked`` counters excepted); otherwise
    :class:`PartialTransferError`, unless ``allow_partial`` (e.g. ``in_channels != 3``: the
    ``_conv_stem`` keeps its initialisation), which loads the rest and logs the report at WARNING.
    The report's ``naming`` says which naming the file had.
    """
    net = getattr(network, "module", network)
    layout = arch_layout("linknet_effb0" if type(net).__name__ == "LinkNetEffB0" else "unet_effb0", net)
    # a full U / Link checkpoint's decoder and head (of either shape) are skipped by design, not unknown
    layout = replace(layout, cut_off=[*layout.cut_off, "decoder", "segmentation_head"])
    state, source = _source_state(weights)
    key_map = effb0_key_map(net)
    report = init_from_checkpoint(net, state, "encoder_only", layout, key_map=key_map, source=source, strict=strict,
                                  allow_partial=allow_partial)
    report.naming = _effb0_naming(state, key_map, report)
    return report


def resize_position_embeddings(state: Mapping[str, torch.Tensor], source_grid: Sequence[int],
                               target_grid: Sequence[int], key: str = "vit.patch_embedding.position_embeddings"
                               ) -> tuple[dict, bool]:
    """A ViT's learned position embeddings resampled to another patch grid (trilinear / bilinear),
    as ViT / DeiT do when fine-tuning at another resolution; written by hand (MONAI's UNETR has no
    such helper). ``state[key]`` is ``(1, prod(source_grid), hidden)``; the result is
    ``(1, prod(target_grid), hidden)``. Returns ``(new state, changed)``; unchanged when the grids
    are equal or the key is absent.

    Args:
        source_grid / target_grid: patches per axis, e.g. the pretraining and the fine-tuning patch
            size divided by the ViT patch (16 for UNETR), in the same axis order as the patch.
    """
    source_grid, target_grid = [int(g) for g in source_grid], [int(g) for g in target_grid]
    if key not in state or source_grid == target_grid:
        return dict(state), False
    pos = state[key]
    if pos.ndim != 3 or pos.shape[1] != math.prod(source_grid):
        raise ValueError(f"{key} has shape {tuple(pos.shape)}, not (1, {math.prod(source_grid)}, hidden) for "
                         f"a {source_grid} patch grid")
    hidden = pos.shape[2]
    grid = pos.reshape(1, *source_grid, hidden).movedim(-1, 1).float()  # (1, hidden, *grid), row-major like the ViT
    mode = "trilinear" if len(source_grid) == 3 else "bilinear"
    resized = torch.nn.functional.interpolate(grid, size=target_grid, mode=mode, align_corners=False)
    out = dict(state)
    out[key] = resized.movedim(1, -1).reshape(1, math.prod(target_grid), hidden).to(pos.dtype)
    return out, True


def trainable_parameters(network: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters with ``requires_grad`` (what the optimizer must see after freezing)."""
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters left (everything is frozen)")
    return params


def truncated_encoder_weights(network: torch.nn.Module, weights, mode: str = "encoder_only",
                              allow_partial: bool = False, source: str = "") -> TransferReport:
    """Pretrained ResNet50 / DenseNet121 encoder weights into a truncated network (keys named by
    :func:`~medxfer.networks.truncated.truncated_key`; the levels the cut dropped are skipped and
    listed in ``skipped_by_mode``, and so is the source's classifier: torchvision's ``fc`` /
    ``classifier``, MONAI DenseNet's ``class_layers``, a pretraining encoder classifier's
    ``classifier``). ``mode``: ``encoder_only`` (truncated TL: every kept layer fine-tuned) or
    ``decoder_only`` (the kept encoder frozen); either requires every kept encoder tensor
    (``allow_partial``: accept less, e.g. an RGB encoder on grey-scale images)."""
    arch = f"truncated_{network.encoder.arch}"
    layout = arch_layout(arch, network)
    layout = replace(layout, cut_off=[*layout.cut_off, "encoder.fc", "encoder.classifier", "encoder.class_layers"])
    return load_pretrained(network, weights, layout, mode, key_map=truncated_key, allow_partial=allow_partial,
                           source=source)
