"""Strict JSON for every report medxfer writes (scores, metrics, evaluations, study summaries).

Python's ``json`` writes ``NaN`` / ``Infinity``, which strict JSON readers (browsers, ``jq``,
other languages) reject. Undefined values (an empty-vs-empty Dice, an estimator undefined on the
data) are therefore written as ``null``; numpy scalars become plain numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = ["json_safe", "write_json"]


def json_safe(obj):
    """``obj`` with NaN / inf -> ``None`` and numpy scalars -> Python numbers, recursively through
    dicts, lists and tuples (tuples become lists)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path, obj, **dumps_kwargs) -> Path:
    """Write :func:`json_safe` ``obj`` to ``path`` (indent 2, trailing newline); returns the path."""
    path = Path(path)
    path.write_text(json.dumps(json_safe(obj), indent=2, **dumps_kwargs) + "\n")
    return path
