"""Atomic writes: a file appears under its final name complete, or not at all.

Every file medxfer writes that a later step reads (checkpoints, bank manifests, plans, scores,
markers, generated datasets) goes through this module: the content is written to a temporary
name in the *same folder* (same file system, so the rename is atomic), flushed and fsync'ed, and
then renamed over the final name with ``os.replace``. A kill, a full disk or any other error
leaves the previous file (or none) under the final name and removes the temporary one.

OS errors become :class:`WriteError`, whose message is one line naming the path and the cause
(``.../model.pt: no space left on device (ENOSPC) while writing``).

Written by hand: the standard library has no atomic-replace helper, and ignite's ``DiskSaver``
(atomic only for its own checkpoints) is not reachable from plain JSON / YAML / NIfTI writers.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import os
import shutil
import tempfile
from os import PathLike
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["WriteError", "write_error", "atomic_path", "atomic_write_text", "atomic_write_bytes",
           "atomic_torch_save", "atomic_directory"]


class WriteError(OSError):
    """Writing ``path`` failed; ``str()`` is one line: ``<path>: <cause> while writing``."""

    def __init__(self, path: str | PathLike, cause: OSError | str):
        self.path = str(path)
        if isinstance(cause, OSError):
            name = errno.errorcode.get(cause.errno or 0, "")
            reason = (cause.strerror or str(cause)).lower() if cause.strerror else str(cause)
            reason = f"{reason} ({name})" if name else reason
            super().__init__(cause.errno, f"{self.path}: {reason} while writing")
        else:
            super().__init__(errno.EIO, f"{self.path}: {cause}")
        self.reason = self.args[1]

    def __str__(self) -> str:
        return self.reason


def write_error(path, err: OSError) -> WriteError:
    """``err`` as a :class:`WriteError` for ``path`` (a :class:`WriteError` is returned as is)."""
    return err if isinstance(err, WriteError) else WriteError(path, err)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened / synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | PathLike, mode: int | None = 0o644, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it is renamed to
    ``path`` (``mode`` applied first; ``None`` keeps the temporary file's 0600), else removed.

    ``exclusive``: publish only if ``path`` does not exist yet (``os.link``, an atomic
    create-if-absent), else :class:`FileExistsError`: of several processes writing the same file
    at once (the ranks of a multi-GPU run) exactly one wins and the others can read its file.

    For writers that want a file name (``nibabel.save``, ``Image.save``, ``torch.save``)::

        with atomic_path(out / "img.nii.gz") as tmp:
            nib.save(image, tmp)
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # keep the suffixes: writers such as nibabel choose the format from the file name
        fd, name = tempfile.mkstemp(prefix=f".{path.stem.split('.')[0]}-", suffix="".join(path.suffixes) + ".part",
                                    dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    tmp = Path(name)
    tmp_named = tmp.with_name(tmp.name[: -len(".part")]) if path.suffixes else tmp
    # the writer sees the real suffixes (``.nii.gz``); the placeholder from mkstemp reserves the name
    try:
        yield tmp_named
        if not tmp_named.exists():
            raise WriteError(path, "the writer produced no file")
        if mode is not None:
            os.chmod(tmp_named, mode)
        with open(tmp_named, "rb") as f:
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp_named, path)
        else:
            os.replace(tmp_named, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if exclusive and isinstance(e, FileExistsError):
            raise FileExistsError(errno.EEXIST, f"{path}: exists (written meanwhile)") from None
        raise write_error(path, e) from None
    finally:
        for leftover in {tmp, tmp_named}:
            with contextlib.suppress(OSError):
                leftover.unlink()


def atomic_write_bytes(path: str | PathLike, data: bytes, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (``exclusive``: see :func:`atomic_path`); returns the path."""
    with atomic_path(path, exclusive=exclusive) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
    return Path(path)


def atomic_write_text(path: str | PathLike, text: str, encoding: str = "utf-8", exclusive: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (``exclusive``: see :func:`atomic_path`); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding), exclusive=exclusive)


def atomic_torch_save(obj, path: str | PathLike, save: Callable | None = None) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (serialised in memory first, so a failing pickle
    writes nothing); returns the path."""
    import torch

    buffer = io.BytesIO()
    (save or torch.save)(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(path: str | PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block ends without error it becomes
    ``path``, else it is deleted. For generators: a dataset appears complete or not at all.

    An existing ``path`` is an error (:class:`FileExistsError`) unless ``overwrite``: then it is
    replaced only after the new folder is complete (the old one is moved aside, then deleted).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists; choose another folder or pass overwrite")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", suffix=".part", dir=path.parent))
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}-", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp.exists():
            # a writer that failed (nibabel on ENOSPC) may still hold its file open until collected:
            # collect first so removing the folder really frees the space in a long-running process
            gc.collect()
            shutil.rmtree(tmp, ignore_errors=True)
