"""Segmentation losses: TATL's Tversky + soft Jaccard (:mod:`.tversky_jaccard`)."""

from .tversky_jaccard import TverskyJaccardLoss

__all__ = ["TverskyJaccardLoss"]
