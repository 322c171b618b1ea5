"""Generators that write synthetic data in the real on-disk layouts (MSD, ISIC 2017/2018)."""

from .isic import generate_isic
from .msd import MSD_PROFILES, generate_msd, generate_msd_task

__all__ = ["generate_isic", "generate_msd", "generate_msd_task", "MSD_PROFILES"]
