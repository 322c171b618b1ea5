"""One-line errors for bundle runs: the cause at the end of stderr, the traceback in a log file.

``python -m monai.bundle run`` of a medxfer config that fails would otherwise end in 60-180 lines
of traceback, most of them MONAI's config machinery: an error raised inside a config expression
(``$...``) or a ``_target_`` component is re-raised as ``RuntimeError("Failed to evaluate ...")``
or ``RuntimeError("Failed to instantiate ...")``, a transform's error as
``RuntimeError("applying transform ...")``, each ``from`` the one below; MONAI's ``StatsHandler``
also logs the whole traceback (``logger.exception``) before ignite re-raises it.

What runs where (MONAI 1.6, ``monai/bundle/scripts.py`` and ``workflows.py``): ``run`` builds a
``ConfigWorkflow`` (reads the files, applies the ``--key value`` overrides), calls
``initialize()`` -- which evaluates the ``initialize`` list of the config in order, the
``imports`` being resolved on the first reference --, then ``run()`` and ``finalize()``;
exceptions propagate out of ``fire`` to the interpreter. MONAI offers no error hook of its own.
The least intrusive place is therefore the first item of each config's ``initialize`` list::

    debug: false
    initialize:
      - {_target_: medxfer.workflows.errors.short_errors, output_dir: "@output_dir", debug: "@debug"}

(a ``_target_`` item, so the config needs no extra ``imports`` line). :func:`short_errors`
installs a ``sys.excepthook``: an uncaught exception is written with its whole traceback to
``<output_dir>/error.log`` and stderr gets one last line, ``medxfer: <cause> (traceback:
<log>)``; the interpreter then exits with status 1, as for any uncaught exception. Tracebacks
attached to log records (``logger.exception``) are dropped from the console through a log-record
factory (the log file has them). Chosen over the alternatives: a wrapper script would change the
documented ``python -m monai.bundle run`` command, a ``sitecustomize`` or patched MONAI class
would act on every Python program; the hook acts only in the bundle's own process and only
after its config asked for it. Errors before ``initialize`` (a config file that does not exist,
a YAML syntax error) stay MONAI's.

``--debug true`` (or the environment variable ``MEDXFER_DEBUG=1``) keeps the full tracebacks
on stderr (the one line and the log file too).

The hook is installed only when the process is ``python -m monai.bundle`` (also each rank of
``torchrun -m monai.bundle``; ranks other than 0 write ``error.rank<R>.log``) and only once:
workflows that run other workflows in the same process (TATL cross-validation, the bank build)
keep the first run's folder. In-process runs (:func:`medxfer.workflows.bundle.run_bundle`,
tests, the ``medxfer`` CLI) get the root cause raised instead (:func:`root_cause`), and the CLI
prints :func:`format_error` of it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

__all__ = ["DEBUG_ENV", "LOG_NAME", "root_cause", "format_error", "debug_enabled", "short_errors",
           "log_file_for", "is_bundle_cli"]

#: Environment variable that turns on full tracebacks (``1``, ``true``, ``yes``, ``on``).
DEBUG_ENV = "MEDXFER_DEBUG"

#: Name of the traceback file in the run's output folder.
LOG_NAME = "error.log"

# The messages of MONAI's re-raising wrappers (config_item.py, utils/module.py, transforms/transform.py);
# a RuntimeError with another message is somebody's real error and is kept.
_MONAI_WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "applying transform")
# torch re-raises a DataLoader worker's exception as "Caught X in DataLoader worker process N.\nOriginal Traceback..."
_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process")
_QUALIFIED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)): (.*)$")

_installed: dict | None = None  # {"log": Path, "debug": bool} once short_errors has installed the hook


def root_cause(exc: BaseException) -> BaseException:
    """The error under MONAI's wrappers: follow ``__cause__`` through every ``RuntimeError`` whose
    message is one of MONAI's re-raises (``Failed to evaluate / instantiate ...``, ``applying
    transform ...``) and stop at the first other exception (ours name the file: a
    ``DatasetError`` raised ``from`` a zlib error is reported as the ``DatasetError``)."""
    seen = set()
    while (type(exc) is RuntimeError and exc.__cause__ is not None and id(exc) not in seen
           and str(exc).startswith(_MONAI_WRAPPERS)):
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _worker_error(text: str) -> str | None:
    """The worker's own error from torch's ``Caught X in DataLoader worker process N.`` message (its
    last line, ``<module.Type>: <message>``): medxfer's errors as their message, others as
    ``<Type>: <message>``; ``None`` for any other message."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines or not _WORKER.match(lines[0]):
        return None
    match = _QUALIFIED.match(lines[-1])
    if match is None:
        return lines[-1]
    name, message = match.groups()
    return message if name.startswith("medxfer.") else f"{name.rsplit('.', 1)[-1]}: {message}"


