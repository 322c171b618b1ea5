"""Score every model of a bank on a target dataset with every estimator, in one pass per model.

For each bank entry (SPEC sections 4-5): build the entry's network with its own channels and
classes, load its weights (sha256-checked, weights only; the whole network, head included, since
LEEP / NCE read the source head), preprocess the target's labelled cases with the *target's* plans
(as fine-tuning would), and sample voxel features once (:mod:`medxfer.transferability.features`);
every estimator then works on those samples:

=================  ==============================================================================
``ccfv``           CC-FV, paper definition (:func:`medxfer.transferability.ccfv.ccfv_score`)
``ccfv_official``  CC-FV as the official code computes it (``variant="official"``)
``logme``          LogME on the last decoder stage (the layer before the final conv), pooled cases
``gbc``            GBC on the same features
``transrate``      TransRate on the same features
``leep``           LEEP from the source head's softmax at the sampled voxels
``nce``            NCE from the source head's argmax at the sampled voxels
``robustness``     robustness (thesis ch. 4) of the second-to-last encoder level, on one window per
                   case (its centre; several windows of a single case) under intensity jitter:
                   3 extra forward passes per window
=================  ==============================================================================

Higher is better for every score. Per entry the seconds spent in the forward passes and in the
estimator math are recorded, so a benchmark can compare them with bare forward passes.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.utils import convert_to_tensor

from medxfer.device import resolve_device
from medxfer.jsonfile import write_json
from medxfer.transferability.features import CaseFeatures, SamplingConfig, pooled, sample_dataset

__all__ = ["ESTIMATORS", "DEFAULT_ESTIMATORS", "run_estimators", "target_cases", "score_bank",
           "write_scores"]

logger = logging.getLogger("medxfer.transferability")


def _ccfv(variant: str) -> Callable:
    def score(cases):
        from medxfer.transferability.ccfv import ccfv_score

        return ccfv_score(cases, variant=variant)["score"]
    return score


def _on_last_stage(name: str) -> Callable:
    def score(cases):
        import importlib

        fn = getattr(importlib.import_module(f"medxfer.transferability.{name}"), name)
        return fn(*pooled(cases, level=-1))
    return score


def _leep(cases):
    from medxfer.transferability.leep import leep_cases

    return leep_cases(cases)


def _nce(cases):
    from medxfer.transferability.nce import nce_cases

    return nce_cases(cases)


#: Estimator name -> function of the sampled cases of one model returning one float.
ESTIMATORS: dict[str, Callable[[Sequence[CaseFeatures]], float]] = {
    "ccfv": _ccfv("paper"), "ccfv_official": _ccfv("official"), "logme": _on_last_stage("logme"),
    "gbc": _on_last_stage("gbc"), "transrate": _on_last_stage("transrate"), "leep": _leep, "nce": _nce,
}
DEFAULT_ESTIMATORS = (*ESTIMATORS, "robustness")


def robustness_windows(cases: Sequence[dict], roi: Sequence[int], max_single: int = 4) -> torch.Tensor:
    """Images for the robustness score, ``(N, C, *roi)``: one window per case around its centre
    (zero-padded when smaller). With a single case, up to ``max_single`` of its non-overlapping
    windows stand for distinct images (a different region is the negative), or, when it holds
    fewer than two windows, its two halves along the longest axis (each padded to the window):
    one labelled case still gets a score."""
    from monai.transforms import ResizeWithPadOrCrop

    from medxfer.transferability.features import window_starts

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


def robustness_of(network: torch.nn.Module, arch: str, windows: torch.Tensor, seed: int = 0) -> float:
    """:func:`medxfer.transferability.robustness.robustness_score` of the network's second-to-last
    encoder level (pooled), on target windows ``(N, C, *roi)`` with intensity jitter."""
    from medxfer.networks.factory import arch_layout
    from medxfer.transferability.robustness import module_robustness

    return module_robustness(network, arch_layout(arch, network).penultimate_encoder, windows, pooled=True, seed=seed,
                             mode="intensity", batch_size=2)


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


def target_cases(data_root, plans: dict, max_cases: int | None = None, split_ids: Sequence[str] | None = None) -> list[dict]:
    """Preprocessed labelled target cases (the target's plans, eval chain: RAS, spacing, crop,
    normalisation), as ``{"id", "image": (C, ...), "label": (1, ...)}``; ``split_ids`` restricts
    them (e.g. the fine-tuning fold's training cases), ``max_cases`` keeps the first ones."""
    from medxfer.data.msd import load_task
    from medxfer.transforms.msd import msd_transforms

    records = load_task(data_root).training
    if split_ids is not None:
        wanted = set(split_ids)
        records = [r for r in records if r["id"] in wanted]
    if max_cases:
        records = records[:max_cases]
    chain = msd_transforms(plans, mode="eval")
    out = []
    for r in records:
        item = chain(r)
        out.append({"id": r["id"], "image": convert_to_tensor(item["image"], track_meta=False),
                    "label": item["label"]})
    return out


def score_bank(bank_root, data_root, plans: dict, estimators: Sequence[str] = DEFAULT_ESTIMATORS,
               sampling: SamplingConfig | None = None, entries: Sequence[str] | None = None, device: str | None = None,
               max_cases: int | None = None, split_ids: Sequence[str] | None = None, progress: bool = True,
               seed: int = 0) -> list[dict]:
    """Scores of every bank entry (or ``entries``) on the target; one row per entry.

    Rows: ``{"model", "arch", "source", "epoch", <estimator>: score, ..., "errors": {...},
    "seconds_forward", "seconds_estimators", "seconds_<estimator>"}``.
    """
    from tqdm.auto import tqdm

    from medxfer.networks.factory import arch_layout, build_network
    from medxfer.transfer.bank import ModelBank

    bank = ModelBank.open(bank_root)
    names = list(entries) if entries else bank.names()
    dev = resolve_device(device)
    cases = target_cases(data_root, plans, max_cases=max_cases, split_ids=split_ids)
    if not cases:
        raise ValueError(f"{data_root}: no labelled target cases to score on")
    rows = []
    for name in tqdm(names, desc="scoring bank models", disable=not progress):
        entry = bank.get(name)
        net = build_network(entry.arch, entry.in_channels, entry.out_channels, entry.patch_size, **entry.arch_kwargs)
        net.load_state_dict(bank.load_state_dict(name))
        net.to(dev).eval()
        stages = arch_layout(entry.arch, net).decoder_stages
        t0 = time.perf_counter()
        feats = sample_dataset(net, stages, cases, entry.patch_size, sampling, progress=False)
        t_forward = time.perf_counter() - t0
        results = run_estimators(feats, estimators)
        if "robustness" in estimators:
            t1 = time.perf_counter()
            try:
                value, error = robustness_of(net, entry.arch, robustness_windows(cases, entry.patch_size), seed=seed), None
            except ValueError as e:  # e.g. a single target case: no negative image
                value, error = float("nan"), f"ValueError: {e}"
            results["robustness"] = {"score": value, "seconds": time.perf_counter() - t1, "error": error}
            results = {k: results[k] for k in estimators}
        row = {"model": name, "arch": entry.arch, "source": "+".join(entry.source) or "scratch", "epoch": entry.epoch}
        row.update({k: v["score"] for k, v in results.items()})
        row.update({"seconds_forward": t_forward, "seconds_estimators": sum(v["seconds"] for v in results.values())})
        row.update({f"seconds_{k}": v["seconds"] for k, v in results.items()})
        row["errors"] = {k: v["error"] for k, v in results.items() if v["error"]}
        rows.append(row)
        del net
    return rows


def write_scores(rows: list[dict], out_dir, meta: dict | None = None) -> tuple[Path, Path]:
    """``scores.csv`` (one row per model; NaN written empty) and ``scores.json`` (rows + ``meta``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = [k for k in rows[0] if k != "errors"] if rows else ["model"]
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})

    payload = {"meta": meta or {}, "higher_is_better": True, "rows": rows}
    write_json(out / "scores.json", payload, default=str)
    return out / "scores.csv", out / "scores.json"
