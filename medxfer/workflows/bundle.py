"""Run a medxfer bundle config from Python, the same way ``python -m monai.bundle run`` does.

``python -m monai.bundle run --config_file "['configs/train.yaml','configs/finetune.yaml']" --k v``
and ``run_bundle("msd_seg3d", ["train", "finetune"], k=v)`` build the same ``ConfigWorkflow``;
the Python form avoids a new interpreter (``import monai`` alone costs ~6 s here) and returns the
workflow, so callers (``medxfer bank build``, benchmarks, tests) can read its objects afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medxfer.resources import bundle_path, bundles_root, is_installed_copy
from medxfer.workflows.errors import root_cause

__all__ = ["BUNDLES_DIR", "OUTPUT_IDS", "bundle_dir", "bundle_configs", "run_bundle"]

#: The folder of the bundles: the checkout's ``bundles/`` (editable install, source tree) or the
#: copy shipped in the installed package (``site-packages/medxfer/bundles``); see :mod:`medxfer.resources`.
BUNDLES_DIR = bundles_root()

#: Config ids naming folders a workflow writes (their defaults lie under ``bundle_root``): refused
#: when they resolve into the installed, read-only copy of a bundle.
OUTPUT_IDS = ("output_dir", "bank_root")


def bundle_dir(name: str) -> Path:
    """Folder of bundle ``name`` (e.g. ``msd_seg3d``); a path to a bundle folder is returned as is."""
    path = Path(name)
    if (path / "configs").is_dir():
        return path.resolve()
    return bundle_path(name)


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


def _refuse_installed_outputs(parser, root: Path) -> None:
    """ValueError when an :data:`OUTPUT_IDS` folder of the workflow lies in the installed package
    (its default ``$@bundle_root + '/runs/...'`` with ``bundle_root`` in site-packages): outputs
    must go to a folder of the caller's, never into the installed bundle."""
    if not is_installed_copy(root):
        return  # a checkout's bundle: its runs/ and bank/ are git-ignored working folders
    for key in OUTPUT_IDS:
        if key in parser:
            value = parser.get_parsed_content(key)
            if isinstance(value, (str, Path)) and is_installed_copy(value):
                raise ValueError(f"{key}={value}: inside the installed bundle {root}, which is read-only; "
                                 f"pass {key} (or bundle_root) naming a folder of yours")


def run_bundle(name: str, configs: Sequence[str], run: bool = True, quiet: bool = False, **override):
    """Initialise and (``run=True``) run + finalise a bundle workflow; returns the ``ConfigWorkflow``.

    ``bundle_root`` defaults to the bundle folder; every other keyword overrides a config id
    (``output_dir="runs/x"``, ``**{"train#dataloader#num_workers": 0}``). ``quiet=True``: warnings
    and errors only (for callers that run many workflows and show their own progress: the
    per-iteration logs of MONAI's StatsHandler, which re-enables INFO on its own logger, are
    held back with ``logging.disable`` while the workflow runs).

    With the installed copy of a bundle (non-editable install) pass ``output_dir`` / ``bank_root``
    (or another ``bundle_root``): defaults inside the installed bundle are refused (ValueError).
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
        _refuse_installed_outputs(workflow.parser, root)
        workflow.initialize()
        if run:
            workflow.run()
            workflow.finalize()
    except RuntimeError as err:  # MONAI wraps errors of config expressions: surface ours (they name the file)
        root = root_cause(err)  # the same unwrapping as the one-line report of `python -m monai.bundle run`
        if root is not err:
            raise root from err
        raise
    finally:
        if quiet:
            logging.disable(logging.NOTSET)
    return workflow