def _file_being_read(exc: BaseException) -> str | None:
    """The file MONAI's ``LoadImage`` was reading when ``exc`` was raised (its ``__call__`` frame's
    ``filename``, innermost first), else ``None``: a reader's own error (nibabel's ``EOFError`` on a
    truncated ``.nii.gz``) does not say which file it was. Written by hand: MONAI's
    ``apply_transform`` wrapper names the transform, not its input."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__call__" and type(frame.f_locals.get("self")).__name__ == "LoadImage":
            filename = frame.f_locals.get("filename")
            if isinstance(filename, (str, os.PathLike)):
                found = str(filename)
            elif isinstance(filename, (list, tuple)) and filename:
                found = ", ".join(str(f) for f in filename)
        tb = tb.tb_next
    return found


def _is_ours(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "medxfer"


def format_error(exc: BaseException) -> str:
    """One line for ``exc`` (MONAI's wrappers removed with :func:`root_cause`), naming the file
    where the error knows it:

    - medxfer's errors (``DatasetError``, ``CheckpointError``, ``BankError``, ``WriteError``, ...)
      and ``FileExistsError`` / ``FileNotFoundError`` raised with a message: the message, which
      starts with the path (``/data/x.nii.gz: truncated gzip file``);
    - an ``OSError`` carrying ``filename``: ``<file>: <reason> (<ERRNO>)``, e.g.
      ``runs/x/model_final.pt: no space left on device (ENOSPC)``; one without a file name but with
      an errno: ``<reason> (<ERRNO>)``;
    - an error raised while MONAI's ``LoadImage`` read a file (a truncated ``.nii.gz``):
      ``<file>: truncated file (EOFError: ...)`` / ``<file>: cannot be read (<Type>: ...)``;
    - anything else: ``<ExceptionType>: <first line of the message>``.
    """
    exc = root_cause(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    worker = _worker_error(str(exc))
    if worker is not None:
        return worker
    message = _first_line(str(exc))
    if isinstance(exc, OSError) and not _is_ours(exc) and exc.filename is not None and exc.strerror:
        name = errno.errorcode.get(exc.errno or 0, "")
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        return f"{target}: {exc.strerror[0].lower()}{exc.strerror[1:]}" + (f" ({name})" if name else "")
    if isinstance(exc, OSError) and not _is_ours(exc) and exc.errno in errno.errorcode and exc.strerror \
            and len(exc.args) == 2:
        return f"{exc.strerror[0].lower()}{exc.strerror[1:]} ({errno.errorcode[exc.errno]})"
    if message and (_is_ours(exc) or isinstance(exc, (FileExistsError, FileNotFoundError))):
        return message
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    source = _file_being_read(exc)
    if source is not None and source not in message:
        if isinstance(exc, EOFError):
            return f"{source}: truncated file ({text})"
        return f"{source}: cannot be read ({text})"
    return text


def debug_enabled(debug=False) -> bool:
    """``debug`` (a config value: bool or string) or the environment variable :data:`DEBUG_ENV`."""
    def truthy(value) -> bool:
        return str(value).strip().lower() in ("1", "true", "yes", "on")
    return bool(debug is True or truthy(debug) or truthy(os.environ.get(DEBUG_ENV, "")))


def is_bundle_cli() -> bool:
    """Whether this process is ``python -m monai.bundle`` (not an in-process run)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name in ("monai.bundle.__main__", "monai.bundle")


def log_file_for(output_dir) -> Path:
    """``<output_dir>/error.log`` (``error.rank<R>.log`` on distributed ranks other than 0)."""
    rank = os.environ.get("RANK", "0")
    name = LOG_NAME if rank in ("", "0") else f"error.rank{rank}.log"
    return Path(output_dir) / name


def _write_log(path: Path, text: str) -> Path | None:
    """Write the traceback to ``path``, else to a file in the temporary folder (the run's folder may
    be on the full disk that caused the error); ``None`` when neither can be written."""
    candidates = [path, Path(tempfile.gettempdir()) / f"medxfer-error-{os.getpid()}.log"]
    for candidate in candidates:
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            with open(candidate, "w", encoding="utf-8") as f:  # a diagnostic, not an artefact: no atomic rename
                f.write(text)
            return candidate
        except OSError:
            continue
    return None


def _excepthook(exc_type, exc, tb) -> None:
    state = _installed or {}
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    log = _write_log(state["log"], text) if state.get("log") is not None else None
    debug = debug_enabled(state.get("debug", False))
    if debug or log is None:
        sys.stderr.write(text)
    where = f"traceback in {log}" if log is not None else "traceback above: the log file could not be written"
    if debug and log is not None:
        where = f"traceback above and in {log}"
    sys.stderr.write(f"medxfer: {format_error(exc)} ({where})\n")
    sys.stderr.flush()


def _record_factory(inner):
    """Log records without their traceback (``exc_info``/``stack_info``) while debug is off: the
    console line stays one line; the traceback of the error that ends the run is in the log file."""
    def factory(*args, **kwargs):
        record = inner(*args, **kwargs)
        if not debug_enabled((_installed or {}).get("debug", False)) and (record.exc_info or record.stack_info):
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return record
    factory.medxfer_short_errors = True
    return factory


def short_errors(output_dir, debug=False, force: bool = False) -> Path | None:
    """Install the one-line error report for this ``python -m monai.bundle`` process (see the module
    docstring); returns the log file it will write, or ``None`` when nothing was installed (an
    in-process run: not the bundle CLI, unless ``force``). The first call of a process wins;
    ``--debug true`` given to a later call still turns debug on."""
    global _installed
    if not (force or is_bundle_cli()):
        return None
    if _installed is not None:
        _installed["debug"] = _installed["debug"] or debug_enabled(debug)
        return _installed["log"]
    _installed = {"log": log_file_for(output_dir), "debug": debug_enabled(debug)}
    sys.excepthook = _excepthook
    if not getattr(logging.getLogRecordFactory(), "medxfer_short_errors", False):
        logging.setLogRecordFactory(_record_factory(logging.getLogRecordFactory()))
    return _installed["log"]
