"""Score every model of a bank on a target dataset with every estimator, in one pass per model.

For each bank entry (SPEC sections 4-5): build the entry's network with its own channels and
classes, load its weights (sha256-checked, weights only; the whole network, head included, since
LEEP / NCE read the source head), preprocess the target's labelled cases the way *that entry*
expects (:mod:`medxfer.transforms.preprocessing`: the target's own plans for medxfer's models, as
fine-tuning does; a zoo bundle's recorded inference transforms; nnU-Net's own preprocessing for an
nnU-Net model; each distinct preprocessing prepared once per scoring run), and sample voxel
features once (:mod:`medxfer.transferability.features`); every estimator then works on those samples:

=================  ==============================================================================
``ccfv``           CC-FV, paper definition (:func:`medxfer.transferability.ccfv.ccfv_score`)
``ccfv_official``  CC-FV as the official code computes it (``variant="official"``)
``logme``          LogME on the last decoder stage (the layer before the final conv), pooled cases
``gbc``            GBC on the same features
``transrate``      TransRate on the same features (paper definition, ``variant="paper"``)
``transrate_official``  TransRate as the authors' code computes it (``variant="official"``: rows
                   L2-normalised before and after centring, the rate divided by rank(Z))
``leep``           LEEP from the source head's softmax at the sampled voxels
``nce``            NCE from the source head's argmax at the sampled voxels
``robustness``     robustness (thesis ch. 4) of the second-to-last encoder level, on one window per
                   case (its centre; several windows of a single case) under intensity jitter, or
                   on the target's own robustness images (2D: colour jitter), with the target's
                   settings (:attr:`ScoringTarget.robustness`: jitter, pooling, distance, margin):
                   3 extra forward passes per image
=================  ==============================================================================

Higher is better for every score. Per entry the seconds spent in the forward passes and in the
estimator math are recorded, so a benchmark can compare them with bare forward passes.

Scoring a large bank takes long, so it resumes (:func:`score_into`, used by ``medxfer rank``, the
``transferability`` bundle's ``score`` config, the study and 2D checkpoint selection): each model's
row is kept as soon as it is scored, with what it was scored for, and the folder's state marker
``scores.state.json`` is written last; a killed scoring run again scores only the models not done,
a finished one is read back, and scores of other settings are never silently mixed in.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop
from monai.utils import convert_to_tensor
from tqdm.auto import tqdm

from medxfer.atomic import atomic_path
from medxfer.data.msd import load_task
from medxfer.data.preflight import check_seg2d_records, check_task_records
from medxfer.data.problems import DatasetError
from medxfer.data.seg2d import load_seg2d
from medxfer.device import resolve_device
from medxfer.distributed import DistributedError, Group, init_from_env, rank_device, split_range
from medxfer.jsonfile import json_safe, write_json
from medxfer.networks import build_network
from medxfer.transfer.bank import ModelBank, entry_layout
from medxfer.transferability.ccfv import ccfv_score
from medxfer.transferability.features import CaseFeatures, SamplingConfig, pooled, sample_dataset, window_starts
from medxfer.transferability.gbc import gbc
from medxfer.transferability.leep import leep_cases
from medxfer.transferability.logme import logme
from medxfer.transferability.nce import nce_cases
from medxfer.transferability.robustness import module_robustness, robustness_options
from medxfer.transferability.transrate import transrate
from medxfer.transforms.dermoscopy import IMAGENET_MEAN, IMAGENET_STD
from medxfer.transforms.msd import msd_transforms
from medxfer.transforms.preprocessing import entry_transforms, preprocessing_key
from medxfer.transforms.seg2d import seg2d_transforms, unnormalized_images

__all__ = ["ESTIMATORS", "DEFAULT_ESTIMATORS", "SOURCE_HEAD_ESTIMATORS", "ScoringTarget", "run_estimators",
           "robustness_windows", "target_cases", "seg2d_target", "score_bank", "score_target", "write_scores",
           "target_digest", "task_target", "prepare_cases", "ROWS_DIR", "STATE_FILE", "scoring_key", "finished_scores", "clear_scores", "score_into",
           "task_key", "seg2d_key", "score_bank_into", "amp_dtype", "DEFAULT_ROBUSTNESS", "robustness_settings"]

logger = logging.getLogger("medxfer.transferability")


def _ccfv(variant: str) -> Callable:
    def score(cases):
        return ccfv_score(cases, variant=variant)["score"]
    return score


def _on_last_stage(fn: Callable) -> Callable:
    def score(cases):
        return fn(*pooled(cases, level=-1))
    return score


#: Estimator name -> function of the sampled cases of one model returning one float.
ESTIMATORS: dict[str, Callable[[Sequence[CaseFeatures]], float]] = {
    "ccfv": _ccfv("paper"), "ccfv_official": _ccfv("official"), "logme": _on_last_stage(logme),
    "gbc": _on_last_stage(gbc), "transrate": _on_last_stage(transrate),
    "transrate_official": _on_last_stage(functools.partial(transrate, variant="official")), "leep": leep_cases, "nce": nce_cases,
}
DEFAULT_ESTIMATORS = (*ESTIMATORS, "robustness")
#: Estimators that read the source network's own segmentation head (per-voxel class probabilities).
SOURCE_HEAD_ESTIMATORS = ("leep", "nce")


def robustness_windows(cases: Sequence[dict], roi: Sequence[int], max_single: int = 4) -> torch.Tensor:
    """Images for the robustness score, ``(N, C, *roi)``: one window per case around its centre
    (zero-padded when smaller). With a single case, up to ``max_single`` of its non-overlapping
    windows stand for distinct images (a different region is the negative), or, when it holds
    fewer than two windows, its two halves along the longest axis (each padded to the window):
    one labelled case still gets a score."""
    roi = [int(r) for r in roi]
    if len(cases) == 1:
        image = torch.as_tensor(cases[0]["image"])
        starts = itertools.product(*[window_starts(n, r) for n, r in zip(image.shape[1:], roi)])
        crops = [image[(slice(None), *[slice(a, a + r) for a, r in zip(st, roi)])] for st in starts]
        crops = [c for c in crops if list(c.shape[1:]) == roi][:max_single]
        if len(crops) >= 2:
            return torch.stack(crops)
        axis = int(torch.tensor(image.shape[1:]).argmax()) + 1  # smaller than two windows: its two halves
        cases = [{"image": half} for half in torch.tensor_split(image, 2, dim=axis)]
    crop = ResizeWithPadOrCrop(roi)
    return torch.stack([torch.as_tensor(crop(torch.as_tensor(c["image"]))) for c in cases])


def run_estimators(cases: Sequence[CaseFeatures], estimators: Sequence[str] = DEFAULT_ESTIMATORS) -> dict[str, dict]:
    """``{name: {"score": float (NaN if undefined), "seconds": float, "error": str|None}}``.

    An estimator that fails on degenerate input gives NaN with the reason, the others still run.
    """
    out = {}
    for name in estimators:
        if name == "robustness":  # needs the network, not the samples: see score_bank
            continue
        if name not in ESTIMATORS:
            raise ValueError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}")
        t0 = time.perf_counter()
        try:
            value, error = float(ESTIMATORS[name](cases)), None
        except (ValueError, np.linalg.LinAlgError, FloatingPointError) as e:
            value, error = float("nan"), f"{type(e).__name__}: {e}"
            logger.warning("estimator %s undefined here: %s", name, error)
        out[name] = {"score": value, "seconds": time.perf_counter() - t0, "error": error}
    return out


@dataclass
class ScoringTarget:
    """What a bank is scored on: labelled, preprocessed target cases and the robustness images.

    Attributes:
        name: the target (a folder), for the scores' metadata.
        cases: ``{"id", "image": (C, ...), "label": (1, ...)}`` through the target's evaluation chain.
        roi: sampling window / network input size; ``None``: each bank entry's own patch (3D).
        robustness_images: ``(N, C, ...)`` images the robustness score jitters; ``None``: one window
            per case around its centre at the entry's patch (:func:`robustness_windows`, 3D).
        robustness_mode: ``"intensity"`` (3D CT/MR) or ``"color"`` (2D RGB images in ``[0, 1]``).
        normalize: ``(mean, std)`` applied to the jittered views (2D: the pretraining's), or ``None``.
        robustness_batch: views per forward pass of the robustness score.
        prepare: ``(entry preprocessing dict, bank folder) -> cases`` for entries that expect their
            own preprocessing (:mod:`medxfer.transforms.preprocessing`); ``None``: every entry must
            take the target's (``cases``).
        robustness: the robustness settings, keyword arguments of
            :func:`~medxfer.transferability.robustness.robustness_options` (``jitter``, ``pooled``,
            ``distance``, ``margin``; its output fits too), e.g. a 2D bundle's thesis settings;
            ``None``: :data:`DEFAULT_ROBUSTNESS` (pooled features, the default jitter, cosine
            distance, margin 0.5: the 3D scoring's settings).
    """

    name: str
    cases: list[dict]
    roi: list[int] | None = None
    robustness_images: torch.Tensor | None = None
    robustness_mode: str = "intensity"
    normalize: tuple | None = None
    robustness_batch: int = 2
    prepare: Callable[[dict, Path], list[dict]] | None = None
    robustness: dict | None = None


#: Robustness settings of a target without its own (:attr:`ScoringTarget.robustness` ``None``):
#: pooled features (medxfer's choice for 3D, where features of a whole window are large), the
#: default jitter (:data:`~medxfer.transferability.robustness.THESIS_JITTER`: the authors' colour
#: strengths, medxfer's intensity ones), cosine distance, margin 0.5 (thesis eqs. 4.1-4.3).
DEFAULT_ROBUSTNESS = robustness_options(pooled=True)


def robustness_settings(options: dict | None) -> dict:
    """Checked robustness settings (:func:`~medxfer.transferability.robustness.robustness_options`:
    ``{"jitter": JitterConfig, "pooled", "distance", "margin"}``) of a target's ``robustness``
    (``None``: :data:`DEFAULT_ROBUSTNESS`); ``pooled`` must be decided (``True`` / ``False``) or a
    ``transfer_mode`` given."""
    if options is None:
        return DEFAULT_ROBUSTNESS
    options = dict(options)
    unknown = sorted(set(options) - {"jitter", "pooled", "distance", "margin", "transfer_mode"})
    if unknown:
        raise ValueError(f"robustness settings: unknown key(s) {unknown}; choose from jitter, pooled, distance, "
                         "margin, transfer_mode")
    if options.get("pooled") is None and options.get("transfer_mode") is None:
        raise ValueError("robustness settings: pooled is not set and no transfer_mode says it (pooled for "
                         "decoder_only, unpooled otherwise); give one of them")
    return robustness_options(**options)


def _robustness_record(options: dict | None) -> dict | None:
    """Plain JSON of robustness settings for the cache keys; ``None`` for :data:`DEFAULT_ROBUSTNESS`
    (keys of targets with the default settings stay what they were before the settings existed)."""
    settings = robustness_settings(options)
    if settings == DEFAULT_ROBUSTNESS:
        return None
    return _plain_key({**settings, "jitter": asdict(settings["jitter"])})


def _task_records(data_root, plans: dict, max_cases: int | None, split_ids: Sequence[str] | None) -> list[dict]:
    task = load_task(data_root)
    records = task.training
    if split_ids is not None:
        wanted = set(split_ids)
        records = [r for r in records if r["id"] in wanted]
    if max_cases:
        records = records[:max_cases]
    check_task_records(task, records, plans=plans)  # the check-data checks (cached), memory, not all background
    return records


def prepare_cases(records: Sequence[dict], chain: Callable[[dict], dict]) -> list[dict]:
    """``{"id", "image": (C, ...), "label": (1, ...)}`` of each record through ``chain``."""
    out = []
    for r in records:
        item = chain(r)
        out.append({"id": r["id"], "image": convert_to_tensor(item["image"], track_meta=False),
                    "label": item["label"]})
    return out


def target_cases(data_root, plans: dict, max_cases: int | None = None, split_ids: Sequence[str] | None = None) -> list[dict]:
    """Preprocessed labelled target cases of an MSD / nnU-Net task (the target's plans, eval chain:
    RAS, spacing, crop, normalisation), as ``{"id", "image": (C, ...), "label": (1, ...)}``;
    ``split_ids`` restricts them (e.g. the fine-tuning fold's training cases), ``max_cases`` keeps
    the first ones."""
    return prepare_cases(_task_records(data_root, plans, max_cases, split_ids), msd_transforms(plans, mode="eval"))


def task_target(data_root, plans: dict, max_cases: int | None = None,
                split_ids: Sequence[str] | None = None) -> ScoringTarget:
    """An MSD / nnU-Net task as a scoring target: its cases through the target's plans
    (:func:`target_cases`) and, for entries that expect their own preprocessing, the same records
    through that (:func:`medxfer.transforms.preprocessing.entry_transforms`)."""
    records = _task_records(data_root, plans, max_cases, split_ids)
    if not records:
        raise ValueError(f"{data_root}: no labelled target cases to score on")

    def prepare(preprocessing: dict, bank_root: Path) -> list[dict]:
        return prepare_cases(records, entry_transforms(preprocessing, plans, "eval", bank_root))

    return ScoringTarget(str(data_root), prepare_cases(records, msd_transforms(plans, mode="eval")), prepare=prepare)


def seg2d_target(data_root, image_size, max_cases: int | None = 16, robustness: dict | None = None) -> ScoringTarget:
    """A 2D segmentation folder as a scoring target: its first ``max_cases`` labelled images (``None``:
    all) through the evaluation chain at ``image_size`` (features), and the same images in ``[0, 1]``
    for the robustness score under colour jitter, normalised like an ImageNet-style pretraining
    (thesis ch. 4), with the ``robustness`` settings (:attr:`ScoringTarget.robustness`)."""
    size = [int(image_size)] * 2 if np.isscalar(image_size) else [int(s) for s in image_size]
    records, labels = load_seg2d(data_root)  # read once: labelled cases and raw images for robustness
    check_seg2d_records(data_root, records[:max_cases] if max_cases else records)  # decoded once (cached)
    chain = seg2d_transforms("eval", size, labels)
    cases = []
    for r in records[:max_cases] if max_cases else records:
        item = chain(r)
        cases.append({"id": r["id"], "image": torch.as_tensor(np.asarray(item["image"])),
                      "label": np.asarray(item["label"]).astype(np.int64)})
    return ScoringTarget(str(data_root), cases, size, unnormalized_images(records, size, max_cases or None), "color",
                         (IMAGENET_MEAN, IMAGENET_STD), robustness_batch=4, robustness=robustness)


def score_bank(bank_root, data_root, plans: dict, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
               sampling: SamplingConfig | None = None, entries: Sequence[str] | None = None, device: str | None = None,
               max_cases: int | None = None, split_ids: Sequence[str] | None = None, progress: bool = True,
               seed: int = 0, cache_dir=None) -> list[dict]:
    """Scores of every bank entry (or ``entries``) on an MSD / nnU-Net target task (:func:`target_cases`
    with the target's ``plans``); :func:`score_target` does the work (``cache_dir``: see there)."""
    return score_target(bank_root, task_target(data_root, plans, max_cases, split_ids), estimators, sampling, entries,
                        device, progress, seed, cache_dir=cache_dir)


def _plain_key(obj):
    """``obj`` as plain, key-sorted JSON values: a recorded and a recomputed key compare equal."""
    return json.loads(json.dumps(json_safe(obj), sort_keys=True, default=str))


def _read_json(path: Path):
    """The JSON in ``path``, ``None`` if missing or unreadable (a marker that cannot be read is not trusted)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _as_array(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def target_digest(target: ScoringTarget) -> str:
    """sha256 of what a score depends on besides the model: every case's id, image and label
    values (as preprocessed), the robustness images and the target's settings (robustness settings
    other than :data:`DEFAULT_ROBUSTNESS` included). A cached per-model
    row (:func:`score_target`'s ``cache_dir``) is reused only for the same digest."""
    h = hashlib.sha256()

    def add(array) -> None:
        a = np.ascontiguousarray(_as_array(array))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())

    for case in target.cases:
        h.update(str(case["id"]).encode())
        add(case["image"])
        add(case["label"])
    if target.robustness_images is not None:
        add(target.robustness_images)
    h.update(json.dumps([target.roi, target.robustness_mode, target.normalize, target.robustness_batch],
                        default=str).encode())
    robustness = _robustness_record(target.robustness)
    if robustness is not None:  # the default settings add nothing: digests of earlier caches still match
        h.update(json.dumps(robustness, sort_keys=True).encode())
    return h.hexdigest()


def _restore_nan(row: dict, estimators: Sequence[str]) -> dict:
    """JSON stores an undefined score (NaN) as ``null``: back to NaN for the numeric columns."""
    return {k: (math.nan if v is None and (k in estimators or k.startswith("seconds")) else v) for k, v in row.items()}


def amp_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """The autocast dtype of the scoring forward passes: float16 on CUDA (``amp``), ``None`` (full
    precision) on CPU or without ``amp``.

    float16, not bfloat16: measured on the tiny test bank (tests/test_te_score.py), features rounded
    to float16 move every estimator by < 1e-3 relative (6e-4 at most, TransRate), rounded to
    bfloat16 (8 mantissa bits) by up to 2e-3 (CC-FV, TransRate). float16's range (65504) is guarded
    instead: a window batch that overflows is run again in full precision
    (:func:`~medxfer.transferability.features.sample_case`)."""
    if not amp or device.type != "cuda":
        return None
    return torch.float16


def _row(name: str, entry, feats: list[CaseFeatures], t_forward: float, robustness: dict | None,
         estimators: Sequence[str]) -> dict:
    """One model's row from all its cases' features (case order) and its robustness result."""
    results = run_estimators(feats, estimators)
    if "robustness" in estimators:
        results["robustness"] = robustness
        results = {k: results[k] for k in estimators}
    row = {"model": name, "arch": entry.arch, "source": "+".join(entry.source) or "scratch", "epoch": entry.epoch}
    row.update({k: v["score"] for k, v in results.items()})
    row.update({"seconds_forward": t_forward, "seconds_estimators": sum(v["seconds"] for v in results.values())})
    row.update({f"seconds_{k}": v["seconds"] for k, v in results.items()})
    row["errors"] = {k: v["error"] for k, v in results.items() if v["error"]}
    return row


def score_target(bank_root, target: ScoringTarget, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
                 sampling: SamplingConfig | None = None, entries: Sequence[str] | None = None,
                 device: str | None = None, progress: bool = True, seed: int = 0, cache_dir=None,
                 amp: bool = True, group: Group | None = None) -> list[dict]:
    """THE scoring loop (2D and 3D): every bank entry (or ``entries``) is built from the registry with
    its own channels and classes, loaded (sha256-checked, weights only; the whole network, head
    included, since LEEP / NCE read the source head), its features sampled once at the layout's
    feature stages (decoder stages; an encoder classifier's last two encoder levels), every
    estimator run on those samples, and robustness measured on the target's robustness images.

    Rows: ``{"model", "arch", "source", "epoch", <estimator>: score, ..., "errors": {...},
    "seconds_forward", "seconds_estimators", "seconds_<estimator>"}``.

    ``cache_dir``: each model's row is also written there (``<model>.json``, atomically, with
    what it is for: the entry's sha256, estimators, sampling, seed, :func:`target_digest`) as
    soon as it is scored, and a row recorded there for the same key is reused instead of scored
    again: a killed scoring of a large bank resumes at the next model. Every model is scored
    with its own seeds, so a resumed scoring gives the rows of an uninterrupted one.

    ``amp``: forward passes under autocast on CUDA (:func:`amp_dtype`; recorded in the cache key
    then); the estimators compute in float64 from float32 features either way; robustness keeps
    full precision (distances of encoder features, a few forward passes per image).

    Robustness uses the target's settings (:attr:`ScoringTarget.robustness`: jitter, pooled or
    unpooled features, distance, margin; :func:`robustness_settings`), part of the cache key when
    they are not :data:`DEFAULT_ROBUSTNESS`. With ``robustness`` the only estimator no voxel
    features are sampled (nothing would read them).

    Under ``torchrun`` (``group``: :func:`medxfer.distributed.init_from_env` by default) the
    (model, case) pairs still to score are split into contiguous, equal shares, one per rank, each
    rank on its own device (:func:`medxfer.distributed.rank_device`). A model whose cases all fall
    to one rank is finished there; a model split between ranks (at most ``world_size - 1`` of
    them) is finished by the rank holding its first case, which also measures its robustness, after
    the others sent it their cases' features. Every case is sampled with the seed of its position
    (:func:`~medxfer.transferability.features.sample_dataset`), so the rows equal the single-process
    ones; every rank returns all rows. Rank 0 alone decides which cached rows count (and broadcasts
    it); each rank writes the rows it finishes into ``cache_dir`` (on one node or a shared file
    system a killed run then resumes from them; elsewhere they are scored again).
    """
    unknown = [e for e in estimators if e != "robustness" and e not in ESTIMATORS]
    if unknown:
        raise ValueError(f"unknown estimator(s) {unknown}; choose from {sorted(DEFAULT_ESTIMATORS)}")
    bank = ModelBank.open(bank_root)
    names = list(entries) if entries else bank.names()
    if not names:
        raise DatasetError(bank_root, "the bank has no entries")
    if not target.cases:
        raise ValueError(f"{target.name}: no labelled target cases to score on")
    group = group or init_from_env()
    dev = rank_device(device, group)
    autocast = amp_dtype(dev, amp)
    digest = target_digest(target) if cache_dir is not None else None
    robust_kwargs = robustness_settings(target.robustness)  # checked before any model is loaded
    sampled = any(e != "robustness" for e in estimators)
    prepared: dict[str, list[dict]] = {}  # preprocessing key -> the target's cases prepared that way

    def cases_for(entry) -> list[dict]:
        pre = preprocessing_key(entry.preprocessing)
        if pre == "target_plans":
            return target.cases
        if target.prepare is None:
            raise ValueError(f"bank entry {entry.name!r} expects its own preprocessing "
                             f"({entry.preprocessing_kind}); target {target.name} offers only its own")
        if pre not in prepared:
            prepared[pre] = target.prepare(entry.preprocessing, bank.root)
        return prepared[pre]

    keys: dict[str, dict] = {}
    if cache_dir is not None:
        for name in names:
            entry = bank.get(name)
            own = {} if preprocessing_key(entry.preprocessing) == "target_plans" else \
                {"preprocessing": preprocessing_key(entry.preprocessing)}
            keys[name] = _plain_key({"model": name, "sha256": entry.sha256, "arch": entry.arch,
                                     "estimators": list(estimators), "sampling": asdict(sampling or SamplingConfig()),
                                     "seed": seed, "target": digest, **own,
                                     **({"amp": str(autocast)} if autocast else {})})
    cached_rows: dict[str, dict] = {}
    if cache_dir is not None and group.is_main:
        for name in names:
            cached = _read_json(Path(cache_dir) / f"{name}.json")
            if isinstance(cached, dict) and cached.get("for") == keys[name] and isinstance(cached.get("row"), dict):
                logger.info("%s: scored before (%s), not scored again", name, Path(cache_dir) / f"{name}.json")
                cached_rows[name] = _restore_nan(cached["row"], estimators)
    cached_rows = group.broadcast(cached_rows, "agreeing on the rows scored before")

    # this rank's share of the (model, case) pairs; a model belongs to the rank holding its first case
    todo = [n for n in names if n not in cached_rows]
    n_cases = len(target.cases)
    units = [(name, j) for name in todo for j in range(n_cases)]
    shares = [split_range(len(units), Group(r, group.world_size)) for r in range(group.world_size)]
    owner = {name: next(r for r, share in enumerate(shares) if i * n_cases in share) for i, name in enumerate(todo)}
    mine: dict[str, list[int]] = {}
    for name, j in (units[k] for k in shares[group.rank]):
        mine.setdefault(name, []).append(j)

    def save(name: str, row: dict) -> None:
        if cache_dir is not None:
            write_json(Path(cache_dir) / f"{name}.json", {"for": keys[name], "row": row})

    finished: dict[str, dict] = {}
    partial: dict[str, dict] = {}  # split models: this rank's cases' features, forward seconds, robustness
    bar = tqdm(list(mine.items()), desc="scoring bank models", disable=not progress or not group.is_main)
    for name, indices in bar:
        entry = bank.get(name)
        roi = target.roi or entry.patch_size
        cases = cases_for(entry)
        net = build_network(entry.arch, entry.in_channels, entry.out_channels, roi, **entry.arch_kwargs)
        net.load_state_dict(bank.load_state_dict(name))
        net.to(dev).eval()
        layout = entry_layout(entry, net)
        head_free = [e for e in estimators if e in SOURCE_HEAD_ESTIMATORS]
        if head_free and not layout.decoder_stages:
            raise ValueError(f"bank entry {name!r} ({entry.arch}) has no segmentation head: {head_free} cannot score "
                             "it (an encoder checkpoint); leave them out")
        t0 = time.perf_counter()
        feats = sample_dataset(net, layout.feature_stages(), cases, roi, sampling, progress=False,
                               with_source_probs=bool(layout.decoder_stages), indices=indices, amp_dtype=autocast) \
            if sampled else [None] * len(indices)  # robustness alone reads no voxel features
        t_forward = time.perf_counter() - t0
        robustness = None
        if "robustness" in estimators and owner[name] == group.rank:
            t1 = time.perf_counter()
            images = target.robustness_images if target.robustness_images is not None \
                else robustness_windows(cases, roi)
            try:
                value = module_robustness(net, layout.penultimate_encoder, images, target.normalize, seed=seed,
                                          mode=target.robustness_mode, batch_size=target.robustness_batch,
                                          **robust_kwargs)
                error = None
            except ValueError as e:  # e.g. a single target case: no negative image
                value, error = float("nan"), f"ValueError: {e}"
            robustness = {"score": float(value), "seconds": time.perf_counter() - t1, "error": error}
        del net
        if len(indices) == n_cases:
            finished[name] = _row(name, entry, feats, t_forward, robustness, estimators)
            save(name, finished[name])
        else:
            partial[name] = {"features": dict(zip(indices, feats)), "seconds_forward": t_forward,
                             "robustness": robustness}

    if group.distributed:  # split models: every rank sends its cases' features to the model's owner
        group.barrier("sampling this rank's share of the (model, case) pairs")
        for dst in range(group.world_size):
            parts = group.gather({n: p for n, p in partial.items() if owner[n] == dst}, dst,
                                 f"sending the features of models split between ranks to rank {dst}")
            if parts is None:
                continue
            for name in [n for n in todo if owner[n] == dst and n not in finished]:
                pieces = [p[name] for p in parts if name in p]
                features = {j: f for piece in pieces for j, f in piece["features"].items()}
                if sorted(features) != list(range(n_cases)):
                    raise DistributedError(f"torchrun rank {group.rank}: model {name!r} has features of "
                                           f"{len(features)} of {n_cases} cases after the exchange")
                robustness = next((piece["robustness"] for piece in pieces if piece["robustness"] is not None), None)
                finished[name] = _row(name, bank.get(name), [features[j] for j in range(n_cases)],
                                      sum(piece["seconds_forward"] for piece in pieces), robustness, estimators)
                save(name, finished[name])
        for part in group.all_gather(finished, "gathering every rank's rows"):
            finished.update(part)
    return [cached_rows[n] if n in cached_rows else finished[n] for n in names]


def write_scores(rows: list[dict], out_dir, meta: dict | None = None) -> tuple[Path, Path]:
    """``scores.csv`` (one row per model; NaN written empty) and ``scores.json`` (rows + ``meta``),
    each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [k for k in rows[0] if k != "errors"] if rows else ["model"]
    with atomic_path(out / "scores.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})

    payload = {"meta": meta or {}, "higher_is_better": True, "rows": rows}
    write_json(out / "scores.json", payload, default=str)
    return out / "scores.csv", out / "scores.json"


# --- resumable scoring into a folder ---------------------------------------------------------

#: Per-model rows of a scoring in progress (:func:`score_target`'s ``cache_dir``) and the state
#: marker of a scored folder: ``{"for": key, "done": false}`` while scoring, ``done: true`` last.
ROWS_DIR = "scores.partial"
STATE_FILE = "scores.state.json"


def scoring_key(bank_root, entries: Sequence[str] | None, estimators: Sequence[str],
                sampling: SamplingConfig | None, seed: int, target: dict) -> dict:
    """What a folder of scores is for: every scored entry's sha256, the estimators, the sampling,
    the seed and ``target`` (a description of the target data and its preprocessing)."""
    bank = ModelBank.open(bank_root)
    names = list(entries) if entries else bank.names()
    return _plain_key({"entries": {n: bank.get(n).sha256 for n in names}, "estimators": list(estimators),
                       "sampling": asdict(sampling or SamplingConfig()), "seed": seed, "target": target})


def finished_scores(out_dir, key: dict) -> list[dict] | None:
    """The rows of ``out_dir/scores.json`` when its state marker says it was finished for ``key``
    (undefined scores back as NaN); ``None`` otherwise."""
    out = Path(out_dir)
    state = _read_json(out / STATE_FILE)
    if not (isinstance(state, dict) and state.get("done") and state.get("for") == _plain_key(key)):
        return None
    payload = _read_json(out / "scores.json")
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        return None
    return [_restore_nan(r, key["estimators"]) for r in payload["rows"]]


def clear_scores(out_dir) -> None:
    """Remove the scores, the state marker and the per-model rows of ``out_dir`` (nothing else)."""
    out = Path(out_dir)
    for name in ("scores.csv", "scores.json", STATE_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / ROWS_DIR, ignore_errors=True)


def score_into(out_dir, bank_root, make_target: Callable[[], ScoringTarget], target_key: dict,
               estimators: Sequence[str] = DEFAULT_ESTIMATORS, sampling: SamplingConfig | None = None,
               entries: Sequence[str] | None = None, device: str | None = None, progress: bool = True,
               seed: int = 0, meta: dict | None = None, overwrite: bool = False,
               amp: bool = True, robustness: dict | None = None) -> tuple[list[dict], bool]:
    """Score a bank into ``out_dir`` (``scores.csv`` / ``scores.json``), resumably; returns
    ``(rows, already_done)``.

    * finished before for the same :func:`scoring_key` (``target_key`` describes the target):
      the rows are read back, nothing is scored (``already_done``);
    * interrupted (state marker ``done: false`` for the same key): the models scored before are
      read from ``scores.partial/`` (:func:`score_target`'s cache), the others scored;
    * ``out_dir`` holds scores of other settings, or scores without a state marker: refused
      (:class:`FileExistsError`, one line) unless ``overwrite``, which replaces them.

    ``make_target`` builds the :class:`ScoringTarget` only when something is scored. The state
    marker is written last, after both score files. ``robustness``: the robustness settings
    (:attr:`ScoringTarget.robustness`), given here because they belong to the key (settings other
    than :data:`DEFAULT_ROBUSTNESS` are recorded, as ``amp`` is only when active, so keys of the
    default settings are unchanged); they replace the built target's own, which must be unset or
    the same (``ValueError`` otherwise: its settings would be missing from the key).

    Under ``torchrun`` every rank calls it alike: rank 0 alone reads and writes ``out_dir``'s
    scores and marker and tells the others what it decided; the scoring is split across the ranks
    (:func:`score_target`); every rank returns rank 0's rows. A rank that dies stops the run with
    the marker still ``done: false``: no score file is written as if complete.
    """
    out = Path(out_dir)
    group = init_from_env()
    key = scoring_key(bank_root, entries, estimators, sampling, seed, target_key)
    autocast = amp_dtype(resolve_device(device), amp)
    if autocast:  # scores of reduced-precision forward passes are another setting (CPU keys unchanged)
        key["amp"] = str(autocast)
    robust_record = _robustness_record(robustness)
    if robust_record is not None:  # likewise: the default robustness settings leave the key as it was
        key["robustness"] = robust_record
    decision: tuple = ("score", None)
    if group.is_main:
        try:
            decision = _scoring_decision(out, key, overwrite)
        except FileExistsError as e:
            decision = ("refused", str(e))
    decision = group.broadcast(decision, "agreeing on what to score")
    if decision[0] == "refused":
        raise FileExistsError(decision[1])
    if decision[0] == "done":
        logger.info("%s: scored before with these settings, not scored again", out / "scores.json")
        return decision[1], True
    t0 = time.perf_counter()
    target = make_target()
    if target.robustness is not None and robustness_settings(target.robustness) != robustness_settings(robustness):
        raise ValueError(f"{target.name}: the scoring target has robustness settings of its own; pass them to "
                         "score_into as robustness= (they are part of what the scores are for)")
    target = replace(target, robustness=robustness)
    rows = score_target(bank_root, target, estimators, sampling, entries, device, progress, seed,
                        cache_dir=out / ROWS_DIR, amp=amp, group=group)
    final = None
    if group.is_main:
        write_scores(rows, out, meta)
        write_json(out / STATE_FILE, {"for": key, "done": True, "seconds": time.perf_counter() - t0,
                                      "ranks": group.world_size})
        final = finished_scores(out, key)
    return group.broadcast(final, "sharing the written scores"), False


def _scoring_decision(out: Path, key: dict, overwrite: bool) -> tuple:
    """:func:`score_into`'s look at ``out``: ``("done", rows)``, or ``("score", None)`` after the
    state marker ``done: false`` is written (and scores of other settings cleared with ``overwrite``);
    :class:`FileExistsError` for scores of other settings."""
    rows = finished_scores(out, key)
    if rows is not None:
        return "done", rows
    state = _read_json(out / STATE_FILE)
    ours = isinstance(state, dict) and state.get("for") == key
    if not ours and (state is not None or (out / "scores.json").exists()):
        if not overwrite:
            changed = sorted(k for k in key if not isinstance(state, dict) or (state.get("for") or {}).get(k) != key[k])
            what = f"other settings ({', '.join(changed)})" if isinstance(state, dict) else "unknown settings"
            raise FileExistsError(f"{out / 'scores.json'}: exists, scored with {what}; choose another output folder "
                                  "or pass overwrite (medxfer rank --overwrite)")
        clear_scores(out)
    write_json(out / STATE_FILE, {"for": key, "done": False})
    return "score", None


def _files_digest(paths: Sequence) -> str:
    """sha256 of file names and sizes (cheap: no volume decoded); a changed case list or a
    rewritten file of another size changes it."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(f"{p.name}:{p.stat().st_size if p.exists() else -1};".encode())
    return h.hexdigest()


def task_key(data_root, plans: dict, max_cases: int | None = None, split_ids: Sequence[str] | None = None) -> dict:
    """The ``target_key`` of an MSD / nnU-Net target for :func:`score_into`: the task's name,
    ``dataset.json`` and case files (:func:`_files_digest`), the plans and the case selection."""
    task = load_task(data_root)
    files = [task.root / "dataset.json"]
    for r in task.training:
        files += ([r["image"]] if isinstance(r["image"], str) else list(r["image"])) + [r["label"]]
    return {"task": task.root.name, "files": _files_digest(files), "plans": plans, "max_cases": max_cases,
            "split_ids": None if split_ids is None else list(split_ids)}


def seg2d_key(data_root, image_size, max_cases: int | None = 16) -> dict:
    """The ``target_key`` of a 2D segmentation folder (:func:`seg2d_target`) for :func:`score_into`."""
    records, labels = load_seg2d(data_root)
    files = [p for r in records for p in (r["image"], r["label"])]
    return {"data": Path(data_root).name, "files": _files_digest(files), "labels": {str(k): v for k, v in labels.items()},
            "image_size": image_size, "max_cases": max_cases}


def score_bank_into(out_dir, bank_root, data_root, plans: dict, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
                    sampling: SamplingConfig | None = None, entries: Sequence[str] | None = None,
                    device: str | None = None, max_cases: int | None = None, split_ids: Sequence[str] | None = None,
                    progress: bool = True, seed: int = 0, meta: dict | None = None,
                    overwrite: bool = False, amp: bool = True) -> tuple[list[dict], bool]:
    """:func:`score_bank` into ``out_dir``, resumable (:func:`score_into`); returns ``(rows, already_done)``."""
    def make_target() -> ScoringTarget:
        return task_target(data_root, plans, max_cases, split_ids)

    return score_into(out_dir, bank_root, make_target, task_key(data_root, plans, max_cases, split_ids), estimators,
                      sampling, entries, device, progress, seed, meta, overwrite, amp)
