"""Add pretraining checkpoints to a model bank (SPEC section 4) while training runs, and the
markers that make a pretraining resumable.

A pretraining run writes the bank entries ``<name>_e<epoch>``. Whether those entries are the
complete result of one run with known settings is recorded in ``<bank>/pretraining/<name>.json``:

* ``{"state": "running", "for": settings}``: written before the first epoch; entries named
  ``<name>_e*`` present with this marker are from a run that did not finish (killed, crashed)
  and are removed before the pretraining is redone from scratch (:func:`purge_pretraining`);
* ``{"state": "done", "for": settings, "entries": {name: sha256}, "seconds": s}``: written
  atomically *after* the last entry (at ignite's ``COMPLETED``, which also follows an early
  stop), so it exists only when every entry is in the manifest. :func:`finished_pretraining`
  trusts it only for the same settings and when every recorded entry is still in the manifest
  with the recorded sha256 and its file has those bytes.

Chosen over one marker per entry: a run is the unit that is redone (an intermediate entry alone
cannot be reproduced without retraining from epoch 0), so the run is what is marked.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Sequence

import torch
from ignite.engine import Engine, Events

from medxfer.atomic import atomic_write_text
from medxfer.jsonfile import json_safe
from medxfer.transfer.bank import BankError, ModelBank, sha256_file

__all__ = ["BankCheckpointer", "MARKER_DIR", "marker_key", "pretraining_marker", "read_pretraining_marker",
           "write_pretraining_marker", "pretraining_entries", "finished_pretraining", "purge_pretraining",
           "changed_keys"]

#: Folder of a bank that holds one marker per pretraining run.
MARKER_DIR = "pretraining"
logger = logging.getLogger("medxfer.bank")


def marker_key(obj):
    """``obj`` as plain JSON values (tuples -> lists, NaN -> null, paths -> strings, sorted keys):
    what a marker records, so a recorded and a recomputed key compare equal."""
    return json.loads(json.dumps(json_safe(obj), sort_keys=True, default=str))


def changed_keys(old, new) -> list[str]:
    """Top-level keys whose values differ between two marker keys (for one-line messages)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ["(all)"]
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def pretraining_marker(bank_root, name: str) -> Path:
    """``<bank_root>/pretraining/<name>.json``."""
    return Path(bank_root) / MARKER_DIR / f"{name}.json"


def read_pretraining_marker(bank_root, name: str) -> dict | None:
    """The marker of pretraining ``name`` (``None`` if there is none or it is not a marker: a file
    that cannot be read is not trusted, the run is redone)."""
    path = pretraining_marker(bank_root, name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("state") in ("running", "done") else None


def write_pretraining_marker(bank_root, name: str, settings, state: str, entries: dict | None = None,
                             seconds: float | None = None) -> Path:
    """Write the marker atomically (:func:`medxfer.atomic.atomic_write_text`)."""
    data = {"state": state, "name": name, "for": marker_key(settings)}
    if entries is not None:
        data["entries"] = dict(entries)
    if seconds is not None:
        data["seconds"] = float(seconds)
    return atomic_write_text(pretraining_marker(bank_root, name), json.dumps(data, indent=1) + "\n")


def _entry_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(name)}_e\d+$")


def pretraining_entries(bank: ModelBank, name: str) -> list[str]:
    """Manifest entries of pretraining ``name``: ``<name>_e<epoch>``, in manifest order."""
    pattern = _entry_pattern(name)
    return [n for n in bank.names() if pattern.match(n)]


def finished_pretraining(bank_root, name: str, settings) -> dict | None:
    """The ``done`` marker of pretraining ``name`` when it can be trusted: recorded for the same
    ``settings``, and every entry it lists in the manifest with the recorded sha256, its file
    holding those bytes. ``None`` otherwise (the run must be redone)."""
    marker = read_pretraining_marker(bank_root, name)
    if marker is None or marker["state"] != "done" or marker.get("for") != marker_key(settings):
        return None
    entries = marker.get("entries") or {}
    if not entries:
        return None
    try:
        bank = ModelBank.open(bank_root)
    except BankError:
        return None
    for entry, digest in entries.items():
        if entry not in bank or bank.get(entry).sha256 != digest:
            return None
        path = bank.checkpoint_path(entry)
        if not path.is_file() or sha256_file(path) != digest:
            return None
    return marker


def purge_pretraining(bank_root, name: str) -> list[str]:
    """Remove what a half-finished pretraining ``name`` may have left in the bank: its manifest
    entries ``<name>_e<epoch>`` (manifest saved first, atomically), then their checkpoint files,
    checkpoint files of that pattern the manifest does not list (a kill between writing the file
    and the manifest), and temporary files of interrupted atomic writes. Returns the entry names
    removed from the manifest."""
    root = Path(bank_root)
    removed: list[str] = []
    if (root / "bank.yaml").exists():
        bank = ModelBank.open(root)
        removed = pretraining_entries(bank, name)
        if removed:
            ModelBank(root, [e for e in bank if e.name not in removed], bank.description).save()
    pattern = _entry_pattern(name)
    ckpt_dir = root / "checkpoints"
    if ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            stem = path.name.split(".")[0]
            # medxfer.atomic's temporary names: ".<stem>-<random>.pt[.part]"
            leftover = path.name.startswith(".") and pattern.match(path.name[1:].split(".")[0].rsplit("-", 1)[0])
            if (path.suffix == ".pt" and pattern.match(stem)) or leftover:
                path.unlink(missing_ok=True)
    marker = pretraining_marker(root, name)
    marker.unlink(missing_ok=True)
    return removed


