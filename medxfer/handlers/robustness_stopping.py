"""Online checkpoint selection: stop pretraining at the first local maximum of robustness.

Thesis (chapter 4, "online method"): during encoder pretraining, the robustness ``rho`` of the
encoder's representation of the *target* images (:func:`medxfer.transferability.robustness.robustness_score`,
eqs. 4.1-4.3) is measured after chosen epochs; pretraining stops at the first local maximum and
the encoder of that epoch is transferred. The randomly initialised encoder (epoch 0) is scored
for the record but never chosen (thesis section 4.2: random encoders often score high); epoch 1
and later can be chosen, so "the first local maximum after epoch 1" reads "counting from epoch 1"
-- the thesis reports that most online runs stop after one epoch, which needs epoch 1 to be
eligible. ``start_epoch=2`` excludes epoch 1 as well.

Because a maximum is only known once the next score is lower, the run stops one scoring round
after the chosen epoch; the handler therefore keeps an in-memory copy of the previous scored
weights and writes the chosen ones to ``output_dir/robust_selected.pt`` (plus
``robustness.json``: every score, the chosen epoch, the epoch stopped at).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from ignite.engine import Engine, Events

from medxfer.atomic import atomic_torch_save
from medxfer.jsonfile import write_json
from medxfer.transferability.robustness import first_local_maximum, module_robustness

__all__ = ["RobustnessEarlyStopping"]

logger = logging.getLogger("medxfer.robustness")


class RobustnessEarlyStopping:
    """Scores robustness during training and terminates at its first local maximum.

    Args:
        network: the module being trained (e.g. encoder + classification head).
        feature_module: dotted name of the submodule whose output is the representation scored
            (the second-to-last encoder level: ``ArchLayout.penultimate_encoder``).
        images: ``(N, C, H, W)`` target images in ``[0, 1]`` (RGB for colour jitter), ``N >= 2``.
        normalize: optional ``(mean, std)`` per channel applied to the jittered views before the
            network (the pretraining normalisation).
        epochs: epochs after which to score (default every epoch); fewer rounds = less overhead.
        start_epoch: first epoch that may be chosen (1: everything but the random init).
        score_initial: also score the weights before training (epoch 0, recorded, never chosen).
        output_dir: where ``robust_selected.pt`` and ``robustness.json`` go (None: memory only).
        stop: terminate the trainer at the maximum (False: only record the curve, offline use).
        score_fn: ``network -> float`` replacing the robustness computation (scripted tests).
        margin, seed, mode, pooled, batch_size, jitter, distance: passed to ``robustness_score``
            (``jitter`` None: the authors' strengths; ``distance`` ``"cosine"`` | ``"l2"`` | ``"inverse_pearson"``).
    """

    def __init__(self, network: torch.nn.Module, feature_module: str, images=None, normalize=None,
                 epochs: Sequence[int] | None = None, start_epoch: int = 1, score_initial: bool = True,
                 output_dir=None, stop: bool = True, score_fn: Callable[[torch.nn.Module], float] | None = None,
                 margin: float = 0.5, seed: int = 0, mode: str = "auto", pooled: bool = True, batch_size: int = 8,
                 jitter=None, distance: str = "cosine"):
        if score_fn is None and images is None:
            raise ValueError("RobustnessEarlyStopping needs target images (or a score_fn)")
        self.network, self.feature_module = network, feature_module
        self.images = None if images is None else torch.as_tensor(images, dtype=torch.float32)
        if self.images is not None and (self.images.ndim != 4 or self.images.shape[0] < 2):
            raise ValueError(f"images must be (N >= 2, C, H, W), got {tuple(self.images.shape)}")
        self.normalize = normalize
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.start_epoch, self.score_initial, self.stop = int(start_epoch), score_initial, stop
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.score_fn = score_fn
        self.kwargs = dict(margin=margin, seed=seed, mode=mode, pooled=pooled, batch_size=batch_size, jitter=jitter,
                           distance=distance)
        self.scores: list[float] = []
        self.scored_epochs: list[int] = []
        self.selected_epoch: int | None = None
        self.stopped_at: int | None = None
        self.selected_state: dict | None = None
        self._previous_state: dict | None = None

    def attach(self, engine: Engine) -> None:
        if self.score_initial:
            engine.add_event_handler(Events.STARTED, self._score_initial)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write)

    # -- scoring -------------------------------------------------------------------------------
    def score(self) -> float:
        """Robustness of the current weights (network in eval mode for the measurement)."""
        if self.score_fn is not None:
            return float(self.score_fn(self.network))
        return module_robustness(self.network, self.feature_module, self.images, self.normalize, **self.kwargs)

    def _record(self, epoch: int) -> None:
        value = self.score()
        self.scores.append(value)
        self.scored_epochs.append(epoch)
        logger.info("robustness after epoch %d: %.4f", epoch, value)
        if self.selected_epoch is None:
            chosen = first_local_maximum(self.scores, self.scored_epochs, self.start_epoch)
            if chosen is not None:  # the previous round was the maximum
                self.selected_epoch, self.stopped_at = chosen, epoch
                self.selected_state = self._previous_state
        self._previous_state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def _score_initial(self, engine: Engine) -> None:
        if engine.state.epoch == 0 and not self.scores:
            self._record(0)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if self.epochs is not None and epoch not in self.epochs:
            return
        self._record(epoch)
        if self.stop and self.selected_epoch is not None and self.stopped_at == epoch:
            # ignite still fires COMPLETED after terminate(): _write saves the selection there, once
            logger.info("robustness: first local maximum at epoch %d, stopping after epoch %d",
                        self.selected_epoch, epoch)
            engine.terminate()

    # -- output --------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"epochs": self.scored_epochs, "robustness": self.scores, "selected_epoch": self.selected_epoch,
                "stopped_at_epoch": self.stopped_at if self.stop else None, "start_epoch": self.start_epoch,
                "feature_module": self.feature_module,
                "settings": {k: (vars(v) if k == "jitter" and v is not None and not isinstance(v, (str, dict)) else v)
                             for k, v in self.kwargs.items()}}

    def _write(self, engine: Engine | None = None) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.output_dir / "robustness.json", self.summary())
        if self.selected_state is not None:
            atomic_torch_save(self.selected_state, self.output_dir / "robust_selected.pt")
