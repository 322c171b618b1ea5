"""Shared fixtures: caches in temporary folders, generated datasets made once per session."""

import os
import tempfile

# Caches (matplotlib, torch, pip, ...) must not land in the home directory (SPEC section 11).
_cache = tempfile.mkdtemp(prefix="medxfer-test-cache-")
for var in ("MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME"):
    os.environ.setdefault(var, os.path.join(_cache, var.lower()))
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def msd_root(tmp_path_factory):
    """Every MSD profile, 3 training + 1 test case each (seed 0). Do not modify: copy first."""
    from medxfer.data.synth.msd import generate_msd

    root = tmp_path_factory.mktemp("msd")
    generate_msd(root, num_training=3, num_test=1, seed=0)
    return root


@pytest.fixture(scope="session")
def isic_roots(tmp_path_factory):
    """ISIC 2018 and 2017 folders, 12 images each (seed 0). Do not modify: copy first."""
    from medxfer.data.synth.isic import generate_isic

    return {year: generate_isic(tmp_path_factory.mktemp(f"isic{year}"), year=year, num_images=12, seed=0)
            for year in (2018, 2017)}
