"""Model bank: pretrained checkpoints plus a YAML manifest that says what each one is (SPEC section 4).

Layout of a bank folder (shareable as it is; paths in the manifest are relative to it)::

    bank/
      bank.yaml                      # manifest, plain YAML a person can read
      checkpoints/<name>.pt          # state dict only (tensors), loadable with weights_only=True

Every manifest entry records ``name, arch, arch_kwargs, source (task list), epoch, iterations,
checkpoint, sha256, in_channels, out_channels, patch_size, preprocessing, provenance`` (and optional
``notes`` and ``layout``).

``preprocessing`` says how a target case is prepared for this model (``kind``, see
:mod:`medxfer.transforms.preprocessing`): ``target_plans`` (medxfer's own models: the target's nnU-Net
plans, as medxfer fine-tunes them; an entry without ``kind`` means this too), ``monai`` (a MONAI
transform list, e.g. a zoo bundle's inference preprocessing, recorded with its numbers) or
``nnunet`` (nnU-Net's own preprocessing from the plans copied into ``sources/<name>/``).
``provenance`` says where the model came from: ``kind`` (medxfer / bundle / nnunet / checkpoint),
``original`` (path or URL), ``version``, ``licence``, ``sha256`` of the original weights file and
``imported`` (ISO date). ``layout`` (optional) overrides the registry's layout of ``arch``
(:class:`~medxfer.networks.layout.ArchLayout` fields): :func:`entry_layout`.

Loading (:meth:`ModelBank.load_state_dict`) verifies the sha256 of the file against the manifest,
then reads it with the one checkpoint reader, :func:`medxfer.transfer.weights.read_checkpoint`
(``torch.load(weights_only=True)``: a checkpoint holding pickled objects is refused, not executed;
``module.`` / ``_orig_mod.`` prefixes stripped). Problems raise :class:`BankError` naming the file.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
import yaml

from medxfer import __version__
from medxfer.atomic import atomic_write_bytes, atomic_write_text
from medxfer.networks import ArchLayout, arch_layout
from medxfer.networks.layout import check_layout, layout_from_dict
from medxfer.transfer.weights import CheckpointError, read_checkpoint, strip_prefixes

__all__ = ["BankError", "BankEntry", "ModelBank", "sha256_file", "MANIFEST", "entry_layout"]

MANIFEST = "bank.yaml"
logger = logging.getLogger("medxfer.bank")


class BankError(CheckpointError):
    """A bank file is missing, tampered with or unsafe. The message names the file."""


@dataclass
class BankEntry:
    """One pretrained model of the bank (one manifest entry)."""

    name: str
    arch: str
    checkpoint: str                     # relative to the bank folder
    sha256: str
    in_channels: int
    out_channels: int
    patch_size: list[int]
    arch_kwargs: dict = field(default_factory=dict)
    source: list[str] = field(default_factory=list)   # source task folder names; [] = scratch
    epoch: int | None = None
    iterations: int | None = None
    preprocessing: dict = field(default_factory=dict)
    notes: str = ""
    provenance: dict = field(default_factory=dict)
    layout: dict | None = None

    def to_dict(self) -> dict:
        out = _plain(asdict(self))
        if out["layout"] is None:  # manifests of entries without an override stay as before
            del out["layout"]
        if not out["provenance"]:
            del out["provenance"]
        return out

    @property
    def preprocessing_kind(self) -> str:
        """``target_plans`` | ``monai`` | ``nnunet`` (an entry without ``kind``: ``target_plans``)."""
        return str(self.preprocessing.get("kind", "target_plans"))


def entry_layout(entry: BankEntry, network: torch.nn.Module | None = None) -> ArchLayout:
    """Where the parts of ``entry``'s network live: its recorded ``layout`` override (checked against
    ``network`` when given), else the registry's layout of its arch
    (:func:`medxfer.networks.registry.arch_layout`; automatic for a ``network_def`` entry)."""
    if entry.layout:
        layout = layout_from_dict(entry.layout, entry.arch)
        if network is not None:
            check_layout(layout, network)
        return layout
    return arch_layout(entry.arch, network, entry.arch_kwargs)


def _plain(value):
    """Tuples -> lists (recursively) so the manifest is plain YAML."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _medxfer_provenance() -> dict:
    """Provenance of an entry medxfer trained itself (no ``provenance`` given to :meth:`ModelBank.add`)."""
    return {"kind": "medxfer", "version": f"medxfer {__version__}", "imported": datetime.date.today().isoformat()}


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class ModelBank:
    """A bank folder: its manifest and checkpoints.

    >>> bank = ModelBank.open("bank", create=True)
    >>> bank.add("unet_Task03_Liver_e100", net, arch="unet", in_channels=1, out_channels=3,
    ...          patch_size=[64, 64, 32], source=["Task03_Liver"], epoch=100)
    >>> state = bank.load_state_dict("unet_Task03_Liver_e100")   # sha256 checked, weights only
    """

    def __init__(self, root, entries: list[BankEntry], description: str = ""):
        self.root = Path(root)
        self._entries = {e.name: e for e in entries}
        self.description = description

    # --- manifest -------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @classmethod
    def open(cls, root, create: bool = False, description: str = "") -> "ModelBank":
        """Read ``root/bank.yaml`` (``create=True``: start an empty bank if there is none)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            if not create:
                raise BankError(path, "no model bank here (bank manifest not found)")
            bank = cls(root, [], description)
            bank.save()
            return bank
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise BankError(path, f"invalid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("entries", []), list):
            raise BankError(path, "expected a mapping with an 'entries' list")
        entries = []
        for i, raw in enumerate(data.get("entries") or []):
            try:
                entries.append(BankEntry(**raw))
            except TypeError as e:
                raise BankError(path, f"entry {i} ({raw.get('name', '?') if isinstance(raw, Mapping) else raw}): {e}") from None
        return cls(root, entries, data.get("description", ""))

    def save(self) -> None:
        """Write the manifest atomically (:func:`medxfer.atomic.atomic_write_text`): a crash or a
        full disk leaves the previous manifest, never half of one (error: :class:`medxfer.atomic.WriteError`)."""
        data = {"description": self.description, "format": "medxfer model bank v1",
                "entries": [e.to_dict() for e in self._entries.values()]}
        atomic_write_text(self.manifest, yaml.safe_dump(data, sort_keys=False))

    # --- entries --------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[BankEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> BankEntry:
        if name not in self._entries:
            raise BankError(self.manifest, f"no entry {name!r}; entries: {self.names()}")
        return self._entries[name]

    def checkpoint_path(self, name: str) -> Path:
        return self.root / self.get(name).checkpoint

    def add(self, name: str, network: torch.nn.Module | Mapping[str, torch.Tensor], *, arch: str, in_channels: int,
            out_channels: int, patch_size, arch_kwargs: dict | None = None, source=(), epoch: int | None = None,
            iterations: int | None = None, preprocessing: dict | None = None, notes: str = "",
            overwrite: bool = False, provenance: dict | None = None, layout: dict | None = None) -> BankEntry:
        """Save ``network``'s state dict (wrappers unwrapped, tensors on CPU) and record it.

        An existing ``name`` is an error unless ``overwrite`` (a bank is never changed silently).
        The checkpoint is written atomically, then the manifest: a failure (full disk, kill)
        leaves the previous checkpoint and manifest, and the entry is not added. A failed manifest
        write after the checkpoint was replaced can leave a checkpoint whose sha256 no longer
        matches its (old) entry; :meth:`verify` then refuses it rather than load the wrong weights.
        """
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid bank entry name {name!r}")
        if name in self._entries and not overwrite:
            raise FileExistsError(f"{self.manifest}: entry {name!r} exists; pass overwrite=True to replace it")
        state = network.state_dict() if isinstance(network, torch.nn.Module) else network
        state = {k: v.detach().cpu().clone() for k, v in strip_prefixes(state).items()}
        rel = f"checkpoints/{name}.pt"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.root / rel, buffer.getvalue())
        entry = BankEntry(name=name, arch=str(arch), checkpoint=rel, sha256=hashlib.sha256(buffer.getvalue()).hexdigest(),
                          in_channels=int(in_channels), out_channels=int(out_channels),
                          patch_size=[int(p) for p in patch_size], arch_kwargs=_plain(dict(arch_kwargs or {})),
                          source=[str(s) for s in source], epoch=None if epoch is None else int(epoch),
                          iterations=None if iterations is None else int(iterations),
                          preprocessing=_plain(dict(preprocessing or {})), notes=notes,
                          provenance=_plain(dict(provenance or _medxfer_provenance())),
                          layout=_plain(dict(layout)) if layout else None)
        previous = self._entries.get(name)
        self._entries[name] = entry
        try:
            self.save()
        except BaseException:  # the manifest on disk is unchanged: so is this object
            if previous is None:
                del self._entries[name]
            else:
                self._entries[name] = previous
            raise
        return entry

    def verify(self, name: str, read_weights: bool = True) -> Path:
        """Check the checkpoint of ``name``: it exists, matches its recorded sha256 and (``read_weights``)
        reads as a plain state dict with ``torch.load(weights_only=True)``
        (:func:`medxfer.transfer.weights.read_checkpoint`), so a file holding pickled Python objects
        is reported here (``bank list``), not only when a fine-tuning run loads it. Returns its path;
        every problem is a :class:`BankError` naming the file."""
        entry = self.get(name)
        path = self.root / entry.checkpoint
        if not path.is_file():
            raise BankError(path, f"checkpoint of bank entry {name!r} not found")
        digest = sha256_file(path)
        if digest != entry.sha256:
            raise BankError(path, f"sha256 mismatch for bank entry {name!r}: manifest says {entry.sha256[:16]}..., "
                                  f"file has {digest[:16]}... (file changed or corrupted; do not use it)")
        if read_weights:
            try:
                read_checkpoint(path)
            except CheckpointError as e:
                raise BankError(e.path, f"bank entry {name!r}: {e.reason}") from None
        return path

    def load_state_dict(self, name: str, map_location="cpu") -> dict[str, torch.Tensor]:
        """Verified (sha256), weights-only state dict of entry ``name``, wrapper prefixes stripped
        (:func:`medxfer.transfer.weights.read_checkpoint`; its errors come as :class:`BankError`)."""
        path = self.verify(name, read_weights=False)  # read once, below
        try:
            return read_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            raise BankError(e.path, e.reason) from None
