"""Stop training at the first non-finite loss, naming the batch that produced it.

A NaN voxel, a diverging learning rate or a broken label make the loss NaN / inf; every later step
then writes NaN into the weights, and a run that ends normally saves a model whose tensors are all
NaN, with exit 0. :class:`StopOnNonFiniteLoss` raises :class:`NonFiniteLossError` at the end of the
first iteration whose loss is not finite (and, with ``network``, at the end of an epoch whose
weights are not finite, before the epoch's checkpoint, validation and model-bank writers run when
it is attached first). The one-line message names the batch's case ids / files, the epoch and the
iteration.

Not ignite's ``TerminateOnNan``: it calls ``engine.terminate()``, so the run *completes* — the
final checkpoint (``model_final.pt``, MONAI ``CheckpointSaver(save_final=True)`` at ``COMPLETED``)
is written from the NaN weights and the process exits 0, the fault this handler exists to prevent.
An exception instead reaches the caller (non-zero exit), and
:class:`medxfer.handlers.ResumableCheckpointSaver` does not save on it. With AMP a forward overflow
to inf also stops the run: the loss itself is computed in float32 by MONAI's losses, so an inf loss
means the activations overflowed, not a gradient scale being tuned (those are handled by the scaler).
"""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events

__all__ = ["NonFiniteLossError", "StopOnNonFiniteLoss", "batch_cases"]

#: Keys of a batch dict that hold case ids (MONAI records carry ``"id"``).
ID_KEYS = ("id", "case_id", "name")


class NonFiniteLossError(ValueError, ArithmeticError):
    """The training loss (or the weights) became NaN / inf; the message names the batch, epoch and
    iteration. A ValueError, so in-process bundle runs surface it as the cause (one line)."""


def _as_list(value) -> list:
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _as_list(item)]
    return [value]


def batch_cases(batch, image_key: str = "image") -> list[str]:
    """Case ids of a collated batch (its ``id`` key) or else the image files (MetaTensor
    ``meta["filename_or_obj"]``), in order, without repeats (``num_samples`` crops of one case)."""
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    names: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        found = []
        for key in ID_KEYS:
            if key in item:
                found = _as_list(item[key])
                break
        if not found:
            meta = getattr(item.get(image_key), "meta", None) or item.get(f"{image_key}_meta_dict") or {}
            found = _as_list(meta.get("filename_or_obj", []))
        names += [str(n) for n in found]
    return list(dict.fromkeys(names))


def _files(batch, image_key: str) -> list[str]:
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    files: list[str] = []
    for item in items:
        meta = getattr(item.get(image_key), "meta", None) if isinstance(item, dict) else None
        files += [str(f) for f in _as_list((meta or {}).get("filename_or_obj", []))]
    return list(dict.fromkeys(files))


class StopOnNonFiniteLoss:
    """Raise :class:`NonFiniteLossError` at the first non-finite training loss.

    Args:
        output_transform: engine output -> loss (default: the ``"loss"`` entry of MONAI's
            ``SupervisedTrainer`` output, a dict or a list of dicts).
        network: also check the weights at every epoch end (one pass over the parameters), before
            the savers and the validation attached after this handler.
        image_key: batch key whose MetaTensor metadata names the files.
    """

    def __init__(self, output_transform=None, network: torch.nn.Module | None = None, image_key: str = "image"):
        self.output_transform = output_transform or self._loss
        self.network = network
        self.image_key = image_key

    @staticmethod
    def _loss(output):
        if isinstance(output, (list, tuple)):
            return [o["loss"] for o in output]
        return output["loss"]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        if self.network is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _where(self, engine: Engine) -> str:
        batch = engine.state.batch
        cases = batch_cases(batch, self.image_key)
        files = [f for f in _files(batch, self.image_key) if f not in cases]
        shown = ", ".join(cases[:8]) + (f", ... ({len(cases)} in all)" if len(cases) > 8 else "")
        file_text = f"; files {', '.join(files[:8])}" if files else ""
        return (f"epoch {engine.state.epoch}, iteration {engine.state.iteration} "
                f"(batch: {shown or 'no case ids'}{file_text})")

    def iteration_completed(self, engine: Engine) -> None:
        values = _as_list(self.output_transform(engine.state.output))
        losses = torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().reshape(-1).cpu() for v in values]
                             ).reshape(-1) if values else torch.zeros(0)
        if bool(torch.isfinite(losses).all()):
            return
        bad = next(float(v) for v in losses if not math.isfinite(float(v)))
        raise NonFiniteLossError(f"training loss is {bad} at {self._where(engine)}: training stopped, no model "
                                 "written; check these cases' intensities and labels (medxfer check-data) or "
                                 "lower the learning rate")

    def epoch_completed(self, engine: Engine) -> None:
        params = [p.detach() for p in self.network.parameters()]
        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        names = [n for n, p in self.network.named_parameters() if not bool(torch.isfinite(p).all())]
        raise NonFiniteLossError(f"{len(names)} weight tensor(s) of the network (e.g. {names[0]}) are NaN / inf at the "
                                 f"end of epoch {engine.state.epoch} (last {self._where(engine)}): training stopped, "
                                 "no model written; lower the learning rate")
