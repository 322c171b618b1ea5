"""Resume training from the newest epoch checkpoint, with the results of an uninterrupted run.

MONAI's ``CheckpointLoader`` restores network, optimizer, scheduler and trainer state (epoch and
iteration) from a fixed path, and keeps the trainer's configured ``max_epochs`` when it is not
smaller than the checkpoint's epoch (it raises otherwise). It cannot, by itself, make a resumed run
equal an uninterrupted one:

- **the newest checkpoint**: a killed run must pick up the newest ``*epoch=N.pt`` and a first run
  has none; :class:`ResumeFromLatest` finds it.
- **a longer run** (``max_epochs`` 2 -> 4 on a finished run): the restored ``PolynomialLR`` keeps
  ``total_iters`` = the *old* ``max_epochs`` and the optimizer the last lr, 0.0, so the new epochs
  change nothing. The schedule is set to the configured total again and the lr recomputed in
  closed form, ``lr = base_lr * (1 - epoch / total) ** power`` (PolynomialLR's chainable steps
  then continue it exactly), stated in one INFO line.
- **the best metric**: a fresh validation ``CheckpointSaver`` has an empty key-metric list, so the
  first validation after a resume is always "new best" and may replace ``model.pt`` with a worse
  model. :class:`BestMetricState` stores the saver's key-metric list (what MONAI's
  ``key_metric_save_state`` stores, restored with MONAI's ``CheckpointSaver.load_state_dict``) and
  the evaluator's ``best_metric`` / ``best_metric_epoch`` in the *epoch* checkpoint, the snapshot
  the resume starts from. (Not in ``model.pt`` with ``key_metric_save_state: true``: ``model.pt``
  stays a plain state dict, the format evaluate, inference, export, the bank and TATL read.)
- **random streams**: batch order, crops and flips come from torch's, numpy's and Python's global
  generators and from the ``R`` state of every MONAI ``Randomizable`` transform of the training
  dataset; :class:`RandomStates` saves and restores them (as tensors and lists, so the checkpoint
  loads with ``weights_only=True``). A run killed after epoch *k* and resumed then ends with the
  same weights as an uninterrupted run (tested on CPU with ``num_workers`` 0; DataLoader workers
  are seeded from torch's generator, but persistent workers keep streams a resume does not see).

:class:`ResumableCheckpointSaver` writes these checkpoints atomically
(:class:`medxfer.handlers.checkpoints.AtomicCheckpointSaver`): a kill or a full disk during a save
leaves the previous checkpoint, never a truncated one.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import Checkpoint
from monai.transforms import Randomizable, Transform

from medxfer.handlers.checkpoints import AtomicCheckpointSaver
from medxfer.handlers.finite_loss import NonFiniteLossError
from medxfer.transfer.weights import CheckpointError

__all__ = ["ResumeFromLatest", "ResumableCheckpointSaver", "RandomStates", "BestMetricState", "latest_checkpoint",
           "randomizable_transforms"]

logger = logging.getLogger("medxfer.resume")

_EPOCH = re.compile(r"epoch=(\d+)\.pt$")

#: load_dict entries a checkpoint of an older medxfer may lack (resumed without them, with a warning)
OPTIONAL_STATES = ("random", "best_metric")


def epoch_checkpoints(ckpt_dir) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``*epoch=N.pt`` file in ``ckpt_dir``, oldest first."""
    found = []
    for path in Path(ckpt_dir).glob("*epoch=*.pt"):
        m = _EPOCH.search(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir) -> Path | None:
    """The ``*epoch=N.pt`` file with the largest ``N`` in ``ckpt_dir`` (``None`` if there is none)."""
    found = epoch_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


# --- random states ---------------------------------------------------------------------------

def randomizable_transforms(root) -> list[Randomizable]:
    """Every MONAI ``Randomizable`` reachable from ``root`` (a transform, a list of them, a dataset
    with ``.transform``, a ``ConcatDataset`` / ``Subset``), in a fixed order, the way MONAI's
    ``set_rnd`` walks them: into ``Compose`` lists and into the attributes of transforms (a
    dictionary transform holds its array transform, e.g. ``RandCropByPosNegLabeld.cropper``, with
    its own ``R``). Cached data of a dataset is not walked."""
    found: list[Randomizable] = []
    seen: set[int] = set()

    def visit(obj, depth: int = 0) -> None:
        if depth > 32 or id(obj) in seen:
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)
        elif isinstance(obj, (Transform, Randomizable)):
            seen.add(id(obj))
            if isinstance(obj, Randomizable):
                found.append(obj)
            for key, value in vars(obj).items():
                if not key.startswith("__"):
                    visit(value, depth + 1)
        elif isinstance(obj, torch.utils.data.Dataset):
            seen.add(id(obj))
            for key in ("transform", "datasets", "dataset"):
                if hasattr(obj, key):
                    visit(getattr(obj, key), depth + 1)

    visit(root)
    return found


