"""Voxel features of a pretrained network on a target dataset, the input of every estimator.

SPEC section 5 / CC-FV paper section 2.2: forward hooks on the decoder stages (multi-scale), each
map resized to the window; a sliding window over the case **without assembling the full output**.

How one case is sampled (:func:`sample_case`):

1. **Voxel coordinates are drawn first**, seeded: per class ``c`` present in the label map,
   ``n_c = clip(round(ratio * |c|), min_per_class, max_per_class)`` voxels (never more than
   ``|c|``; background and foreground alike), plus ``variety_samples`` voxels drawn uniformly over
   the whole case (the CC-FV feature-variety sample).
2. The case is tiled by windows of ``roi_size`` without overlap (the last window of an axis is
   shifted inside the volume; a volume smaller than the window is zero-padded as MONAI's
   ``sliding_window_inference`` does). Each drawn voxel belongs to exactly one window. Only
   windows holding drawn voxels are run, ``sw_batch_size`` at a time.
3. For every decoder stage the hook's output (``(B, d_l, *window / 2^k)``) is read at the drawn
   voxels with trilinear ``grid_sample`` — exactly the value ``F.interpolate(map, size=window,
   mode="trilinear")`` has at that voxel, without building the resized map. The network's output
   is read at the same voxels and softmaxed (source-head probabilities for LEEP / NCE).

Memory is therefore O(window) whatever the volume size, and one forward pass per window of each
case feeds every estimator.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CaseFeatures", "SamplingConfig", "draw_voxels", "window_starts", "sample_case", "sample_dataset", "pooled",
           "checked_features"]


@dataclass
class CaseFeatures:
    """Sampled voxels of one target case, seen by one source model.

    Attributes:
        case_id: the case's id.
        levels: per decoder level ``l`` (deepest first), ``(n, d_l)`` float32 features of the
            ``n`` sampled voxels (each decoder map resized to the window before sampling).
        labels: ``(n,)`` int64 target label of each sampled voxel (0 = background).
        variety: ``(n,)`` bool, True for the voxels drawn uniformly over the whole case (the
            feature-variety sample of CC-FV); the others were drawn per class
            (class-proportional counts), for class consistency and the baselines.
        source_probs: ``(n, Z)`` float32 softmax of the source head at the sampled voxels
            (``Z`` = source classes), for LEEP / NCE; ``None`` when not recorded.
        coords: ``(n, S)`` int64 voxel coordinates in the (preprocessed) case.
    """

    case_id: str
    levels: list[np.ndarray]
    labels: np.ndarray
    variety: np.ndarray
    source_probs: np.ndarray | None = None
    coords: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class SamplingConfig:
    """How many voxels :func:`draw_voxels` draws per case.

    Attributes:
        ratio: fraction of each class's voxels drawn (class-proportional counts).
        min_per_class / max_per_class: clip of each class's count (never above the class size).
        variety_samples: voxels drawn uniformly over the whole case (CC-FV feature variety).
        seed: base seed; case ``i`` uses ``seed + i``.
        sw_batch_size: windows per forward pass.
    """

    ratio: float = 0.05
    min_per_class: int = 32
    max_per_class: int = 400
    variety_samples: int = 400
    seed: int = 0
    sw_batch_size: int = 2


def draw_voxels(label: np.ndarray, config: SamplingConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel coordinates to sample in a label map ``(*spatial)``: ``(coords (n, S), variety (n,))``.

    Class-proportional draws without replacement for every class present, then
    ``config.variety_samples`` uniform draws over the whole case (flagged ``variety``).
    """
    rng = np.random.default_rng(seed)
    flat = np.asarray(label).reshape(-1)
    chosen, variety = [], []
    for c in np.unique(flat):
        where = np.flatnonzero(flat == c)
        n = int(np.clip(round(config.ratio * where.size), config.min_per_class, config.max_per_class))
        n = min(n, where.size)
        chosen.append(rng.choice(where, size=n, replace=False))
        variety.append(np.zeros(n, bool))
    n_var = min(int(config.variety_samples), flat.size)
    if n_var:
        chosen.append(rng.choice(flat.size, size=n_var, replace=False))
        variety.append(np.ones(n_var, bool))
    index = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    coords = np.stack(np.unravel_index(index, np.asarray(label).shape), axis=1).astype(np.int64)
    return coords, np.concatenate(variety) if variety else np.zeros(0, bool)


