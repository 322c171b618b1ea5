"""One-line errors of bundle runs (issue 13, item 6): unwrapping MONAI's re-raises, the one-line
formatter, the excepthook and the log file. The real ``python -m monai.bundle run`` is checked in
``tests/test_model_cards.py``; these run in a fraction of a second."""

from __future__ import annotations

import errno
import io
import logging
import sys

import pytest

from medxfer.atomic import WriteError
from medxfer.data.problems import DatasetError
from medxfer.transfer.weights import CheckpointError
from medxfer.workflows import errors
from medxfer.workflows.bundle import run_bundle
from medxfer.workflows.errors import format_error, root_cause


def _wrapped(exc: BaseException, *messages: str) -> BaseException:
    """``exc`` raised inside MONAI-style wrappers (innermost message first)."""
    for message in messages:
        try:
            raise RuntimeError(message) from exc
        except RuntimeError as wrapper:
            exc = wrapper
    return exc


def test_root_cause_goes_through_monai_wrappers_only():
    data = DatasetError("/data/Task09/imagesTr/x.nii.gz", "truncated gzip file")
    top = _wrapped(data, "applying transform <LoadImaged>", "Failed to instantiate component 'CacheDataset'",
                   "Failed to evaluate ConfigExpression: $@train#trainer.run()")
    assert root_cause(top) is data
    own = RuntimeError("CUDA out of memory")  # somebody's real RuntimeError is kept, not unwrapped
    own.__cause__ = ValueError("below")
    assert root_cause(_wrapped(own, "Failed to evaluate x")) is own
    assert root_cause(data) is data


@pytest.mark.parametrize("exc, line", [
    (DatasetError("/data/Task09/imagesTr/x.nii.gz", "truncated gzip file"), "/data/Task09/imagesTr/x.nii.gz: truncated gzip file"),
    (CheckpointError("bank/checkpoints/a.pt", "not a state dict"), "bank/checkpoints/a.pt: not a state dict"),
    (WriteError("runs/x/model_final.pt", OSError(errno.ENOSPC, "No space left on device")),
     "runs/x/model_final.pt: no space left on device (ENOSPC) while writing"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/model_final.pt"),
     "runs/x/model_final.pt: no space left on device (ENOSPC)"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), "/ro/out: permission denied (EACCES)"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device (ENOSPC)"),
    (FileExistsError("runs/pred: already holds 2 prediction(s)"), "runs/pred: already holds 2 prediction(s)"),
    (ZeroDivisionError("division by zero\nsecond line"), "ZeroDivisionError: division by zero"),
    (KeyError("arch"), "KeyError: 'arch'"),
    (AssertionError(), "AssertionError"),
    (RuntimeError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                  "  File \"x.py\", line 1\nmedxfer.data.problems.DatasetError: /d/a.nii.gz: NaN intensities"),
     "/d/a.nii.gz: NaN intensities"),
])
def test_format_error_is_one_line_naming_the_file(exc, line):
    assert format_error(exc) == line
    assert format_error(_wrapped(exc, "Failed to evaluate ConfigExpression:\n$x")) == line


def test_a_reader_error_names_the_file_monai_was_loading(tmp_path):
    from monai.transforms import LoadImage

    broken = tmp_path / "case_1.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 40)  # a gzip header, then nothing
    with pytest.raises(Exception) as info:
        LoadImage(image_only=True)(str(broken))
    assert format_error(info.value).startswith(f"{broken}: ")


@pytest.fixture
def hook(monkeypatch):
    """A fresh install state; sys.excepthook and the log-record factory restored afterwards."""
    monkeypatch.setattr(errors, "_installed", None)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    factory = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(factory)


def test_short_errors_does_nothing_in_process(hook, tmp_path):
    assert not errors.is_bundle_cli()
    assert errors.short_errors(tmp_path / "out", False) is None
    assert sys.excepthook is not errors._excepthook and errors._installed is None


