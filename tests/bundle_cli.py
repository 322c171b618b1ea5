"""``python -m monai.bundle run`` in a fresh interpreter, as the bundle READMEs document it."""

import os
import subprocess
import sys
from pathlib import Path


def cache_env(tmp: Path) -> dict:
    """The environment with the caches (matplotlib, torch, XDG) under ``tmp``."""
    env = dict(os.environ)
    for var in ("MPLCONFIGDIR", "TORCH_HOME", "XDG_CACHE_HOME"):
        env[var] = str(Path(tmp) / ".cache" / var.lower())
    return env


def bundle_cli(bundle: Path, args: list[str], tmp: Path, extra_env: dict | None = None, check: bool = True,
               command: str = "run") -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <command> *args`` in the bundle folder; AssertionError with the
    log tail when ``check`` and the run fails."""
    env = {**cache_env(tmp), **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", command, *args], cwd=bundle, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"bundle {command} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
