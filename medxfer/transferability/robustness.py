"""Robustness of a pretrained encoder's target representation (thesis chapter 4, eqs. 4.1-4.3;
SPEC section 5), and the online rule that stops pretraining at its first local maximum.

For each target image ``q_i`` (``i = 1..N``) three jittered views are drawn: the anchor
``q~_i`` and the positive ``k+_i`` (two views of ``q_i``), and a view of a *different* image
``q_j``, ``j = neg[i] != i``, as the negative ``k-_i``. With ``f^`` the features of an encoder level
(the second-to-last in the thesis), pooled over space (mean) or not (flattened over channels and
spatial positions):

    ``h_i = max(0, d(f^(q~_i), f^(k+_i)) - d(f^(q~_i), f^(k-_i)) + eps)``,  ``eps = 0.5``  (eq. 4.1)
    ``rho = 1 - (1/N) sum_i h_i``                                                  (eq. 4.2)

Distances ``d`` (``distance=``; thesis section 4.2 and Tables 4.2-4.4, written after the authors'
``src/robustness/distance.py``):

- ``"cosine"`` (the thesis' choice, eq. 4.3): ``d(q, k) = 1 - <q, k> / (|q| |k|)``;
- ``"l2"``: the mean squared difference ``mean_f (q_f - k_f)^2`` (what the authors' code computes
  for the "L2" rows; not bounded, so ``rho`` is not either);
- ``"inverse_pearson"``: ``1 - r(q, k)``, ``r`` Pearson's correlation of the two feature rows.

Higher = more robust = (offline) the checkpoint to transfer. With the cosine distance ``rho`` lies
in ``[-1 - eps, 1]``; features that ignore the image entirely give ``h_i = eps``, i.e. ``rho = 1 - eps``.

Pooling (``pooled=``): the thesis scores unpooled features when the whole segmentation network is
fine-tuned and pooled ones when only the decoder is trained (section 4.2); :func:`robustness_options`
picks that from the downstream transfer mode when ``pooled`` is not given. Distances are computed
batch by batch, so unpooled features of many images never sit in memory together.

Jitter (:class:`~medxfer.transforms.jitter.JitterConfig`; the transforms live in
:mod:`medxfer.transforms.jitter`):

- ``"color"`` (RGB 2D images in ``[0, 1]``): brightness, contrast, saturation and hue jitter
  in a random order, each clamped to ``[0, 1]`` like torchvision. The default strengths are the
  authors' (:data:`THESIS_JITTER`: brightness 0.1, contrast 0.05, saturation 0.1, hue 0.05, their
  ``torchvision.transforms.ColorJitter`` in ``src/robustness/eval.py``); ``"strong"``
  (:data:`STRONG_JITTER`, 0.4 / 0.4 / 0.4 / 0.1, medxfer's default before) stays available.
  MONAI has no colour (hue / saturation) transforms, so this part is written by hand
  (:func:`~medxfer.transforms.jitter.color_jitter`).
- ``"intensity"`` (grey / multi-channel scans, 2D or 3D): multiplicative scale
  ``v (1 + s)`` (MONAI ``ScaleIntensity(factor=s)``), shift by a multiple of the image's standard
  deviation ``v + t std(v)`` (MONAI ``StdShiftIntensity``, scale-free for HU and z-scored data),
  and gamma on the min-max range (MONAI ``AdjustContrast``)
  (:func:`~medxfer.transforms.jitter.intensity_jitter`); the thesis has no 3D case, these
  strengths are medxfer's.

All randomness (the negative assignment and every view's jitter parameters) comes from one
``torch.Generator`` seeded with ``seed``, drawn up front, so a score does not depend on
``batch_size``. ``neg`` is a random single-cycle derangement (a random permutation ``p`` and
``neg[p[k]] = p[(k + 1) mod N]``), so no image is its own negative for any ``N >= 2``, odd or even;
with ``N = 1`` there is no other image and a ``ValueError`` is raised.

Deviations from the authors' code, kept on purpose: their negative of image ``i`` is the
*positive view* of another image (a fixed reversal-and-shift of the batch), ours an independent
third view of a random other image (so anchor, positive and negative are three independent draws);
their ``ColorJitter`` draws one set of factors per batch of images, ours one per view (a score
that does not depend on how the images are batched).
"""

from __future__ import annotations

import warnings
from dataclasses import fields, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from medxfer.transforms.jitter import JitterConfig, color_jitter, intensity_jitter