def _numpy_state(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_tuple(state: dict) -> tuple:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return state["name"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"])


class RandomStates:
    """``state_dict`` / ``load_state_dict`` of every random generator a training epoch draws from:
    torch (CPU and CUDA), numpy's and Python's global generators, and the ``R`` of each
    ``Randomizable`` transform of ``dataset`` (:func:`randomizable_transforms`).

    Stored as tensors, lists and numbers so that the checkpoint loads with ``weights_only=True``.
    The transforms are matched by position and class name; a changed transform chain is restored
    without them (WARNING): the run continues, but no longer equals an uninterrupted one.
    """

    def __init__(self, dataset=None):
        self.dataset = dataset

    def _transforms(self) -> list[Randomizable]:
        unique, ids = [], set()
        for t in randomizable_transforms(self.dataset) if self.dataset is not None else []:
            if id(t.R) not in ids:  # a RandomState shared by several transforms is stored once
                ids.add(id(t.R))
                unique.append(t)
        return unique

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        transforms = self._transforms()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return {"torch": torch.get_rng_state(), "cuda": list(cuda), "numpy": _numpy_state(np.random.get_state()),
                "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                           "gauss_next": gauss},
                "transform_names": [type(t).__name__ for t in transforms],
                "transforms": [_numpy_state(t.R.get_state()) for t in transforms]}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"].cpu())
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
        transforms = self._transforms()
        names = [type(t).__name__ for t in transforms]
        if names != list(state.get("transform_names", [])):
            logger.warning("random transforms differ from the checkpoint's (%s vs %s): their random states are not "
                           "restored, the resumed run will not equal an uninterrupted one", names,
                           state.get("transform_names"))
            return
        for t, saved in zip(transforms, state["transforms"]):
            t.R.set_state(_numpy_tuple(saved))


# --- best metric -----------------------------------------------------------------------------

class BestMetricState:
    """The best-metric state of a validation: the evaluator's ``best_metric`` / ``best_metric_epoch``
    and the key-metric list of its ``CheckpointSaver`` (the file that holds the best model), for
    the epoch checkpoint. After a resume a validation worse than the best so far does not replace
    ``model.pt``.

    Args:
        evaluator: the validation engine (MONAI ``SupervisedEvaluator``).
        saver: its ``CheckpointSaver`` with ``save_key_metric`` (``None``: the evaluator state only).
    """

    def __init__(self, evaluator: Engine, saver=None):
        self.evaluator = evaluator
        self.saver = saver

    def state_dict(self) -> dict:
        state = {"best_metric": float(self.evaluator.state.best_metric),
                 "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}
        key_checkpoint = getattr(self.saver, "_key_metric_checkpoint", None)
        if key_checkpoint is not None:  # ignite's Checkpoint.state_dict: [(priority, filename)], as plain values
            state["checkpointer"] = {"_saved": [[float(p), str(f)] for p, f in key_checkpoint.state_dict()["_saved"]]}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        if self.saver is not None and "checkpointer" in state:
            self.saver.load_state_dict({"_saved": [(float(p), str(f)) for p, f in state["checkpointer"]["_saved"]]})


# --- resume ----------------------------------------------------------------------------------

def _schedule_total(scheduler) -> tuple[str, int] | None:
    """``(attribute, value)`` of a scheduler's length in steps, if it has one."""
    for attr in ("total_iters", "T_max", "total_steps"):
        if isinstance(getattr(scheduler, attr, None), int):
            return attr, getattr(scheduler, attr)
    return None


class ResumeFromLatest:
    """At ``Events.STARTED``, load the newest epoch checkpoint in ``ckpt_dir`` into ``load_dict``.

    Args:
        ckpt_dir: folder the training :class:`ResumableCheckpointSaver` writes to.
        load_dict: ``{"network": net, "optimizer": opt, "lr_scheduler": sched, "best_metric":
            BestMetricState(...)}``, the same dict the saver was given; the trainer itself
            (``"trainer"``) and the random states of its dataset (``"random"``) are added at attach.
        map_location: device for the loaded tensors (a GPU checkpoint resumes on CPU and back).
        enabled: ``False`` ignores existing checkpoints (a fresh run in the same folder).

    Raises (one line, naming the file): :class:`~medxfer.transfer.weights.CheckpointError` for an
    unreadable checkpoint or one lacking a required state; ``ValueError`` when the checkpoint's
    epoch is beyond ``max_epochs``.
    """

    def __init__(self, ckpt_dir, load_dict: dict, map_location=None, enabled: bool = True):
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = load_dict
        self.map_location = map_location
        self.enabled = enabled
        self.resumed_from: Path | None = None
        self.logger = logger

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault("trainer", engine)
        loader = getattr(engine, "data_loader", None)
        if loader is not None:
            self.load_dict.setdefault("random", RandomStates(loader.dataset))
        engine.add_event_handler(Events.STARTED, self)

    def _read(self) -> tuple[Path, dict] | None:
        """The newest readable epoch checkpoint (an unreadable newer one — written by a version
        without atomic saves — is skipped with a warning)."""
        found = epoch_checkpoints(self.ckpt_dir)
        first_error = None
        for _, path in reversed(found):
            try:
                return path, torch.load(path, map_location=self.map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one, report the newest
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                error = CheckpointError(path, f"not a readable checkpoint to resume from ({reason}); delete it "
                                              "to resume from an earlier one, or set resume false")
                first_error = first_error or error
                self.logger.warning("%s", error)
        if first_error is not None:
            raise first_error
        return None

    def __call__(self, engine: Engine) -> None:
        found = self._read() if self.enabled else None
        if found is None:
            return
        path, checkpoint = found
        trainer_state = checkpoint.get("trainer", {})
        if not {"iteration", "epoch_length"} <= set(trainer_state):
            raise CheckpointError(path, "no trainer state (iteration, epoch_length): not a resumable epoch checkpoint")
        saved_epoch = int(trainer_state["iteration"]) // max(1, int(trainer_state["epoch_length"]))
        max_epochs = engine.state.max_epochs
        if max_epochs is not None and saved_epoch > max_epochs:
            raise ValueError(f"{path}: the run is at epoch {saved_epoch}, beyond max_epochs {max_epochs}; pass "
                             f"max_epochs >= {saved_epoch}, or another output_dir / resume false for a new run")
        missing = [k for k in self.load_dict if k not in checkpoint]
        required = [k for k in missing if k not in OPTIONAL_STATES]
        if required:
            raise CheckpointError(path, f"lacks {required} (written by another configuration); "
                                        "choose another output_dir or set resume false")
        if missing:
            self.logger.warning("%s: has no %s state (written by an older version): resumed without it, the run "
                                "will not equal an uninterrupted one", path, " / ".join(missing))
        scheduler = self.load_dict.get("lr_scheduler")
        configured = _schedule_total(scheduler)
        to_load = {k: v for k, v in self.load_dict.items() if k in checkpoint and k != "random"}
        # ignite's loader (what MONAI's CheckpointLoader calls), from the checkpoint read once above
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint, strict=True)
        engine.state.max_epochs = max_epochs  # as CheckpointLoader: the configured length, not the saved one
        if scheduler is not None and configured is not None:
            self._continue_schedule(scheduler, configured, int(trainer_state.get("max_epochs") or saved_epoch),
                                    max_epochs)
        if "random" in self.load_dict and "random" in checkpoint:
            self.load_dict["random"].load_state_dict(checkpoint["random"])  # last: nothing may draw after it
        self.resumed_from = path
        self.logger.info("resumed from %s: epoch %d, iteration %d of max_epochs %d", path, engine.state.epoch,
                         engine.state.iteration, engine.state.max_epochs)

    def _continue_schedule(self, scheduler, configured: tuple[str, int], old_epochs: int, new_epochs) -> None:
        attr, total = configured
        saved_total = getattr(scheduler, attr)
        if saved_total == total:
            return
        if not isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR):
            self.logger.warning("%s restored with %s=%d as saved, not the configured %d: the schedule does not "
                                "follow the new max_epochs", type(scheduler).__name__, attr, saved_total, total)
            return
        scheduler.total_iters = total
        step = min(scheduler.last_epoch, total)
        lrs = [base * (1.0 - step / total) ** scheduler.power for base in scheduler.base_lrs]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)  # what get_last_lr() / LrScheduleHandler report
        verb = "extending" if (new_epochs or total) >= old_epochs else "shortening"
        self.logger.info("%s run from %d to %d epochs: polynomial schedule over %d epochs, lr now %s", verb,
                         old_epochs, new_epochs or total, total, ", ".join(f"{lr:.6g}" for lr in lrs))


class ResumableCheckpointSaver(AtomicCheckpointSaver):
    """The training run's ``CheckpointSaver``: atomic files, plus what :class:`ResumeFromLatest`
    needs in each epoch checkpoint — the trainer itself (``"trainer"``: epoch and iteration) and
    the random states of its dataset (``"random"``), both added at attach.

    ``n_saved`` holds across resumes: epoch checkpoints left by the interrupted run count as saved
    (the one resumed from is removed once a newer one is written).
    """

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        loader = getattr(engine, "data_loader", None)
        if loader is not None:
            self.save_dict.setdefault("random", RandomStates(loader.dataset))
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
        checkpoint = self._interval_checkpoint
        if checkpoint is not None and not checkpoint._saved and self.epoch_level:
            current = engine.state.epoch
            checkpoint._saved = [Checkpoint.Item(n, path.name) for n, path in epoch_checkpoints(self.save_dir)
                                 if n < current]
        super().interval_completed(engine)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """MONAI saves the final checkpoint on any exception; a
        :class:`~medxfer.handlers.finite_loss.NonFiniteLossError` means NaN / inf weights: re-raised,
        nothing saved or deleted, the last good epoch checkpoint stays."""
        if isinstance(e, NonFiniteLossError):
            raise e
        super().exception_raised(engine, e)
