"""Seconds per training step and the fraction of it spent waiting for data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ignite.engine import Engine, Events

from medxfer.jsonfile import write_json

__all__ = ["StepTimer"]


class StepTimer:
    """Times every iteration of an engine: data wait (``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``)
    and the whole step (``GET_BATCH_STARTED`` -> ``ITERATION_COMPLETED``), in seconds.

    Args:
        output_file: where to write the JSON summary at ``COMPLETED`` (``None``: keep in memory).
        skip_first: iterations left out of the summary (warm-up: first allocation, data workers starting).
    """

    def __init__(self, output_file=None, skip_first: int = 1):
        self.output_file = Path(output_file) if output_file else None
        self.skip_first = skip_first
        self.data_s: list[float] = []
        self.step_s: list[float] = []
        self._t0 = self._t1 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self._batch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _batch_started(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _batch_completed(self, engine: Engine) -> None:
        self._t1 = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        now = time.perf_counter()
        self.data_s.append(self._t1 - self._t0)
        self.step_s.append(now - self._t0)

    def summary(self) -> dict:
        """``{"iterations", "seconds_per_iteration", "data_seconds_per_iteration", "data_wait_fraction"}``."""
        data, step = self.data_s[self.skip_first:], self.step_s[self.skip_first:]
        if not step:
            data, step = self.data_s, self.step_s
        total = sum(step)
        return {"iterations": len(step), "seconds_per_iteration": total / len(step) if step else float("nan"),
                "data_seconds_per_iteration": sum(data) / len(step) if step else float("nan"),
                "data_wait_fraction": sum(data) / total if total > 0 else float("nan")}

    def _completed(self, engine: Engine) -> None:
        summary = self.summary()
        logging.getLogger("medxfer.timing").info("step timing: %s", summary)
        if self.output_file is not None:
            write_json(self.output_file, summary)
