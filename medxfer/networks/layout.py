"""Where the parts of a segmentation network live: :class:`ArchLayout`.

MONAI gives the networks; it does not say *which parameters form which part* of each one. Transfer
modes (SPEC section 4: ``all_but_head``, ``frozen_encoder``, ``truncated:k``, ``encoder_only`` ...),
feature extraction for transferability estimation (SPEC section 5: hooks on the decoder stages) and
the robustness score (thesis ch. 4: the second-to-last encoder level) all read it from here. Every
registered network (:mod:`medxfer.networks.registry`) has a layout function returning one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["ArchLayout"]


@dataclass
class ArchLayout:
    """Where the parts of a network live, as names relative to the network (no trailing dot).

    Attributes:
        encoder_levels: ``encoder_levels[k-1]`` = module-name prefixes forming encoder level ``k``.
        decoder_stages: module names whose outputs are the decoder feature maps, deepest first
            (empty for an encoder classifier, which has no decoder).
        head: module-name prefixes of the last (class-specific) block.
        penultimate_encoder: module whose output is the second-to-last encoder level's feature map
            ``(B, C, *spatial)``, the representation the robustness score reads (thesis ch. 4).
        cut_off: module-name prefixes of a *source* network that this network dropped on purpose
            (a truncated encoder's deeper levels): checkpoint keys under them are skipped by the
            transfer, not reported as unknown.
    """

    arch: str
    encoder_levels: list[list[str]]
    decoder_stages: list[str]
    head: list[str] = field(default_factory=list)
    penultimate_encoder: str = ""
    cut_off: list[str] = field(default_factory=list)

    @staticmethod
    def _match(key: str, prefixes: Sequence[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    def in_head(self, key: str) -> bool:
        """Is the parameter / buffer ``key`` part of the head?"""
        return self._match(key, self.head)

    def is_cut_off(self, key: str) -> bool:
        """Does ``key`` belong to a part of the source network this network dropped (``cut_off``)?"""
        return self._match(key, self.cut_off)

    def encoder_level(self, key: str) -> int | None:
        """Encoder level (1-based) of ``key``; ``None`` for decoder / head keys."""
        for level, prefixes in enumerate(self.encoder_levels, start=1):
            if self._match(key, prefixes):
                return level
        return None

    def feature_stages(self) -> list[str]:
        """Modules the feature-based estimators read, deepest first: the decoder stages, or, for a
        network without a decoder (a pretraining encoder classifier), its last two encoder levels."""
        if self.decoder_stages:
            return list(self.decoder_stages)
        return [self.encoder_levels[-1][0], self.penultimate_encoder]
