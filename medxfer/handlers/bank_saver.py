"""Add pretraining checkpoints to a model bank (SPEC section 4) while training runs."""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from ignite.engine import Engine, Events

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
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if epoch not in self.epochs and not (self.save_final and epoch == engine.state.max_epochs):
            return
        from medxfer.transfer.bank import ModelBank

        bank = ModelBank.open(self.bank_root, create=True)
        entry_name = f"{self.name}_e{epoch}"
        bank.add(entry_name, self.network, epoch=epoch, iterations=engine.state.iteration,
                 overwrite=self.overwrite, **self.meta)
        self.saved.append(entry_name)
        logging.getLogger("medxfer.bank").info("added %s to bank %s", entry_name, self.bank_root)
