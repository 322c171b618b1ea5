"""Transfer learning: the one weight-transfer path (:mod:`medxfer.transfer.weights`: checkpoint
reader, transfer modes, per-key report), the model bank, TATL's stages (SPEC sections 4, 6)."""

from medxfer.transfer.bank import BankEntry, BankError, ModelBank
from medxfer.transfer.weights import (TRANSFER_MODES, CheckpointError, TransferReport, init_from_checkpoint,
                                      load_pretrained, parse_mode, read_checkpoint, trainable_parameters)

__all__ = ["BankEntry", "BankError", "ModelBank", "TRANSFER_MODES", "CheckpointError", "TransferReport",
           "init_from_checkpoint", "load_pretrained", "parse_mode", "read_checkpoint", "trainable_parameters"]
