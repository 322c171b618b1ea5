"""The torch device a workflow runs on: ``cuda`` when available, else ``cpu``, unless the user says."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device=None) -> torch.device:
    """``device`` as a :class:`torch.device` (a string like ``"cpu"`` / ``"cuda:1"`` or a device);
    None or ``""`` picks ``cuda`` if available, else ``cpu``."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