class BankCheckpointer:
    """Writes the network into a :class:`medxfer.transfer.bank.ModelBank` at chosen epochs.

    Entries are named ``<name>_e<epoch>`` and record arch, arch kwargs, source task(s), epoch,
    iteration count, channels, patch size and a preprocessing summary; the bank stores the
    state dict with its sha256.

    Args:
        bank_root: bank folder (``bank.yaml`` is created on first use).
        name: entry name prefix, e.g. ``unet_Task03_Liver``.
        network: the trained module (``DistributedDataParallel`` is unwrapped by the bank).
        epochs: intermediate epochs to save (1-based); the final epoch is always saved when
            ``save_final``.
        overwrite: replace entries of the same name (otherwise an existing name is an error,
            so a bank is never changed silently).
        settings: what defines this pretraining (arch, data, epochs, ...; any JSON-able dict).
            Given, the run keeps the marker ``<bank>/pretraining/<name>.json`` (module
            docstring): a fresh start (epoch 0) removes the entries a killed run of ``name``
            left, a finished run with the same settings is refused (the caller skips it, see
            :func:`finished_pretraining`), entries of other or unknown origin are refused unless
            ``overwrite``; ``COMPLETED`` writes the ``done`` marker. ``None``: no markers (the
            caller, e.g. ``medxfer bank build``, keeps them).
    """

    def __init__(self, bank_root, name: str, network: torch.nn.Module, arch: str, in_channels: int,
                 out_channels: int, patch_size: Sequence[int], arch_kwargs: dict | None = None,
                 source: Sequence[str] = (), preprocessing: dict | None = None, epochs: Sequence[int] = (),
                 save_final: bool = True, overwrite: bool = False, settings: dict | None = None):
        self.bank_root, self.name, self.network = bank_root, name, network
        self.meta = dict(arch=arch, in_channels=int(in_channels), out_channels=int(out_channels),
                         patch_size=[int(p) for p in patch_size], arch_kwargs=dict(arch_kwargs or {}),
                         source=list(source), preprocessing=dict(preprocessing or {}))
        self.epochs = {int(e) for e in epochs}
        self.save_final = save_final
        self.overwrite = overwrite
        self.settings = settings
        self.saved: list[str] = []
        self._t0 = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        if self.settings is not None:
            engine.add_event_handler(Events.COMPLETED, self._completed)

    def _wanted(self, engine: Engine) -> bool:
        epoch = engine.state.epoch
        return epoch in self.epochs or (self.save_final and epoch == engine.state.max_epochs)

    def _started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()
        if self.settings is not None:
            if engine.state.epoch == 0:
                self._claim()
            elif read_pretraining_marker(self.bank_root, self.name) is None:  # resumed (ResumeFromLatest)
                write_pretraining_marker(self.bank_root, self.name, self.settings, "running")
        self._catch_up(engine)

    def _claim(self) -> None:
        """Fresh start: clear a killed run's entries, refuse to mix with finished or foreign ones."""
        bank = ModelBank.open(self.bank_root, create=True)
        marker = read_pretraining_marker(self.bank_root, self.name)
        existing = pretraining_entries(bank, self.name)
        path = pretraining_marker(self.bank_root, self.name)
        if not self.overwrite:
            if marker is not None and marker["state"] == "done":
                if marker.get("for") == marker_key(self.settings):
                    raise FileExistsError(f"{path}: pretraining {self.name} finished already with these settings "
                                          f"(entries {sorted(marker.get('entries') or {})}); pass overwrite_bank true "
                                          "to redo it")
                raise FileExistsError(f"{path}: the bank's {self.name}_e* entries come from a pretraining with other "
                                      f"settings ({', '.join(changed_keys(marker.get('for'), marker_key(self.settings)))}); "
                                      "pass overwrite_bank true to replace them, or use another bank_root")
            if existing and marker is None:
                raise FileExistsError(f"{bank.manifest}: holds entries {existing[:3]} not written by a resumable "
                                      "pretraining; pass overwrite_bank true to replace them, or use another bank_root")
        if existing or marker is not None:
            removed = purge_pretraining(self.bank_root, self.name)
            if removed:
                logger.warning("pretraining %s: removed %d entr%s of an unfinished or replaced run (%s); redoing it "
                               "from scratch", self.name, len(removed), "y" if len(removed) == 1 else "ies",
                               ", ".join(removed))
        write_pretraining_marker(self.bank_root, self.name, self.settings, "running")

    def _completed(self, engine: Engine) -> None:
        """Written last: every entry of the run is in the manifest."""
        bank = ModelBank.open(self.bank_root)
        entries = {n: bank.get(n).sha256 for n in pretraining_entries(bank, self.name)}
        write_pretraining_marker(self.bank_root, self.name, self.settings, "done", entries,
                                 seconds=time.perf_counter() - self._t0)

    def _catch_up(self, engine: Engine) -> None:
        """A run resumed from the checkpoint of epoch ``k`` (``ResumeFromLatest``, attached before
        this handler) holds exactly the weights of epoch ``k``. If ``k`` is a bank epoch whose entry
        is missing -- the run was killed between writing the epoch checkpoint and the bank entry --
        the entry is written now, so a resumed pretraining never silently lacks a checkpoint."""
        if engine.state.epoch == 0 or not self._wanted(engine):
            return
        if f"{self.name}_e{engine.state.epoch}" not in ModelBank.open(self.bank_root, create=True).names():
            self(engine)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if not self._wanted(engine):
            return
        bank = ModelBank.open(self.bank_root, create=True)
        entry_name = f"{self.name}_e{epoch}"
        bank.add(entry_name, self.network, epoch=epoch, iterations=engine.state.iteration,
                 overwrite=self.overwrite, **self.meta)
        self.saved.append(entry_name)
        logger.info("added %s to bank %s", entry_name, self.bank_root)
