"""Validation-metric history of a training run, as JSON (what early stopping saw)."""

from __future__ import annotations

from pathlib import Path

from ignite.engine import Engine, Events

from medxfer.jsonfile import write_json

__all__ = ["MetricHistory"]


class MetricHistory:
    """Appends the evaluator's metrics after every validation round and rewrites ``output_file``.

    Attach to the evaluator. The file holds ``{"history": [{"epoch": trainer epoch, metric: value,
    ...}], "best": {...}, "epochs_run": n}``; ``best`` is the round with the lowest (``mode="min"``)
    or highest (``"max"``) ``metric``. MONAI's ``MetricsSaver`` keeps the last round only.

    Args:
        output_file: JSON path (written atomically enough: small, rewritten each round).
        metric: the metric that defines ``best`` (e.g. ``"val_loss"``).
        mode: ``"min"`` or ``"max"``.
        trainer: the training engine (its epoch labels the rounds); None: the evaluator's run count.
    """

    def __init__(self, output_file, metric: str, mode: str = "min", trainer: Engine | None = None):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.output_file = Path(output_file)
        self.metric, self.mode, self.trainer = metric, mode, trainer
        self.history: list[dict] = []

    def set_trainer(self, trainer: Engine) -> None:
        self.trainer = trainer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = self.trainer.state.epoch if self.trainer is not None else len(self.history) + 1
        self.history.append({"epoch": epoch, **{k: v for k, v in engine.state.metrics.items()
                                               if isinstance(v, (int, float))}})
        scored = [h for h in self.history if self.metric in h]
        best = None
        if scored:
            pick = min if self.mode == "min" else max
            best = pick(scored, key=lambda h: h[self.metric])
        write_json(self.output_file, {"metric": self.metric, "mode": self.mode, "history": self.history,
                                      "best": best, "epochs_run": epoch})
