"""Checkpoint files that are complete or absent: MONAI's ``CheckpointSaver`` with atomic writes.

MONAI's ``CheckpointSaver`` writes through ignite's ``DiskSaver`` with ``atomic=False`` (chosen
there to keep group/other read permission), so a kill or a full disk during ``torch.save`` leaves
a truncated ``model_final.pt`` / ``model.pt`` under the final name. Ignite's ``Checkpoint`` also
*removes* the previous file before it writes the next one (``n_saved`` bookkeeping; for a fixed
file name such as ``model.pt`` it deletes that very file first), so a failed write loses the last
good checkpoint as well.

:class:`AtomicDiskSaver` is the save handler that fixes both, written by hand because neither MONAI
nor ignite offers it: the checkpoint is serialised in memory, written to a temporary file in the
same folder, fsync'ed and renamed over the final name (:func:`medxfer.atomic.atomic_torch_save`,
mode 0644); removals that ignite asks for are *deferred* until the next file is safely written.
OS errors (ENOSPC, EACCES, ...) come as one-line :class:`medxfer.atomic.WriteError` naming the path.

:class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` (same arguments) using it for every
checkpoint it writes (epoch / iteration, final, key metric). With ``key_metric_filename`` it also
writes ``<stem>.json`` beside the best model (``model.json``: metric, value, epoch), so a reader
knows what ``model.pt`` is. :class:`FallbackModelSaver` writes ``model.pt`` from the final weights
when no validation ran (a run shorter than ``val_interval``), recording that in ``model.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from medxfer.atomic import WriteError, atomic_torch_save
from medxfer.jsonfile import write_json

__all__ = ["AtomicDiskSaver", "AtomicCheckpointSaver", "FallbackModelSaver", "model_info", "write_model_info",
           "unwrap_network"]

logger = logging.getLogger("medxfer.checkpoints")


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (their state dicts carry a
    ``module.`` prefix that ignite's ``Checkpoint`` also strips)."""
    return getattr(network, "module", network)


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler: atomic writes, removals deferred until the next write succeeded.

    Args:
        dirname: folder of the checkpoints (created when missing).
        filename: a fixed file name for every checkpoint of this handler (MONAI's ``final_filename``
            / ``key_metric_filename``); ``None`` keeps ignite's names (``checkpoint_epoch=3.pt``).
    """

    def __init__(self, dirname, filename: str | None = None):
        self.dirname = Path(dirname)
        self.filename = filename
        self._pending_removal: list[str] = []
        self.last_saved: Path | None = None

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        path = self.dirname / name
        atomic_torch_save(checkpoint, path)  # WriteError (one line, the path) on any OS error
        self.last_saved = path
        pending, self._pending_removal = self._pending_removal, []
        for old in pending:
            if old != name:
                with contextlib.suppress(FileNotFoundError):
                    (self.dirname / old).unlink()

    def remove(self, filename: str) -> None:
        """Ignite calls this *before* writing the replacement; the file goes only after it."""
        self._pending_removal.append(self.filename or filename)


def model_info(path) -> dict:
    """The ``model.json`` beside ``path`` (``{}`` if there is none or it is unreadable)."""
    info = Path(path).with_suffix(".json")
    try:
        return json.loads(info.read_text())
    except (OSError, ValueError):
        return {}


def write_model_info(path, **info) -> Path:
    """Write ``<path stem>.json`` (atomically) describing the weights in ``path``."""
    return write_json(Path(path).with_suffix(".json"), {"file": Path(path).name, **info})


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose files are written atomically (see the module doc).

    Same arguments as MONAI's. A failed write raises :class:`medxfer.atomic.WriteError` and leaves
    the previous file of that name, if any, intact. The final checkpoint is not saved again from an
    exception that is itself a failed write (MONAI's ``exception_raised`` would retry into the same
    full disk). With ``save_key_metric`` and ``key_metric_filename`` every new best also writes
    ``<key_metric_filename stem>.json``: ``{"weights": "best", "metric", "value", "epoch"}``.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs):
        super().__init__(save_dir, save_dict, **kwargs)
        self._key_metric_filename = kwargs.get("key_metric_filename")
        self._key_metric_name = kwargs.get("key_metric_name")
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(save_dir, fixed)

    def _delete_previous_final_ckpt(self) -> None:
        # MONAI deletes the previous final file before writing the new one; with a fixed name the
        # atomic rename replaces it, and a changing name is removed after the write (deferred).
        if self._final_checkpoint is not None and self._final_checkpoint._saved:
            item = self._final_checkpoint._saved.pop(0)
            self._final_checkpoint.save_handler.remove(item.filename)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if isinstance(e, WriteError):
            raise e
        super().exception_raised(engine, e)

    def metrics_completed(self, engine: Engine) -> None:
        checkpoint = self._key_metric_checkpoint
        before = list(checkpoint._saved) if checkpoint is not None else []
        super().metrics_completed(engine)
        if checkpoint is None or self._key_metric_filename is None or list(checkpoint._saved) == before:
            return
        name = self._key_metric_name or getattr(engine.state, "key_metric_name", None)
        value = engine.state.metrics.get(name) if name else None
        write_model_info(Path(self.save_dir) / self._key_metric_filename, weights="best", metric=name,
                         value=float(value) if value is not None else None, epoch=int(engine.state.epoch),
                         note=f"best validation {name} so far")


class FallbackModelSaver:
    """At ``COMPLETED``, write ``output_file`` (``model.pt``) from the final weights when no
    validation has written it, and say so in ``model.json``.

    A run shorter than ``val_interval`` epochs never validates, so the key-metric saver never
    writes ``model.pt`` and the documented evaluate / inference would fail. The final network
    (state dict only, like the key-metric file) is then saved with ``model.json`` =
    ``{"weights": "final", "note": "model.pt = final weights, no validation ran", "epoch": N}``. A
    ``model.pt`` from an earlier fallback is replaced by the newer final weights (a resumed,
    extended run); one a validation wrote (``"weights": "best"``) is never touched.

    Args:
        network: the trained network.
        output_file: the best-model file of the run (the validation saver's ``key_metric_filename``).
    """

    def __init__(self, network: torch.nn.Module, output_file):
        self.network = network
        self.output_file = Path(output_file)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.output_file.exists() and model_info(self.output_file).get("weights", "best") != "final":
            return
        state = {k: v.detach().cpu() for k, v in unwrap_network(self.network).state_dict().items()}
        atomic_torch_save(state, self.output_file)
        epoch = int(engine.state.epoch)
        write_model_info(self.output_file, weights="final", metric=None, value=None, epoch=epoch,
                         note="model.pt = final weights, no validation ran")
        logger.info("no validation ran in %d epoch(s): %s holds the final weights (recorded in %s)", epoch,
                    self.output_file, self.output_file.with_suffix(".json").name)

