"""Run a medxfer bundle config from Python, the same way ``python -m monai.bundle run`` does.

``python -m monai.bundle run --config_file "['configs/train.yaml','configs/finetune.yaml']" --k v``
and ``run_bundle("msd_seg3d", ["train", "finetune"], k=v)`` build the same ``ConfigWorkflow``;
the Python form avoids a new interpreter (``import monai`` alone costs ~6 s here) and returns the
workflow, so callers (``medxfer bank build``, benchmarks, tests) can read its objects afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["BUNDLES_DIR", "bundle_dir", "bundle_configs", "run_bundle"]

#: The ``bundles/`` folder of this checkout (medxfer is installed editable from it).
BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"


def bundle_dir(name: str) -> Path:
    """Folder of bundle ``name`` (e.g. ``msd_seg3d``); a path to a bundle folder is returned as is."""
    path = Path(name)
    if (path / "configs").is_dir():
        return path.resolve()
    path = BUNDLES_DIR / name
    if not (path / "configs").is_dir():
        known = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs").is_dir()) if BUNDLES_DIR.is_dir() else []
        raise FileNotFoundError(f"{path}: no such bundle; bundles here: {known}")
    return path


def bundle_configs(name: str, configs: Sequence[str]) -> list[str]:
    """Config file paths for ``configs`` (``"train"`` -> ``<bundle>/configs/train.yaml``), in order."""
    root = bundle_dir(name) / "configs"
    files = []
    for config in configs:
        path = Path(config) if Path(config).suffix else root / f"{config}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"{path}: bundle config not found")
        files.append(str(path))
    return files


QUIET_LOGGING = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=short

[logger_root]
level=WARNING
handlers=console

[handler_console]
class=StreamHandler
level=WARNING
formatter=short
args=(sys.stderr,)

[formatter_short]
format=%(levelname)s %(name)s: %(message)s
"""


_QUIET_FILE: Path | None = None


def _quiet_logging_file() -> Path:
    """:data:`QUIET_LOGGING` written once per process to a temporary file (MONAI wants a path)."""
    global _QUIET_FILE
    if _QUIET_FILE is None or not _QUIET_FILE.exists():
        import tempfile

        fd, name = tempfile.mkstemp(prefix="medxfer-logging-quiet-", suffix=".conf")
        with open(fd, "w") as f:
            f.write(QUIET_LOGGING)
        _QUIET_FILE = Path(name)
    return _QUIET_FILE


def run_bundle(name: str, configs: Sequence[str], run: bool = True, quiet: bool = False, **override):
    """Initialise and (``run=True``) run + finalise a bundle workflow; returns the ``ConfigWorkflow``.

    ``bundle_root`` defaults to the bundle folder; every other keyword overrides a config id
    (``output_dir="runs/x"``, ``**{"train#dataloader#num_workers": 0}``). ``quiet=True``: warnings
    and errors only (for callers that run many workflows and show their own progress: the
    per-iteration logs of MONAI's StatsHandler, which re-enables INFO on its own logger, are
    held back with ``logging.disable`` while the workflow runs).
    """
    import logging

    from monai.bundle import ConfigWorkflow

    root = bundle_dir(name)
    override.setdefault("bundle_root", str(root))
    if quiet:
        logging.disable(logging.INFO)
    workflow = ConfigWorkflow(config_file=bundle_configs(name, configs), meta_file=str(root / "configs" / "metadata.json"),
                              workflow_type=None, logging_file=str(_quiet_logging_file()) if quiet else None, **override)
    try:
        workflow.initialize()
        if run:
            workflow.run()
            workflow.finalize()
    except RuntimeError as err:  # MONAI wraps errors of config expressions: surface ours (they name the file)
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        if isinstance(root, (ValueError, FileExistsError, FileNotFoundError)) and root is not err:
            raise root from err
        raise
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    return workflow
