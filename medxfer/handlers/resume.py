"""Resume training from the newest interval checkpoint of MONAI's ``CheckpointSaver``.

MONAI's ``CheckpointLoader`` restores network, optimizer, scheduler and trainer state (epoch and
iteration) but needs a fixed path. A run that was killed must pick up the *newest* checkpoint, and
a first run has none; this handler finds it and delegates the loading to ``CheckpointLoader``.
With ``CheckpointSaver(save_interval=1, epoch_level=True)`` a kill loses at most the epoch in
progress (ignite writes checkpoints atomically, so a kill during saving leaves the previous one).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from medxfer.handlers.finite_loss import NonFiniteLossError

__all__ = ["ResumeFromLatest", "ResumableCheckpointSaver", "latest_checkpoint"]

_EPOCH = re.compile(r"epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir) -> Path | None:
    """The ``*epoch=N.pt`` file with the largest ``N`` in ``ckpt_dir`` (``None`` if there is none)."""
    found = []
    for path in Path(ckpt_dir).glob("*epoch=*.pt"):
        m = _EPOCH.search(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


class ResumeFromLatest:
    """At ``Events.STARTED``, load the newest epoch checkpoint in ``ckpt_dir`` into ``load_dict``.

    Args:
        ckpt_dir: folder the training ``CheckpointSaver`` writes to.
        load_dict: ``{"network": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer}``,
            the same dict the saver was given.
        map_location: device for the loaded tensors (a GPU checkpoint resumes on CPU and back).
        enabled: ``False`` ignores existing checkpoints (a fresh run in the same folder).
    """

    def __init__(self, ckpt_dir, load_dict: dict, map_location=None, enabled: bool = True):
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = load_dict
        self.map_location = map_location
        self.enabled = enabled
        self.resumed_from: Path | None = None
        self.logger = logging.getLogger("medxfer.resume")

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir) if self.enabled else None
        if path is None:
            return
        CheckpointLoader(str(path), dict(self.load_dict), map_location=self.map_location)(engine)
        self.resumed_from = path
        self.logger.info("resumed from %s: epoch %d, iteration %d of max_epochs %d", path, engine.state.epoch,
                         engine.state.iteration, engine.state.max_epochs)


class ResumableCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` that also saves the engine it is attached to as ``"trainer"``
    (epoch and iteration), which :class:`ResumeFromLatest` needs to continue a killed run."""

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        super().attach(engine)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """MONAI saves the final checkpoint on any exception (deleting the previous one first); a
        :class:`~medxfer.handlers.finite_loss.NonFiniteLossError` means NaN / inf weights: re-raised,
        nothing saved or deleted, the last good epoch checkpoint stays."""
        if isinstance(e, NonFiniteLossError):
            raise e
        super().exception_raised(engine, e)
