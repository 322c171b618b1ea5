"""Where the MONAI bundles (``bundles/``) and shared configs (``configs/``) are, in a checkout or installed.

The wheel ships both folders as package data inside ``medxfer`` (``pyproject.toml`` maps the
subpackages ``medxfer.bundles`` -> ``bundles/`` and ``medxfer.configs`` -> ``configs/``), so after
``pip install .`` they lie in ``site-packages/medxfer/bundles`` and ``site-packages/medxfer/configs``.
In a source checkout (the editable install of ``make``, or running from the tree) there is no
``medxfer/bundles``: the checkout's top-level ``bundles/`` and ``configs/`` beside the package are
used, so editing them takes effect at once.

Imports nothing from medxfer (stdlib only), so any module can use it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["package_root", "bundles_root", "configs_root", "bundle_path", "config_path", "bundle_names",
           "is_installed_copy"]


def package_root() -> Path:
    """The folder of the imported ``medxfer`` package (a real folder: medxfer must not run zipped)."""
    root = resources.files("medxfer")
    if not isinstance(root, Path):
        raise RuntimeError(f"medxfer is imported from {root}, not a folder; install it unpacked (pip install)")
    return root


def _data_root(name: str) -> Path:
    """``<package>/<name>`` when that is shipped there (installed copy), else ``<checkout>/<name>``."""
    packaged = package_root() / name
    return packaged if packaged.is_dir() else package_root().parent / name


def bundles_root() -> Path:
    """The folder holding the bundles (``msd_seg3d``, ``tatl_skin``, ...); may not exist."""
    return _data_root("bundles")


def configs_root() -> Path:
    """The folder holding the shared configs (``bank_ccfv.yaml``, ``msd_tasks.yaml``); may not exist."""
    return _data_root("configs")


def bundle_names() -> list[str]:
    """Names of the bundles found (folders of :func:`bundles_root` with a ``configs/`` folder), sorted."""
    root = bundles_root()
    return sorted(p.name for p in root.iterdir() if (p / "configs").is_dir()) if root.is_dir() else []


def bundle_path(name: str) -> Path:
    """Folder of bundle ``name`` (e.g. ``msd_seg3d``); FileNotFoundError naming the path and the bundles found."""
    path = bundles_root() / name
    if not (path / "configs").is_dir():
        raise FileNotFoundError(f"{path}: no such bundle; bundles here: {bundle_names()}")
    return path


def config_path(name: str) -> Path:
    """Path of shared config ``name`` (``"bank_ccfv.yaml"``; ``.yaml`` is added when there is no suffix).

    Not checked for existence (callers report a missing file with their own message).
    """
    return configs_root() / (name if Path(name).suffix else f"{name}.yaml")


def is_installed_copy(path) -> bool:
    """True when ``path`` lies in the bundles or configs shipped inside the installed package
    (``site-packages/medxfer/bundles/...``): read-only by contract, outputs go elsewhere.
    The checkout's ``bundles/`` and ``configs/`` give False."""
    path = Path(path).resolve()
    for root in (bundles_root(), configs_root()):
        if root.parent == package_root() and path.is_relative_to(root.resolve()):
            return True
    return False
