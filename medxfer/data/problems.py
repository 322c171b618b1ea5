"""How data problems are reported: one file, one one-line reason.

Loaders raise :class:`DatasetError` for the first problem they meet; ``medxfer check-data``
collects every :class:`Problem` of a dataset and prints one line per problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

__all__ = ["Problem", "DatasetError", "raise_if_problems", "read_json"]


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset.

    Args:
        path: the file (or folder) that is wrong, as the user would type it.
        reason: one line saying what is wrong with it.
    """

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent. The message names the file."""

    def __init__(self, path: str | PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    @property
    def problem(self) -> Problem:
        return Problem(self.path, self.reason)


def raise_if_problems(problems: list[Problem]) -> None:
    """Raise a :class:`DatasetError` for the first problem; the message counts the others."""
    if not problems:
        return
    first = problems[0]
    more = f" (and {len(problems) - 1} more problem(s); run `medxfer check-data` for all)" if len(problems) > 1 else ""
    raise DatasetError(first.path, first.reason + more)


def read_json(path: str | PathLike, missing: str = "file not found"):
    """Parse a JSON file; :class:`DatasetError` naming the file if it is missing, not text or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(path, missing) from None
    except UnicodeDecodeError as e:
        raise DatasetError(path, f"not a text file: {e}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
