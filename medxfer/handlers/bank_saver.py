"""Add pretraining checkpoints to a model bank (SPEC section 4) while training runs."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from ignite.engine import Engine, Events

from medxfer.transfer.bank import ModelBank

__all__ = ["BankCheckpointer"]


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
    """

    def __init__(self, bank_root, name: str, network: torch.nn.Module, arch: str, in_channels: int,
                 out_channels: int, patch_size: Sequence[int], arch_kwargs: dict | None = None,
                 source: Sequence[str] = (), preprocessing: dict | None = None, epochs: Sequence[int] = (),
                 save_final: bool = True, overwrite: bool = False):
        self.bank_root, self.name, self.network = bank_root, name, network
        self.meta = dict(arch=arch, in_channels=int(in_channels), out_channels=int(out_channels),
                         patch_size=[int(p) for p in patch_size], arch_kwargs=dict(arch_kwargs or {}),
                         source=list(source), preprocessing=dict(preprocessing or {}))
        self.epochs = {int(e) for e in epochs}
        self.save_final = save_final
        self.overwrite = overwrite
        self.saved: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._catch_up)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _wanted(self, engine: Engine) -> bool:
        epoch = engine.state.epoch
        return epoch in self.epochs or (self.save_final and epoch == engine.state.max_epochs)

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
        logging.getLogger("medxfer.bank").info("added %s to bank %s", entry_name, self.bank_root)
