"""Generated datasets appear complete or not at all (a full disk or a kill leaves no half set).

A generator writes every file into a staging folder on the same file system as its output and
publishes it with renames only once all are written:

* output folder missing: the staging folder becomes it in one rename
  (:func:`medxfer.atomic.atomic_directory`);
* output folder present (the ISIC generator shares its root with the other year, the 2D
  generators leave foreign entries in place): staging is a hidden ``.medxfer-staging-*.part``
  folder inside it (every loader skips hidden names) and each entry made is renamed over the old
  one, which is moved aside first and deleted last.

So the long part that can fail (rendering, compressing, writing) never touches what the user
had; what remains is a handful of renames, which need no free space. A kill leaves at most a
hidden ``*.part`` folder, never a dataset under its final name.

Written by hand: MONAI and the standard library have no staged-directory publisher.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from os import PathLike
from pathlib import Path
from typing import Iterable, Iterator

from medxfer.atomic import atomic_directory, write_error

__all__ = ["staged_output", "STAGING_PREFIX"]

STAGING_PREFIX = ".medxfer-staging-"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _publish(stage: Path, out: Path, replace: Iterable[str], merge: Iterable[str]) -> None:
    """Move the entries of ``stage`` into ``out`` (see :func:`staged_output`)."""
    merge, made = set(merge), sorted(p.name for p in stage.iterdir())
    try:
        old = Path(tempfile.mkdtemp(prefix=".medxfer-old-", suffix=".part", dir=out))
    except OSError as e:
        raise write_error(out, e) from None
    try:
        for name in made:
            src, dst = stage / name, out / name
            try:
                if name in merge and dst.is_dir() and not dst.is_symlink() and src.is_dir():
                    for child in sorted(src.iterdir()):  # generators write flat folders
                        os.replace(child, dst / child.name)
                else:
                    if _exists(dst):
                        os.replace(dst, old / name)
                    os.replace(src, dst)
            except OSError as e:
                raise write_error(dst, e) from None
        for name in replace:
            if name not in made and _exists(out / name):
                try:
                    os.replace(out / name, old / name)
                except OSError as e:
                    raise write_error(out / name, e) from None
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out: str | PathLike, replace: Iterable[str] = (), merge: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a folder to write a generator's entries of ``out`` into; when the block ends without
    error they are published in ``out``, else the staging folder is deleted (``out`` untouched).
    OS errors come as :class:`medxfer.atomic.WriteError` naming the file or ``out``.

    Args:
        out: the generator's output folder (created, complete, if it does not exist).
        replace: names the generator owns in ``out``: the ones not made this time are removed
            when the new entries are published (an earlier, larger set leaves nothing behind).
        merge: names of existing folders that receive the new files instead of being replaced
            (their other files are kept).
    """
    out = Path(out)
    if not out.exists():
        with atomic_directory(out) as tmp:
            yield tmp
        return
    try:
        stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".part", dir=out))
    except OSError as e:
        raise write_error(out, e) from None
    try:
        yield stage
        _publish(stage, out, replace, merge)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
