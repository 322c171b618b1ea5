"""Preprocessing chains: MSD CT/MR from plans (:mod:`.msd`), dermoscopy RGB (:mod:`.dermoscopy`), 2D
segmentation / classification images (:mod:`.seg2d`); TATL lesion box and crop (:mod:`.lesion_crop`);
the robustness score's colour / intensity jitter (:mod:`.jitter`)."""

from .dermoscopy import dermoscopy_transforms, resize_for_scoring, scoring_transforms
from .msd import msd_transforms, normalization_transforms

__all__ = ["msd_transforms", "normalization_transforms", "dermoscopy_transforms", "scoring_transforms",
           "resize_for_scoring"]