__all__ = [
    "cyclic_derangement",
    "triplet_views",
    "THESIS_JITTER",
    "STRONG_JITTER",
    "JITTER_PRESETS",
    "DISTANCES",
    "jitter_config",
    "robustness_options",
    "cosine_distance",
    "l2_distance",
    "inverse_pearson_distance",
    "robustness_from_features",
    "robustness_score",
    "hooked_output",
    "module_robustness",
    "first_local_maximum",
    "should_stop",
]

FeatureFn = Callable[[torch.Tensor], torch.Tensor]

#: The authors' colour jitter (``ColorJitter(brightness=0.1, contrast=0.05, hue=0.05, saturation=0.1)``
#: in ``src/robustness/eval.py``); the intensity strengths (3D) are :class:`JitterConfig`'s defaults.
THESIS_JITTER = JitterConfig(brightness=0.1, contrast=0.05, saturation=0.1, hue=0.05)
#: medxfer's colour jitter before issue 17 (4-8x the authors'), kept as the ``"strong"`` preset.
STRONG_JITTER = JitterConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
JITTER_PRESETS = {"thesis": THESIS_JITTER, "strong": STRONG_JITTER}


def jitter_config(spec=None) -> JitterConfig:
    """A :class:`JitterConfig` from ``None`` (:data:`THESIS_JITTER`), a preset name (``"thesis"``,
    ``"strong"``), a mapping of strengths (the others from :data:`THESIS_JITTER`, e.g. a bundle's
    ``{brightness: 0.1, contrast: 0.05, saturation: 0.1, hue: 0.05}``) or a ``JitterConfig``."""
    if spec is None:
        return THESIS_JITTER
    if isinstance(spec, JitterConfig):
        return spec
    if isinstance(spec, str):
        if spec not in JITTER_PRESETS:
            raise ValueError(f"jitter preset must be one of {sorted(JITTER_PRESETS)}, got {spec!r}")
        return JITTER_PRESETS[spec]
    if isinstance(spec, Mapping):
        known = {f.name for f in fields(JitterConfig)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"jitter: unknown strength(s) {unknown}; choose from {sorted(known)}")
        values = {k: (tuple(float(x) for x in v) if k == "gamma_range" else float(v)) for k, v in spec.items()}
        return replace(THESIS_JITTER, **values)
    raise ValueError(f"jitter must be a preset name, a mapping of strengths or a JitterConfig, got {type(spec).__name__}")


# ----------------------------------------------------------------------------------------------
# Views

def _as_batch(images) -> torch.Tensor:
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(im) for im in images])
    images = torch.as_tensor(images)
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be (N, C, H, W) or (N, C, H, W, D), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        images = images.float()
    return images


def _resolve_mode(mode: str, images: torch.Tensor) -> str:
    if mode == "auto":
        return "color" if images.shape[1] == 3 and images.ndim == 4 else "intensity"
    if mode not in ("color", "intensity"):
        raise ValueError(f"mode must be 'auto', 'color' or 'intensity', got {mode!r}")
    if mode == "color" and images.shape[1] != 3:
        raise ValueError(f"mode 'color' needs 3 channels, got {images.shape[1]}")
    return mode