def window_starts(size: int, roi: int) -> list[int]:
    """Starts of non-overlapping windows covering ``[0, size)``; the last one is shifted inside."""
    if size <= roi:
        return [0]
    starts = list(range(0, size - roi + 1, roi))
    if starts[-1] + roi < size:
        starts.append(size - roi)
    return starts


def _assign(coords: np.ndarray, starts: list[list[int]]) -> np.ndarray:
    """Index (into the product of ``starts``) of the window owning each voxel: per axis the
    window with the largest start <= coordinate."""
    per_axis = [np.searchsorted(np.asarray(s), coords[:, d], side="right") - 1 for d, s in enumerate(starts)]
    return np.ravel_multi_index(per_axis, [len(s) for s in starts])


def _read(maps: torch.Tensor, local: torch.Tensor, roi: Sequence[int]) -> torch.Tensor:
    """Values of ``maps (d, *m)`` at window voxels ``local (k, S)`` after trilinear resizing of
    the map to ``roi`` (``align_corners=False``), without building the resized map: ``(k, d)``."""
    spatial = len(roi)
    if list(maps.shape[1:]) == list(roi):
        return maps[(slice(None), *local.T)].T
    # grid_sample wants (x, y[, z]) = (last axis, ..., first axis), normalised for align_corners=False
    grid = torch.stack([(2 * local[:, d].to(maps.dtype) + 1) / roi[d] - 1 for d in reversed(range(spatial))], -1)
    grid = grid.view(1, *([1] * (spatial - 1)), -1, spatial)
    out = F.grid_sample(maps[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(maps.shape[0], -1).T


@torch.no_grad()
def sample_case(network: torch.nn.Module, stages: Sequence[str], image: torch.Tensor, label, roi_size: Sequence[int],
                config: SamplingConfig | None = None, case_id: str = "case", seed: int | None = None,
                with_source_probs: bool = True, amp_dtype: torch.dtype | None = None) -> CaseFeatures:
    """Features of one case at the drawn voxels (module docstring), one forward pass per window.

    Args:
        network: the source model, in eval mode on its device.
        stages: module names whose outputs are the decoder feature maps, deepest first
            (:func:`medxfer.networks.registry.arch_layout` ``.decoder_stages``).
        image: ``(C, *spatial)`` preprocessed case (2D or 3D).
        label: ``(*spatial)`` or ``(1, *spatial)`` target label map in the same grid.
        roi_size: window size (the network's patch).
        amp_dtype: run the forward passes under ``torch.autocast`` in this dtype (``torch.float16`` /
            ``torch.bfloat16``; ``None``: the network's own precision). The maps are read in float32
            and every estimator computes in float64 whatever the forward pass ran in. A batch whose
            logits or maps are not finite under autocast (float16 overflows above 65504) is run
            again in full precision.
    """
    config = config or SamplingConfig()
    image = torch.as_tensor(image)
    label = np.asarray(torch.as_tensor(label).cpu()).reshape(image.shape[1:])
    coords, variety = draw_voxels(label, config, config.seed if seed is None else seed)
    device = next(network.parameters()).device
    spatial = image.shape[1:]
    roi = [int(r) for r in roi_size]
    pad = [max(0, r - s) for r, s in zip(roi, spatial)]
    if any(pad):  # as sliding_window_inference: constant 0 at the end of each short axis
        image = F.pad(image, [p for q in reversed(pad) for p in (0, q)])
        spatial = image.shape[1:]
    starts = [window_starts(s, r) for s, r in zip(spatial, roi)]
    owner = _assign(coords, starts)
    windows = [w for w in np.unique(owner)]
    modules = dict(network.named_modules())
    missing = [s for s in stages if s not in modules]
    if missing:
        raise ValueError(f"decoder stages {missing} are not modules of {type(network).__name__}")
    captured: dict[str, torch.Tensor] = {}
    hooks = [modules[s].register_forward_hook(lambda m, i, o, s=s: captured.__setitem__(s, o)) for s in stages]
    n = coords.shape[0]
    level_out: list[np.ndarray | None] = [None] * len(stages)
    probs_out: np.ndarray | None = None
    all_starts = list(itertools.product(*starts))
    try:
        for b in range(0, len(windows), config.sw_batch_size):
            batch = windows[b:b + config.sw_batch_size]
            crops = [image[(slice(None), *[slice(st, st + r) for st, r in zip(all_starts[w], roi)])] for w in batch]
            inputs = torch.stack(crops).to(device)
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
                logits = network(inputs)
            if amp_dtype is not None and not all(bool(torch.isfinite(t).all()) for t in (logits, *captured.values())):
                logits = network(inputs)  # overflow in reduced precision: this batch in full precision
            for k, w in enumerate(batch):
                rows = np.flatnonzero(owner == w)
                local = torch.as_tensor(coords[rows] - np.asarray(all_starts[w]), device=device)
                for lvl, s in enumerate(stages):
                    vals = _read(captured[s][k].float(), local, roi).cpu().numpy()
                    if level_out[lvl] is None:
                        level_out[lvl] = np.zeros((n, vals.shape[1]), np.float32)
                    level_out[lvl][rows] = vals
                if with_source_probs:
                    p = torch.softmax(logits[k].float(), 0)[(slice(None), *local.T)].T.cpu().numpy()
                    if probs_out is None:
                        probs_out = np.zeros((n, p.shape[1]), np.float32)
                    probs_out[rows] = p
    finally:
        for h in hooks:
            h.remove()
    levels = [lv if lv is not None else np.zeros((0, 0), np.float32) for lv in level_out]
    return CaseFeatures(case_id=case_id, levels=levels, labels=label[tuple(coords.T)].astype(np.int64), variety=variety,
                        source_probs=probs_out, coords=coords,
                        meta={"windows_run": len(windows), "windows_total": len(all_starts), "shape": list(spatial)})


def sample_dataset(network: torch.nn.Module, stages: Sequence[str], cases: Iterable[dict], roi_size: Sequence[int],
                   config: SamplingConfig | None = None, progress: bool = True, desc: str = "sampling features",
                   image_key: str = "image", label_key: str = "label", id_fn: Callable[[dict, int], str] | None = None,
                   with_source_probs: bool = True, indices: Sequence[int] | None = None,
                   amp_dtype: torch.dtype | None = None) -> list[CaseFeatures]:
    """:func:`sample_case` for every preprocessed case dict (``{"image": (C, ...), "label": (1, ...)}``),
    case ``i`` seeded with ``config.seed + i``; shows a progress bar.

    ``indices``: only these cases (positions in ``cases``), each still seeded by its position, so a
    case's samples do not depend on which process samples it or with which others (distributed
    scoring, :func:`medxfer.transferability.score.score_target`). ``amp_dtype``: see :func:`sample_case`."""
    from tqdm.auto import tqdm

    config = config or SamplingConfig()
    cases = cases if isinstance(cases, (list, tuple)) else list(cases)
    out = []
    network.eval()
    for i in tqdm(range(len(cases)) if indices is None else list(indices), desc=desc, disable=not progress, leave=False):
        case = cases[i]
        case_id = id_fn(case, i) if id_fn else str(case.get("id", f"case_{i}"))
        out.append(sample_case(network, stages, case[image_key], case[label_key], roi_size, config, case_id=case_id,
                               seed=config.seed + i, with_source_probs=with_source_probs, amp_dtype=amp_dtype))
    return out


def pooled(cases: list[CaseFeatures], level: int = -1, class_sample: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All cases' voxels of one decoder level as ``(features (N, d), labels (N,))``.

    ``level=-1`` is the last (highest-resolution) decoder stage, the "layer before the final
    convolution" the CC-FV paper feeds to the baselines. ``class_sample=True`` keeps the
    class-proportional sample (not the uniform variety sample).
    """
    feats, labels = [], []
    for case in cases:
        keep = ~case.variety if class_sample else np.ones_like(case.variety)
        feats.append(case.levels[level][keep])
        labels.append(case.labels[keep])
    return np.concatenate(feats), np.concatenate(labels)


def checked_features(features, labels) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, D) float64, labels (N,))`` after the checks every estimator needs: a
    non-empty 2-D matrix, one label per row, finite values (``ValueError`` saying which fails)."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if labels.size != x.shape[0]:
        raise ValueError(f"labels has {labels.size} entries, features have {x.shape[0]} rows")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or inf")
    return x, labels