def test_the_hook_writes_the_traceback_to_the_log_and_one_line_to_stderr(hook, tmp_path, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    log = errors.short_errors(tmp_path / "run", "false", force=True)
    assert log == tmp_path / "run" / "error.log" and sys.excepthook is errors._excepthook
    assert errors.short_errors(tmp_path / "other", False, force=True) == log  # nested workflows keep the first
    try:
        raise _wrapped(DatasetError("/d/x.nii.gz", "cannot read image"), "Failed to evaluate y")
    except RuntimeError as e:
        exc = e
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    sys.excepthook(type(exc), exc, exc.__traceback__)
    assert stderr.getvalue() == f"medxfer: /d/x.nii.gz: cannot read image (traceback in {log})\n"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "DatasetError" in text and "Failed to evaluate y" in text


def test_debug_prints_the_traceback_too(hook, tmp_path, monkeypatch):
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    errors.short_errors(tmp_path / "run", False, force=True)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    exc = ValueError("bad value")
    sys.excepthook(ValueError, exc, None)
    lines = stderr.getvalue().splitlines()
    assert lines[0] == "ValueError: bad value"  # the traceback (here without frames) first
    assert lines[-1] == f"medxfer: ValueError: bad value (traceback above and in {tmp_path / 'run' / 'error.log'})"


def test_an_unwritable_run_folder_falls_back_to_the_temporary_folder(hook, tmp_path, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    errors.short_errors(blocker / "run", False, force=True)  # a folder below a file: cannot be created
    monkeypatch.setattr(errors.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    sys.excepthook(OSError, OSError(errno.ENOSPC, "No space left on device", "runs/model.pt"), None)
    fallback = tmp_path / "tmp" / f"medxfer-error-{errors.os.getpid()}.log"
    assert stderr.getvalue() == f"medxfer: runs/model.pt: no space left on device (ENOSPC) (traceback in {fallback})\n"
    assert fallback.is_file()


def test_log_records_lose_their_traceback_unless_debug(hook, tmp_path, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    errors.short_errors(tmp_path / "run", False, force=True)
    stream = io.StringIO()
    logger = logging.getLogger("medxfer.test.short_errors")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("Exception: boom")  # what MONAI's StatsHandler does before re-raising
        assert stream.getvalue() == "Exception: boom\n"
        errors._installed["debug"] = True
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("Exception: boom")
        assert "Traceback (most recent call last)" in stream.getvalue()
    finally:
        logger.removeHandler(handler)


def test_rank_logs_do_not_overwrite_each_other(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    assert errors.log_file_for(tmp_path) == tmp_path / "error.rank1.log"
    monkeypatch.setenv("RANK", "0")
    assert errors.log_file_for(tmp_path) == tmp_path / "error.log"


def test_debug_switch_values(monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    assert [errors.debug_enabled(v) for v in (False, "false", None, True, "true", "1")] == [False] * 3 + [True] * 3
    monkeypatch.setenv(errors.DEBUG_ENV, "yes")
    assert errors.debug_enabled(False)


def test_run_bundle_raises_the_root_cause(tmp_path):
    missing = tmp_path / "nowhere" / "Task09_Spleen"
    with pytest.raises(DatasetError, match="nowhere/Task09_Spleen"):
        run_bundle("transferability", ["score"], quiet=True, bank_root=str(tmp_path / "bank"), data_root=str(missing),
                   output_dir=str(tmp_path / "scores"), device="cpu")


def test_every_bundle_config_installs_the_hook_first():
    """A config that runs (``run``) or replaces the ``initialize`` list starts it with the hook;
    a config that stands alone (``bundle_root``) has the ``debug`` switch (overlays inherit it)."""
    import yaml

    from medxfer.workflows.bundle import BUNDLES_DIR

    files = sorted(BUNDLES_DIR.glob("*/configs/*.yaml"))
    assert len(files) > 20
    for path in files:
        config = yaml.safe_load(path.read_text())
        if "run" in config or "initialize" in config:
            first = config["initialize"][0]
            assert isinstance(first, dict) and first["_target_"] == "medxfer.workflows.errors.short_errors", path
            assert first["debug"] == "@debug", path
        if "bundle_root" in config:
            assert config.get("debug") is False, path