def cyclic_derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n,)`` int64 ``neg`` with ``neg[i] != i`` for all ``i``: a random permutation ``p`` and
    ``neg[p[k]] = p[(k + 1) mod n]`` (one ``n``-cycle). Needs ``n >= 2``."""
    if n < 2:
        raise ValueError(f"robustness needs at least 2 images (the negative of an image is a view of a "
                         f"different image), got {n}")
    p = torch.randperm(n, generator=generator)
    neg = torch.empty(n, dtype=torch.int64)
    neg[p] = torch.roll(p, -1)
    return neg


class _Plan:
    """Negative assignment and the jitter parameters of the 3 views of every image, drawn up front."""

    def __init__(self, n: int, mode: str, jitter: JitterConfig, generator: torch.Generator):
        self.mode = mode
        self.neg = cyclic_derangement(n, generator)
        u = torch.rand((n, 3, 4), generator=generator, dtype=torch.float64)   # view 0/1/2 = anchor/pos/neg
        if mode == "color":
            def factor(x, w):
                return max(0.0, 1.0 - w) + x * ((1.0 + w) - max(0.0, 1.0 - w))
            self.params = [[dict(brightness=factor(u[i, v, 0].item(), jitter.brightness),
                                 contrast=factor(u[i, v, 1].item(), jitter.contrast),
                                 saturation=factor(u[i, v, 2].item(), jitter.saturation),
                                 hue=(2.0 * u[i, v, 3].item() - 1.0) * jitter.hue)
                            for v in range(3)] for i in range(n)]
            orders = torch.argsort(torch.rand((n, 3, 4), generator=generator), dim=-1)
            for i in range(n):
                for v in range(3):
                    self.params[i][v]["order"] = tuple(orders[i, v].tolist())
        else:
            lo, hi = jitter.gamma_range
            self.params = [[dict(scale=(2.0 * u[i, v, 0].item() - 1.0) * jitter.scale,
                                 shift=(2.0 * u[i, v, 1].item() - 1.0) * jitter.shift,
                                 gamma=lo + u[i, v, 2].item() * (hi - lo))
                            for v in range(3)] for i in range(n)]

    def view(self, img: torch.Tensor, i: int, v: int) -> torch.Tensor:
        fn = color_jitter if self.mode == "color" else intensity_jitter
        return fn(img, **self.params[i][v])

    def triplets(self, images: torch.Tensor, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        anchor = torch.stack([self.view(images[i], i, 0) for i in idx])
        positive = torch.stack([self.view(images[i], i, 1) for i in idx])
        negative = torch.stack([self.view(images[int(self.neg[i])], int(self.neg[i]), 2) for i in idx])
        return anchor, positive, negative


def triplet_views(images, seed: int = 0, mode: str = "auto",
                  jitter=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The jittered views :func:`robustness_score` uses (same ``seed``, ``mode``, ``jitter``).

    Args:
        images: ``(N, C, H, W[, D])`` target images (or a sequence of ``(C, H, W[, D])``), ``N >= 2``.
        seed: seed of the ``torch.Generator`` that draws the negatives and the jitter.
        mode: ``"auto"`` (``"color"`` for 3-channel 2D images, else ``"intensity"``), ``"color"``
            or ``"intensity"``.
        jitter: jitter strengths, a :func:`jitter_config` spec (default :data:`THESIS_JITTER`).

    Returns:
        ``anchor, positive, negative`` ``(N, C, H, W[, D])`` each and ``neg`` ``(N,)``:
        ``negative[i]`` is a view of ``images[neg[i]]``, ``neg[i] != i``.
    """
    images = _as_batch(images)
    plan = _Plan(images.shape[0], _resolve_mode(mode, images), jitter_config(jitter),
                 torch.Generator().manual_seed(int(seed)))
    return (*plan.triplets(images, range(images.shape[0])), plan.neg.clone())


# ----------------------------------------------------------------------------------------------
# Score

def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``d(a, b) = 1 - <a, b> / (|a| |b|)`` (eq. 4.3) of ``(N, F)`` -> ``(N,)``; a zero
    row has cosine 0 (norms clamped at 1e-8), i.e. distance 1."""
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8)


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise mean squared difference ``mean_f (a_f - b_f)^2`` of ``(N, F)`` -> ``(N,)`` (the
    "L2" distance of the thesis' Tables 4.2-4.4 as the authors' code computes it)."""
    return ((a - b) ** 2).mean(dim=1)


