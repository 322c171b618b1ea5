"""Strict JSON for every report medxfer writes (scores, metrics, evaluations, study summaries).

Python's ``json`` writes ``NaN`` / ``Infinity``, which strict JSON readers (browsers, ``jq``,
other languages) reject. Undefined values (an empty-vs-empty Dice, an estimator undefined on the
data) are therefore written as ``null``; numpy scalars become plain numbers.

Files are written atomically (:func:`medxfer.atomic.atomic_write_text`): a reader, or the next
step after a kill or a full disk, sees the previous file or the complete new one, never half.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from medxfer.atomic import atomic_write_text

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


def write_json(path, obj, exclusive: bool = False, **dumps_kwargs) -> Path:
    """Write :func:`json_safe` ``obj`` to ``path`` atomically (indent 2, trailing newline; the
    folder is created); returns the path.

    The text is made in memory first, so an object that does not serialise writes nothing.
    ``exclusive``: only if ``path`` does not exist yet, else :class:`FileExistsError` (one of
    several concurrent writers wins). OS errors come as :class:`medxfer.atomic.WriteError`
    (one line: path and cause)."""
    path = Path(path)
    text = json.dumps(json_safe(obj), indent=2, **dumps_kwargs) + "\n"
    return atomic_write_text(path, text, exclusive=exclusive)
