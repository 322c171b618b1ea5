"""Preprocessing chains: MSD CT/MR from plans (:mod:`.msd`)."""

from .msd import msd_transforms, normalization_transforms

__all__ = ["msd_transforms", "normalization_transforms"]