def inverse_pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``1 - r(a, b)`` of ``(N, F)`` -> ``(N,)``, ``r`` Pearson's correlation of the two
    rows (the "PCC" rows of Tables 4.2-4.4). A constant row has ``r = 0`` (its deviations' norm is
    clamped at 1e-8), i.e. distance 1, as a zero row has for the cosine."""
    return cosine_distance(a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True))


#: ``distance=`` name -> row-wise distance of ``(N, F)`` feature rows.
DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosine": cosine_distance, "l2": l2_distance, "inverse_pearson": inverse_pearson_distance}


def _distance_fn(distance: str):
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {distance!r}")
    return DISTANCES[distance]


def robustness_options(jitter=None, pooled: bool | None = None, distance: str = "cosine", margin: float = 0.5,
                       transfer_mode: str | None = None) -> dict:
    """Checked keyword arguments of :func:`robustness_score` from a bundle's ``robustness`` settings.

    Args:
        jitter: see :func:`jitter_config` (``None``: the authors' strengths).
        pooled: ``None``: as the thesis does for the downstream ``transfer_mode`` -- pooled for
            ``decoder_only`` (frozen encoder), unpooled otherwise (the whole network fine-tuned).
        distance: ``"cosine"`` | ``"l2"`` | ``"inverse_pearson"``.
        margin: ``eps`` of eq. 4.1 (>= 0).
        transfer_mode: the downstream training's transfer mode (only read when ``pooled`` is None).

    Returns:
        ``{"jitter": JitterConfig, "pooled": bool, "distance": str, "margin": float}``.
    """
    _distance_fn(distance)
    if float(margin) < 0:
        raise ValueError(f"robustness margin must be >= 0, got {margin}")
    if pooled is None:
        pooled = transfer_mode == "decoder_only"
    return {"jitter": jitter_config(jitter), "pooled": bool(pooled), "distance": str(distance), "margin": float(margin)}


def _flatten(features: torch.Tensor, pooled: bool) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim < 2:
        raise ValueError(f"feature_fn must return (B, F, ...) features, got shape {tuple(features.shape)}")
    if pooled and features.ndim > 2:
        features = features.mean(dim=tuple(range(2, features.ndim)))
    return features.reshape(features.shape[0], -1).double()


def robustness_from_features(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                             margin: float = 0.5, distance: str = "cosine") -> float:
    """Eq. 4.2 on ``(N, F)`` feature rows: ``1 - mean_i max(0, d(a_i, p_i) - d(a_i, n_i) + margin)``."""
    d = _distance_fn(distance)
    return _from_distances(d(anchor, positive), d(anchor, negative), margin)


def _from_distances(positive: torch.Tensor, negative: torch.Tensor, margin: float) -> float:
    hinge = torch.clamp(positive - negative + margin, min=0.0)
    return float(1.0 - hinge.mean())


def robustness_score(images, feature_fn: FeatureFn, pooled: bool = True, margin: float = 0.5, seed: int = 0,
                     mode: str = "auto", jitter=None, batch_size: int = 8, distance: str = "cosine") -> float:
    """Robustness ``rho`` (eq. 4.2) of an encoder's representation of the target images.

    Args:
        images: ``(N, C, H, W[, D])`` target images (or a sequence of ``(C, H, W[, D])``), ``N >= 2``
            (``ValueError`` otherwise). RGB images in ``[0, 1]`` for ``"color"`` mode.
        feature_fn: maps a batch ``(B, C, H, W[, D])`` to features ``(B, F, h, w[, d])`` (or
            ``(B, F)``), e.g. the second-to-last encoder level (see :func:`hooked_output`). Called
            under ``torch.no_grad()`` on batches of ``3 * batch_size`` views (anchors, positives,
            negatives), so it must not depend on the batch composition: put networks in
            ``eval()`` mode (a warning is given for an ``nn.Module`` in training mode).
        pooled: ``True``: mean over space -> ``(B, F)``; ``False``: flattened ``(B, F h w [d])``
            (every spatial position of every channel is one coordinate of the feature row).
        margin: ``eps`` of eq. 4.1 (thesis: 0.5).
        seed, mode: as :func:`triplet_views` (the views are exactly those).
        jitter: :func:`jitter_config` spec (``None``: the authors' strengths, :data:`THESIS_JITTER`).
        batch_size: images per ``feature_fn`` call group; does not change the score.
        distance: ``"cosine"`` (eq. 4.3), ``"l2"`` or ``"inverse_pearson"`` (:data:`DISTANCES`).

    Returns:
        ``rho``; in ``[-1 - margin, 1]`` for the cosine and inverse-Pearson distances; higher = more robust.
    """
    images = _as_batch(images)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(feature_fn, torch.nn.Module) and feature_fn.training:
        warnings.warn("feature_fn is an nn.Module in training mode; call .eval() for a batch-independent score")
    d = _distance_fn(distance)
    n = images.shape[0]
    plan = _Plan(n, _resolve_mode(mode, images), jitter_config(jitter), torch.Generator().manual_seed(int(seed)))
    positive, negative = [], []   # per-image distances only: unpooled features are never all kept
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            views = plan.triplets(images, idx)
            a, p, q = _flatten(feature_fn(torch.cat(views)), pooled).split(len(idx))
            positive.append(d(a, p).cpu())
            negative.append(d(a, q).cpu())
    return _from_distances(torch.cat(positive), torch.cat(negative), margin)


def hooked_output(model: torch.nn.Module, module: str | torch.nn.Module, index: int | None = None) -> FeatureFn:
    """A ``feature_fn`` returning the output of one submodule of ``model`` (a forward hook).

    Args:
        model: the network; the whole forward pass is run (use a feature-returning encoder
            directly when the network has one, e.g. ``lambda x: net.encoder(x)[-2]``).
        module: the submodule or its dotted name (``model.get_submodule``), e.g. the
            second-to-last encoder level.
        index: for a submodule returning a list / tuple, the element to take.

    Warns when called while ``model`` is in training mode (batch-norm / dropout).
    """
    target = model.get_submodule(module) if isinstance(module, str) else module

    def fn(x: torch.Tensor) -> torch.Tensor:
        if model.training:
            warnings.warn("hooked_output: model is in training mode; call .eval() for a batch-independent score")
        captured = []
        handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            model(x)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the hooked module was not called during the forward pass")
        out = captured[-1]
        return out[index] if index is not None else out

    return fn


def module_robustness(network: torch.nn.Module, module: str, images, normalize=None, **kwargs) -> float:
    """:func:`robustness_score` of the output of ``network``'s submodule ``module`` (dotted name).

    The network is put in ``eval()`` mode for the measurement and its previous mode restored; the
    views go to the network's device; ``normalize`` = ``(mean, std)`` per channel is applied to the
    jittered views before the network (jitter works on ``[0, 1]`` images, the network expects its
    training normalisation). ``kwargs`` go to :func:`robustness_score` (``seed``, ``mode``, ...).
    Offline scoring of bank checkpoints and the online stopping rule both use this, so their scores
    of the same weights are the same numbers.
    """
    images = _as_batch(images)
    device = next((p.device for p in network.parameters()), torch.device("cpu"))
    hooked = hooked_output(network, module)
    shift = scale = None
    if normalize is not None:
        shift, scale = (torch.as_tensor(v, dtype=torch.float32).view(1, -1, *[1] * (images.ndim - 2))
                        for v in normalize)

    def features(x: torch.Tensor) -> torch.Tensor:
        if shift is not None:
            x = (x - shift) / scale
        return hooked(x.to(device))

    was_training = network.training
    network.eval()
    try:
        return robustness_score(images, features, **kwargs)
    finally:
        network.train(was_training)


# ----------------------------------------------------------------------------------------------
# Online stopping

def first_local_maximum(scores: Sequence[float], epochs: Sequence[int] | None = None,
                        start_epoch: int = 1) -> int | None:
    """The first local maximum of a robustness curve, ignoring checkpoints before ``start_epoch``.

    Definition: the candidates are the checkpoints with ``epochs[k] >= start_epoch`` (default 1:
    the randomly initialised encoder, epoch 0, is disregarded, as in thesis section 4.2 — random
    encoders often score high). The first candidate ``k`` whose score is strictly above that of
    the next checkpoint, ``scores[k] > scores[k + 1]``, is the maximum: the earlier candidates rose
    (or stayed level) up to it, and the first candidate has no left neighbour to beat. Plateaus
    (equal scores) continue. Because the next checkpoint's score is needed, the maximum is known
    one checkpoint late (see :func:`should_stop`). A maximum at the last checkpoint is not found.

    Args:
        scores: robustness per checkpoint, in training order.
        epochs: epoch of each checkpoint (default ``0, 1, 2, ...``: ``scores[0]`` = random init).
        start_epoch: first epoch that may be chosen (``2`` also ignores epoch 1).

    Returns:
        The epoch of the first local maximum, or ``None`` (none yet: e.g. a rising curve).
    """
    scores = np.asarray(scores, dtype=np.float64)
    epochs = np.arange(len(scores)) if epochs is None else np.asarray(epochs)
    if scores.ndim != 1 or epochs.shape != scores.shape:
        raise ValueError(f"scores and epochs must be 1-D of equal length, got {scores.shape} and {epochs.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if len(epochs) > 1 and np.any(np.diff(epochs) <= 0):
        raise ValueError("epochs must be strictly increasing")
    for k in range(len(scores) - 1):
        if epochs[k] >= start_epoch and scores[k] > scores[k + 1]:
            return int(epochs[k])
    return None


def should_stop(history: Sequence[float], epochs: Sequence[int] | None = None, start_epoch: int = 1) -> bool:
    """Online rule: after scoring each new checkpoint, stop pretraining iff the scores so far
    contain a first local maximum (:func:`first_local_maximum`); keep the checkpoint at that
    epoch. Once True it stays True as more scores arrive. E.g. ``[0.1, 0.3, 0.5, 0.4]`` (epochs
    0-3) stops at epoch 3 and keeps epoch 2."""
    return first_local_maximum(history, epochs, start_epoch) is not None
