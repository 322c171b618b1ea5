"""Bring the models researchers already have into a model bank (issue 14): MONAI model-zoo bundles,
nnU-Net v2 trained-model folders and published checkpoints.

=============== =====================================================================================
kind            what is read
=============== =====================================================================================
``bundle``      a zoo bundle folder: ``configs/metadata.json``, ``configs/inference.json|yaml|yml``
                (its ``network_def`` with ``_target_``, its ``preprocessing`` and ``inferer#roi_size``,
                parsed by MONAI's ``ConfigParser`` with ``bundle_root`` = the folder),
                ``models/model.pt`` (weights only). MONAI networks the registry knows (UNet, UNETR,
                SwinUNETR, SegResNet, DynUNet, BasicUNet, FlexibleUNet) become that arch; any other
                importable class becomes the ``network_def`` arch (layout found automatically, or
                given with ``layout``). The inference preprocessing is recorded as a ``monai`` kind
                (every ``@`` / ``$`` value resolved to its number).
``nnunet``      an nnU-Net v2 results folder ``<trainer>__<plans>__<configuration>/`` with
                ``plans.json``, ``dataset.json``, ``fold_N/checkpoint_final.pth`` (or ``_best``):
                the network as nnU-Net builds it from the plans (arch ``nnunet``), weights from
                ``network_weights``, preprocessing = nnU-Net's own (plans copied into the bank).
``checkpoint``  a state dict for any registered arch; channels read from the weights when not
                given; preprocessing ``target_plans`` unless a ``monai`` transform list is given.
=============== =====================================================================================

Every import checks before it writes: the weights are read with ``torch.load(weights_only=True)``
(a pickled checkpoint is refused, never executed) and loaded strictly into the network the source
describes (a mismatch names the first differing keys); the layout is found; a name that exists is
refused unless ``replace`` (the existing entry stays as it was). Every problem is a one-line
:class:`~medxfer.transfer.bank.BankError` naming the file. Provenance (kind, original path,
version, licence, sha256 of the original file, import date) is recorded with the entry; the
source's configs are copied to ``<bank>/sources/<name>/`` so the bank stays self-contained.
"""

from __future__ import annotations

import datetime
import logging
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch
import yaml
from monai.bundle import ConfigParser
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from medxfer.data.problems import DatasetError, read_json
from medxfer.networks import build_network, fit_patch, network_spec, registered
from medxfer.networks.layout import LayoutError
from medxfer.planning.nnunet_model import NnUNetCheckpointError
from medxfer.transfer.bank import BankEntry, BankError, ModelBank, entry_layout, sha256_file
from medxfer.transfer.weights import CheckpointError, read_checkpoint
from medxfer.transforms.nnunet_preprocessing import nnunet_preprocessing_summary, read_nnunet_checkpoint

__all__ = ["IMPORT_KINDS", "MONAI_ARCHS", "import_model", "import_bundle", "import_nnunet", "import_checkpoint",
           "read_layout", "nnunet_finetune_command"]

logger = logging.getLogger("medxfer.bank")

IMPORT_KINDS = ("bundle", "nnunet", "checkpoint")
#: MONAI network class -> registered arch (a bundle's ``network_def`` ``_target_``).
MONAI_ARCHS = {"UNet": "unet", "UNETR": "unetr", "SwinUNETR": "swinunetr", "SegResNet": "segresnet",
               "DynUNet": "dynunet", "BasicUNet": "basicunet", "FlexibleUNet": "flexibleunet"}
#: ``network_def`` keys that are the entry's own fields, not arch kwargs.
_CHANNEL_KEYS = ("in_channels", "out_channels", "spatial_dims")
#: Default patch of a checkpoint imported without one (the zoo's usual 96^3 window).
DEFAULT_PATCH = (96, 96, 96)


def _today() -> str:
    return datetime.date.today().isoformat()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_.") or "model"


