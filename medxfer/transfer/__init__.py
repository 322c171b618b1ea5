"""Transfer learning: the model bank and the transfer modes (SPEC section 4)."""

from medxfer.transfer.bank import BankEntry, BankError, ModelBank, read_state_dict
from medxfer.transfer.finetune import TRANSFER_MODES, TransferReport, apply_transfer, parse_mode, trainable_parameters

__all__ = ["BankEntry", "BankError", "ModelBank", "read_state_dict", "TRANSFER_MODES", "TransferReport",
           "apply_transfer", "parse_mode", "trainable_parameters"]
