"""Run a medxfer bundle config from Python, the same way ``python -m monai.bundle run`` does.

``python -m monai.bundle run --config_file "['configs/train.yaml','configs/finetune.yaml']" --k v``
and ``run_bundle("msd_seg3d", ["train", "finetune"], k=v)`` build the same ``ConfigWorkflow``;
the Python form avoids a new interpreter (``import monai`` alone costs ~6 s here) and returns the
workflow, so callers (``medxfer bank build``, benchmarks, tests) can read its objects afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["BUNDLES_DIR", "bundle_dir", "bundle_configs", "run_bundle", "quiet_logging_file"]

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


def quiet_logging_file(folder) -> Path:
    """Write a logging config (warnings and errors only) into ``folder``; for :func:`run_bundle`
    callers that run many workflows and show their own progress (the CC-FV study)."""
    path = Path(folder) / "logging_quiet.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(QUIET_LOGGING)
    return path


def run_bundle(name: str, configs: Sequence[str], run: bool = True, logging_file=None, **override):
    """Initialise and (``run=True``) run + finalise a bundle workflow; returns the ``ConfigWorkflow``.

    ``bundle_root`` defaults to the bundle folder; every other keyword overrides a config id
    (``output_dir="runs/x"``, ``**{"train#dataloader#num_workers": 0}``). ``logging_file``: a
    logging INI file instead of the bundle's ``configs/logging.conf`` (see :func:`quiet_logging_file`).
    """
    from monai.bundle import ConfigWorkflow

    root = bundle_dir(name)
    override.setdefault("bundle_root", str(root))
    workflow = ConfigWorkflow(config_file=bundle_configs(name, configs), meta_file=str(root / "configs" / "metadata.json"),
                              workflow_type=None, logging_file=None if logging_file is None else str(logging_file),
                              **override)
    try:
        workflow.initialize()
        if logging_file is not None:  # handlers built during initialize (MONAI StatsHandler) reset the root level
            import logging.config

            logging.config.fileConfig(str(logging_file), disable_existing_loggers=False)
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
    return workflow