def read_layout(layout) -> dict | None:
    """A layout override: a dict, or a JSON / YAML file holding one (``--layout``)."""
    if layout is None or isinstance(layout, Mapping):
        return None if layout is None else dict(layout)
    path = Path(layout)
    if not path.is_file():
        raise DatasetError(path, "layout file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DatasetError(path, f"invalid YAML/JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise DatasetError(path, "a layout is a mapping (encoder_levels, decoder_stages, head, penultimate_encoder)")
    return dict(data)


# --- shared checks ---------------------------------------------------------------------------------

def _check_new_name(bank: ModelBank, name: str, replace: bool) -> None:
    if name in bank and not replace:
        raise BankError(bank.manifest, f"entry {name!r} exists; pass --replace to replace it (the existing entry is "
                                       "kept as it is)")


def _check_weights(network: torch.nn.Module, state: Mapping[str, torch.Tensor], path, what: str) -> None:
    """Strict key / shape comparison; a difference is a :class:`BankError` naming the first keys."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} network tensors not in the file (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} file tensors not in the network (first: {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (first: {'; '.join(shapes[:3])})")
        raise BankError(path, f"the weights do not match {what} ({type(network).__name__}): " + "; ".join(parts))


def _read_weights(path, reader=read_checkpoint) -> dict[str, torch.Tensor]:
    try:
        return reader(path)
    except (CheckpointError, NnUNetCheckpointError) as e:
        raise BankError(e.path, e.reason) from None


def _build(arch: str, in_channels: int, out_channels: int, patch, arch_kwargs: dict, path) -> torch.nn.Module:
    try:
        return build_network(arch, in_channels, out_channels, patch, **arch_kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BankError(path, f"cannot build {arch} with {arch_kwargs}: {str(e).splitlines()[0]}") from None


def _check_layout(entry_like: BankEntry, network: torch.nn.Module, path) -> None:
    try:
        entry_layout(entry_like, network)
    except (LayoutError, ValueError) as e:
        raise BankError(path, f"{e} (pass a layout: --layout FILE with encoder_levels, decoder_stages, head, "
                              "penultimate_encoder)") from None


def _add(bank: ModelBank, name: str, state, network, *, arch, arch_kwargs, in_channels, out_channels, patch,
         preprocessing, provenance, layout, source=(), notes="", replace=False, weights_file=None,
         copy: Sequence[Path] = ()) -> BankEntry:
    """Check the layout, copy the source's files (``copy``) to ``sources/<name>/``, add the entry:
    nothing is written before every check passed."""
    probe = BankEntry(name=name, arch=arch, checkpoint="", sha256="", in_channels=in_channels,
                      out_channels=out_channels, patch_size=list(patch), arch_kwargs=arch_kwargs, layout=layout)
    _check_layout(probe, network, weights_file or bank.manifest)
    if copy:
        _copy_sources(bank, name, copy)
    entry = bank.add(name, state, arch=arch, in_channels=in_channels, out_channels=out_channels, patch_size=patch,
                     arch_kwargs=arch_kwargs, source=source, preprocessing=preprocessing, notes=notes,
                     overwrite=replace, provenance=provenance, layout=layout)
    logger.info("imported %s (%s %s, %d tensors) into %s", name, provenance.get("kind"), arch, len(state), bank.root)
    return entry


def _sources(name: str) -> str:
    """Bank-relative folder of an imported entry's copied source files."""
    return f"sources/{name}"


def _copy_sources(bank: ModelBank, name: str, files: Sequence[Path]) -> None:
    """Copy the source's config files into ``<bank>/sources/<name>/`` (replaced on re-import)."""
    dest = bank.root / _sources(name)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in files:
        if Path(f).is_file():
            shutil.copy2(f, dest / Path(f).name)


# --- MONAI model-zoo bundle --------------------------------------------------------------------------

def _bundle_config(bundle: Path, config: str | None) -> Path:
    if config:
        path = Path(config) if Path(config).is_absolute() else bundle / config
        if not path.is_file():
            raise BankError(path, "bundle config not found")
        return path
    for ext in ("json", "yaml", "yml"):
        path = bundle / "configs" / f"inference.{ext}"
        if path.is_file():
            return path
    raise BankError(bundle / "configs", "no inference config (configs/inference.json, .yaml or .yml): not a MONAI bundle")


def _plain_value(value, where: str, path):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_value(v, where, path) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain_value(v, where, path) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return value.item()
    raise BankError(path, f"{where}: resolves to a {type(value).__name__}, which cannot be recorded as a number or "
                          "string (pass the model as --kind checkpoint instead)")


def _literal(parser: ConfigParser, id_: str, path):
    """The config item ``id_`` with every ``@`` reference and ``$`` expression evaluated (MONAI's
    parser), keeping ``_target_`` names: a plain, readable, self-contained copy."""
    raw = parser.get(id_)
    if isinstance(raw, Mapping):
        return {str(k): (v if k == "_target_" else _literal(parser, f"{id_}#{k}", path)) for k, v in raw.items()
                if k not in ("_requires_", "_desc_")}
    if isinstance(raw, list):
        return [_literal(parser, f"{id_}#{i}", path) for i in range(len(raw))]
    if isinstance(raw, str) and raw.startswith(("@", "$", "%")):
        try:
            value = parser.get_parsed_content(id_)
        except Exception as e:  # noqa: BLE001 - any failure of the bundle's own expression: one line
            raise BankError(path, f"{id_.replace('#', '#')}: cannot evaluate {raw!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return _plain_value(value, id_, path)
    return raw


def _class_name(target: str) -> tuple[str, bool]:
    """(``UNet``, is MONAI's) from ``UNet`` / ``monai.networks.nets.UNet`` / ``monai.networks.nets.unet.UNet``."""
    parts = str(target).split(".")
    return parts[-1], len(parts) == 1 or parts[0] == "monai"


def _bundle_patch(parser: ConfigParser, metadata: dict, cfg: Path, dims: int) -> list[int]:
    if "inferer" in parser and isinstance(parser.get("inferer"), Mapping) and "roi_size" in parser.get("inferer"):
        roi = _literal(parser, "inferer#roi_size", cfg)
    else:
        roi = (metadata.get("network_data_format", {}).get("inputs", {}).get("image", {}) or {}).get("spatial_shape")
    if isinstance(roi, int):
        roi = [roi] * dims
    if not isinstance(roi, list) or not all(isinstance(r, int) and r > 0 for r in roi):
        raise BankError(cfg, "no window size: neither inferer#roi_size nor metadata.json network_data_format inputs."
                             f"image.spatial_shape gives integer sides (found {roi!r})")
    return roi


def import_bundle(bank_root, bundle_dir, name: str | None = None, replace: bool = False, layout=None,
                  config: str | None = None) -> BankEntry:
    """Import a MONAI model-zoo bundle folder (see the module doc). ``config``: another inference
    config than ``configs/inference.*`` (relative to the bundle)."""
    bundle = Path(bundle_dir).resolve()
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise BankError(meta_file, "not a MONAI bundle: configs/metadata.json not found")
    metadata = read_json(meta_file)
    cfg = _bundle_config(bundle, config)
    parser = ConfigParser()
    try:
        parser.read_config(str(cfg))
    except Exception as e:  # noqa: BLE001 - a broken JSON / YAML file: one line
        raise BankError(cfg, f"cannot read the config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    parser["bundle_root"] = str(bundle)
    if "network_def" not in parser:
        raise BankError(cfg, "no network_def: a bundle's inference config must define the network as network_def "
                             "(a dict with _target_)")
    raw_net = parser.get("network_def")
    if not isinstance(raw_net, Mapping) or "_target_" not in raw_net:
        raise BankError(cfg, "network_def is not a component (a dict with _target_); it cannot be rebuilt")
    network_def = _literal(parser, "network_def", cfg)
    weights = bundle / "models" / "model.pt"
    if not weights.is_file():
        large = [p.name for p in bundle.glob("large_files.*")]
        hint = (f"; {large[0]} lists it: fetch it first (python -m monai.bundle download, or the URL there)"
                if large else "")
        raise BankError(weights, "bundle weights not found" + hint)
    state = _read_weights(weights)

    data_format = metadata.get("network_data_format", {})
    dims = int(network_def.get("spatial_dims", 3))
    in_ch = network_def.get("in_channels", (data_format.get("inputs", {}).get("image") or {}).get("num_channels"))
    out_ch = network_def.get("out_channels", (data_format.get("outputs", {}).get("pred") or {}).get("num_channels"))
    if not isinstance(in_ch, int) or not isinstance(out_ch, int):
        raise BankError(cfg, "network_def gives no integer in_channels / out_channels (nor does metadata.json)")
    patch = _bundle_patch(parser, metadata, cfg, dims)
    cls, is_monai = _class_name(network_def["_target_"])
    if is_monai and cls in MONAI_ARCHS and dims == 3:
        arch = MONAI_ARCHS[cls]
        drop = set(_CHANNEL_KEYS) | {"_target_"} | ({"img_size"} if arch in ("swinunetr", "unetr") else set())
        arch_kwargs = {k: v for k, v in network_def.items() if k not in drop}
        if arch == "unetr" and "img_size" in network_def:  # UNETR's position embeddings are per window
            size = network_def["img_size"]
            patch = [size] * dims if isinstance(size, int) else list(size)
    else:
        arch, arch_kwargs = "network_def", {"network_def": network_def}
    network = _build(arch, in_ch, out_ch, patch, arch_kwargs, cfg)
    _check_weights(network, state, weights, f"network_def of {cfg.name}")

    if "preprocessing" not in parser:
        raise BankError(cfg, "no preprocessing: the bundle's inference config defines no 'preprocessing' transforms")
    pre = _literal(parser, "preprocessing", cfg)
    transforms = pre.get("transforms") if isinstance(pre, Mapping) else pre
    if not isinstance(transforms, list) or not all(isinstance(t, Mapping) and "_target_" in t for t in transforms):
        raise BankError(cfg, "preprocessing is not a Compose of transform configs (a 'transforms' list of dicts "
                             "with _target_)")
    keys = next((t.get("keys") for t in transforms if t.get("keys")), "image")
    image_key = keys if isinstance(keys, str) else keys[0]
    transforms = [t for t in transforms if not t.get("_disabled_")]

    name = name or _slug(metadata.get("name") or bundle.name)
    bank = ModelBank.open(bank_root, create=True)
    _check_new_name(bank, name, replace)
    licence_file = bundle / "LICENSE"
    licence = licence_file.read_text().strip().splitlines()[0] if licence_file.is_file() and licence_file.read_text().strip() \
        else str(metadata.get("copyright", ""))
    rel = _sources(name)
    provenance = {"kind": "bundle", "original": str(bundle), "name": metadata.get("name", bundle.name),
                  "version": str(metadata.get("version", "")), "licence": licence,
                  "monai_version": str(metadata.get("monai_version", "")), "sha256": sha256_file(weights),
                  "weights": "models/model.pt", "config": cfg.relative_to(bundle).as_posix(), "copied_to": rel,
                  "imported": _today()}
    preprocessing = {"kind": "monai", "image_key": image_key, "transforms": transforms,
                     "summary": [_describe(t) for t in transforms]}
    return _add(bank, name, state, network, arch=arch, arch_kwargs=arch_kwargs, in_channels=in_ch, out_channels=out_ch,
                patch=patch, preprocessing=preprocessing, provenance=provenance, layout=read_layout(layout),
                source=[str(metadata.get("name", bundle.name))], notes=str(metadata.get("description", ""))[:500],
                replace=replace, weights_file=weights, copy=[meta_file, cfg, licence_file])


def _describe(transform: Mapping) -> str:
    """``Spacingd(pixdim=[1.5, 1.5, 2.0], mode=bilinear)``: one transform with its numbers."""
    args = ", ".join(f"{k}={v}" for k, v in transform.items() if k not in ("_target_", "keys"))
    return f"{_class_name(transform['_target_'])[0]}({args})"


# --- nnU-Net v2 trained-model folder -------------------------------------------------------------------

def import_nnunet(bank_root, folder, name: str | None = None, fold: int | str = 0,
                  checkpoint: str = "checkpoint_final.pth", replace: bool = False, layout=None) -> BankEntry:
    """Import an nnU-Net v2 trained-model folder (see the module doc)."""
    folder = Path(folder).resolve()
    plans_file, dataset_file = folder / "plans.json", folder / "dataset.json"
    if not plans_file.is_file():
        raise BankError(plans_file, "not an nnU-Net v2 trained-model folder: plans.json not found")
    if not dataset_file.is_file():
        raise BankError(dataset_file, "not an nnU-Net v2 trained-model folder: dataset.json not found")
    fold_dir = folder / f"fold_{fold}"
    if not fold_dir.is_dir():
        folds = sorted(p.name for p in folder.glob("fold_*"))
        raise BankError(fold_dir, f"fold {fold} not found (folds here: {folds or 'none'})")
    ckpt = fold_dir / checkpoint
    if not ckpt.is_file():
        found = sorted(p.name for p in fold_dir.glob("checkpoint_*.pth"))
        raise BankError(ckpt, f"checkpoint not found (checkpoints here: {found or 'none'})")
    plans, dataset_json = read_json(plans_file), read_json(dataset_file)
    info = _read_weights(ckpt, read_nnunet_checkpoint)
    state = info["network_weights"]
    configuration = info.get("configuration") or folder.name.split("__")[-1]
    try:
        manager = PlansManager(plans)
        config = manager.get_configuration(configuration)
        heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    except (KeyError, ValueError, TypeError) as e:
        raise BankError(plans_file, f"configuration {configuration!r}: {type(e).__name__}: {e}") from None
    arch_kwargs = {"network_class_name": config.network_arch_class_name,
                   "arch_kwargs": dict(config.network_arch_init_kwargs),
                   "_kw_requires_import": list(config.network_arch_init_kwargs_req_import)}
    in_ch = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    patch = [int(p) for p in config.patch_size]
    network = _build("nnunet", in_ch, heads, patch, arch_kwargs, plans_file)
    _check_weights(network, state, ckpt, f"the network of {plans_file.name} ({configuration})")

    name = name or _slug(f"nnunet_{plans.get('dataset_name', folder.parent.name)}_{configuration}_fold{fold}")
    bank = ModelBank.open(bank_root, create=True)
    _check_new_name(bank, name, replace)
    rel = _sources(name)
    preprocessing = {"kind": "nnunet", "plans": f"{rel}/plans.json", "dataset_json": f"{rel}/dataset.json",
                     "configuration": configuration,
                     "summary": nnunet_preprocessing_summary(plans, configuration, dataset_json)}
    provenance = {"kind": "nnunet", "original": str(ckpt), "trainer": info.get("trainer_name", folder.name.split("__")[0]),
                  "plans_name": plans.get("plans_name", ""), "configuration": configuration, "fold": str(fold),
                  "checkpoint": checkpoint, "version": f"nnU-Net v2 ({info.get('trainer_name', '')})",
                  "licence": str(dataset_json.get("licence", dataset_json.get("license", ""))),
                  "sha256": sha256_file(ckpt), "copied_to": rel, "imported": _today()}
    source = [str(plans.get("dataset_name", folder.parent.name))]
    return _add(bank, name, state, network, arch="nnunet", arch_kwargs=arch_kwargs, in_channels=in_ch,
                out_channels=heads, patch=patch, preprocessing=preprocessing, provenance=provenance,
                layout=read_layout(layout), source=source, replace=replace, weights_file=ckpt,
                notes=f"nnU-Net {configuration} fold {fold}, {checkpoint}",
                copy=[plans_file, dataset_file, folder / "dataset_fingerprint.json"])


def nnunet_finetune_command(entry: BankEntry, bank_root, target_dataset: str = "TARGET") -> str | None:
    """nnU-Net's own recipe to fine-tune an imported nnU-Net entry on a target dataset (nnU-Net's
    documentation, "pretraining and finetuning": the target is preprocessed with the *source
    model's* plans, then ``nnUNetv2_train ... -pretrained_weights`` loads nnU-Net's checkpoint file);
    ``None`` for entries of other kinds. The plans copy is the one kept in the bank."""
    if entry.provenance.get("kind") != "nnunet":
        return None
    configuration = entry.provenance.get("configuration", "3d_fullres")
    plans_name = f"medxfer_{entry.name}"
    plans = Path(bank_root) / str(entry.preprocessing.get("plans", f"sources/{entry.name}/plans.json"))
    fold = entry.provenance.get("fold", "0")
    return "\n".join([
        f"# nnU-Net's own fine-tuning from {entry.name} (after nnUNetv2_plan_and_preprocess -d {target_dataset}):",
        f"cp {plans} $nnUNet_preprocessed/Dataset{target_dataset}/{plans_name}.json  "
        f"# then set its dataset_name to the target's and plans_name to {plans_name}",
        f"nnUNetv2_preprocess -d {target_dataset} -plans_name {plans_name} -c {configuration}",
        f"nnUNetv2_train {target_dataset} {configuration} {fold} -p {plans_name} "
        f"-pretrained_weights {entry.provenance.get('original', '')}"])


# --- a plain checkpoint -----------------------------------------------------------------------------------

def _infer_channels(arch: str, state: Mapping[str, torch.Tensor], patch, arch_kwargs: dict, path) -> tuple[int, int]:
    """(in, out) channels from the weights: the first convolution's input side, the head's output side
    (network built once with 1 -> 2 channels to find which tensors those are)."""
    probe = _build(arch, 1, 2, patch, arch_kwargs, path)
    own = probe.state_dict()
    first = next((k for k, v in own.items() if v.ndim >= 3 and k in state), None)
    probe_entry = BankEntry(name="probe", arch=arch, checkpoint="", sha256="", in_channels=1, out_channels=2,
                            patch_size=list(patch), arch_kwargs=arch_kwargs)
    try:
        head = entry_layout(probe_entry, probe)
    except (LayoutError, ValueError) as e:
        raise BankError(path, str(e)) from None
    heads = [k for k, v in own.items() if head.in_head(k) and v.ndim >= 2 and k in state]
    if first is None or not heads:
        raise BankError(path, f"cannot read the channels from the weights (no {arch} convolution / head tensor "
                              "among them); pass --in-channels and --out-channels")
    return int(state[first].shape[1]), int(state[heads[-1]].shape[0])


def import_checkpoint(bank_root, file, arch: str, arch_kwargs: dict | None = None, name: str | None = None,
                      in_channels: int | None = None, out_channels: int | None = None, patch_size=None,
                      preprocessing: Mapping | None = None, replace: bool = False, layout=None,
                      source: Sequence[str] = (), url: str = "", version: str = "", licence: str = "") -> BankEntry:
    """Import a state dict of a registered ``arch`` (see the module doc). ``preprocessing``: a
    ``monai`` kind dict (``{"kind": "monai", "transforms": [...]}``) or ``None`` (the target's plans)."""
    path = Path(file).resolve()
    try:
        spec = network_spec(arch)
    except ValueError:
        raise BankError(path, f"unknown arch {arch!r}; registered networks: {', '.join(registered())}") from None
    arch_kwargs = dict(arch_kwargs or {})
    state = _read_weights(path)
    patch = [int(p) for p in (patch_size or DEFAULT_PATCH[:spec.spatial_dims])]
    patch = fit_patch(spec.name, patch, arch_kwargs) if spec.name != "network_def" else patch
    if in_channels is None or out_channels is None:
        found_in, found_out = _infer_channels(spec.name, state, patch, arch_kwargs, path)
        in_channels = found_in if in_channels is None else in_channels
        out_channels = found_out if out_channels is None else out_channels
    network = _build(spec.name, int(in_channels), int(out_channels), patch, arch_kwargs, path)
    _check_weights(network, state, path, f"arch {spec.name} with {arch_kwargs or 'its default kwargs'}")
    pre = dict(preprocessing or {"kind": "target_plans"})
    if pre.get("kind") == "monai" and "summary" not in pre:
        pre["summary"] = [_describe(t) for t in pre.get("transforms") or []]
    name = name or _slug(path.stem)
    bank = ModelBank.open(bank_root, create=True)
    _check_new_name(bank, name, replace)
    provenance = {"kind": "checkpoint", "original": url or str(path), "version": version, "licence": licence,
                  "sha256": sha256_file(path), "imported": _today()}
    return _add(bank, name, state, network, arch=spec.name, arch_kwargs=arch_kwargs, in_channels=int(in_channels),
                out_channels=int(out_channels), patch=patch, preprocessing=pre, provenance=provenance,
                layout=read_layout(layout), source=list(source), replace=replace, weights_file=path)


def import_model(bank_root, kind: str, source, **options) -> BankEntry:
    """``medxfer bank import BANK KIND SOURCE``: dispatch on ``kind`` (:data:`IMPORT_KINDS`)."""
    if kind not in IMPORT_KINDS:
        raise ValueError(f"unknown import kind {kind!r}; choose from {list(IMPORT_KINDS)}")
    return {"bundle": import_bundle, "nnunet": import_nnunet, "checkpoint": import_checkpoint}[kind](
        bank_root, source, **options)
