"""Segmentation metrics (SPEC section 9)."""

from medxfer.metrics.segmentation import case_metrics, summarize_cases

__all__ = ["case_metrics", "summarize_cases"]
