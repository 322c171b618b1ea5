"""Transfer modes: how a pretrained state dict initialises a target network (SPEC section 4).

==================  =========================================================  ====================
mode                loaded from the checkpoint                                 trained
==================  =========================================================  ====================
``all_but_head``    every key except the head (CC-FV protocol, Yang et al.      everything
                    2023: "all but the last conv")
``frozen_encoder``  every key except the head                                   decoder + head only
                                                                                (TATL-Freeze, thesis
                                                                                "decoder only")
``full``            every key whose shape matches, head included (TATL-NF)      everything
``truncated:k``     encoder levels 1..k only; deeper levels, decoder and head   everything
                    keep their fresh initialisation (truncated TL)
``scratch``         nothing                                                     everything
==================  =========================================================  ====================

Which keys are "head" and "encoder level k" comes from :func:`medxfer.networks.factory.arch_layout`.
Nothing is dropped silently: :class:`TransferReport` lists every loaded key, every checkpoint key
skipped by the mode or absent from the network, every shape mismatch, and every network key left at
its initialisation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from medxfer.networks.factory import ArchLayout, arch_layout

__all__ = ["TRANSFER_MODES", "parse_mode", "apply_transfer", "TransferReport", "trainable_parameters"]

TRANSFER_MODES = ("all_but_head", "frozen_encoder", "full", "truncated:k", "scratch")
logger = logging.getLogger("medxfer.transfer")


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


@dataclass
class TransferReport:
    """What a transfer did, key by key (parameter/buffer names of the target network)."""

    mode: str
    loaded: list[str] = field(default_factory=list)
    skipped_by_mode: list[str] = field(default_factory=list)      # in both, excluded by the mode
    shape_mismatch: dict[str, list] = field(default_factory=dict)  # key -> [checkpoint shape, network shape]
    not_in_network: list[str] = field(default_factory=list)       # checkpoint keys the network lacks
    initialised: list[str] = field(default_factory=list)          # network keys not loaded
    frozen: list[str] = field(default_factory=list)               # parameters with requires_grad False

    def to_dict(self) -> dict:
        return {"mode": self.mode, "counts": {k: len(v) for k, v in self.__dict__.items() if k != "mode"},
                **{k: v for k, v in self.__dict__.items() if k != "mode"}}

    def summary(self) -> str:
        return (f"{self.mode}: loaded {len(self.loaded)}, skipped by mode {len(self.skipped_by_mode)}, "
                f"shape mismatch {len(self.shape_mismatch)}, not in network {len(self.not_in_network)}, "
                f"initialised {len(self.initialised)}, frozen {len(self.frozen)}")


def _wanted(key: str, mode: str, k: int | None, layout: ArchLayout) -> bool:
    if mode == "scratch":
        return False
    if mode in ("all_but_head", "frozen_encoder"):
        return not layout.in_head(key)
    if mode == "truncated":
        level = layout.encoder_level(key)
        return level is not None and level <= k
    return True  # full


def apply_transfer(network: torch.nn.Module, state: Mapping[str, torch.Tensor], mode: str, arch: str,
                   layout: ArchLayout | None = None) -> TransferReport:
    """Load ``state`` into ``network`` as transfer ``mode`` prescribes, freeze what it freezes.

    Args:
        network: the target network, freshly built (its initialisation is kept where not loaded).
        state: the pretrained state dict (wrapper prefixes already stripped).
        mode: one of :data:`TRANSFER_MODES` (``truncated:k`` with an integer ``k``).
        arch: architecture name, for :func:`arch_layout`.

    Returns:
        the :class:`TransferReport`, also logged. ``truncated:k`` with ``k`` larger than the number
        of encoder levels is an error (it would silently mean "whole encoder").
    """
    name, k = parse_mode(mode)
    layout = layout or arch_layout(arch, network)
    if name == "truncated" and k > len(layout.encoder_levels):
        raise ValueError(f"truncated:{k}: {arch} has only {len(layout.encoder_levels)} encoder levels")
    own = network.state_dict()
    report = TransferReport(mode=str(mode))
    to_load = {}
    for key, value in state.items():
        if key not in own:
            report.not_in_network.append(key)
        elif not _wanted(key, name, k, layout):
            report.skipped_by_mode.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.shape_mismatch[key] = [list(value.shape), list(own[key].shape)]
        else:
            to_load[key] = value
    if to_load:
        network.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    report.initialised = sorted(set(own) - set(to_load))
    if name == "frozen_encoder":
        for pname, param in network.named_parameters():
            if layout.encoder_level(pname) is not None:
                param.requires_grad_(False)
                report.frozen.append(pname)
        if not report.frozen:
            raise ValueError(f"frozen_encoder: no encoder parameters found in the {arch} network")
    logger.info("transfer %s", report.summary())
    for key, (src, dst) in report.shape_mismatch.items():
        logger.info("  shape mismatch, not loaded: %s checkpoint %s network %s", key, src, dst)
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
