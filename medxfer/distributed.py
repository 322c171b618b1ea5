"""Work split across the processes ``torchrun`` starts: the process group from the environment, each
rank's device, and the exchange of picklable Python objects (rows, sampled features) between ranks.

``torchrun --nproc_per_node N [--nnodes M --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...]`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every process;
:func:`init_from_env` joins the group they describe (``env://``), so every rendezvous torchrun offers
works unchanged. Without those variables (a plain ``python`` / ``medxfer`` run) it returns the group
of one process, and every collective of :class:`Group` is then the identity: callers write one code
path for both.

Choices where torch leaves them open:

* The group always uses **gloo**, also when every rank computes on its own GPU: what travels
  between ranks here are Python objects (score rows, sampled voxel features), which gloo moves over
  TCP on any machine, across nodes too; NCCL would only add a copy to the GPU and back.
* Collectives time out after ``MEDXFER_DIST_TIMEOUT`` seconds (default 1800: a rank may wait that
  long for the slowest one's share of the work). A rank that died makes the others' next
  collective fail at once (gloo's connection to it closes) and torchrun stops the remaining
  processes; either way the caller sees one :class:`DistributedError` line naming the step.
* :meth:`Group.barrier` is gloo's ``monitored_barrier``: on a timeout it names the ranks missing.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from medxfer.device import resolve_device

__all__ = ["DistributedError", "Group", "launched", "env_rank", "init_from_env", "rank_device", "split_range",
           "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed (a rank died, timed out or disagreed); the message is one line."""


def launched() -> bool:
    """True in a process torchrun started with more than one process in all (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def env_rank() -> int:
    """This process's global rank from torchrun's environment (0 outside torchrun); no group needed."""
    return int(os.environ.get("RANK", "0") or 0) if launched() else 0


def _timeout_s() -> float:
    value = os.environ.get("MEDXFER_DIST_TIMEOUT")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"MEDXFER_DIST_TIMEOUT={value!r}: not a number of seconds") from None


@dataclass(frozen=True)
class Group:
    """The processes sharing a job. ``world_size == 1``: a single process, every collective the identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _failed(self, what: str, err: BaseException) -> DistributedError:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        return DistributedError(f"torchrun rank {self.rank} of {self.world_size}: {what} failed ({reason}); another "
                                f"rank stopped or timed out (limit {self.timeout_s:g} s, MEDXFER_DIST_TIMEOUT); "
                                "the run is abandoned, nothing is written as finished")

    def broadcast(self, obj: Any, what: str = "broadcast") -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        try:
            dist.broadcast_object_list(box, src=0)
        except RuntimeError as e:
            raise self._failed(what, e) from e
        return box[0]

    def all_gather(self, obj: Any, what: str = "all_gather") -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:
            raise self._failed(what, e) from e
        return out

    def gather(self, obj: Any, dst: int, what: str = "gather") -> list | None:
        """Every rank's ``obj`` in rank order on rank ``dst`` (``None`` on the others)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        try:
            dist.gather_object(obj, out, dst=dst)
        except RuntimeError as e:
            raise self._failed(what, e) from e
        return out

    def barrier(self, what: str = "barrier", timeout_s: float | None = None) -> None:
        """Wait for every rank (at most ``timeout_s``, default the group's); names the missing ranks."""
        if not self.distributed:
            return
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s or self.timeout_s), wait_all_ranks=True)
        except RuntimeError as e:
            raise self._failed(what, e) from e


def init_from_env() -> Group:
    """The group torchrun's environment describes, joined once per process (gloo, ``env://``;
    destroyed at exit); outside torchrun the single-process group."""
    timeout = _timeout_s()
    if not launched():
        return Group(timeout_s=timeout)
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the "
                               "processes with torchrun (or set the torch.distributed env:// variables)")
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"torchrun rank {os.environ['RANK']}: joining the process group at "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} failed "
                                   f"({' '.join(str(e).split())[:300]})") from e
        atexit.register(_destroy)
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0), timeout)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device, group: Group) -> torch.device:
    """The device this rank computes on: :func:`~medxfer.device.resolve_device` of ``device``, and under
    torchrun a bare ``cuda`` becomes ``cuda:<LOCAL_RANK>`` (one GPU per process on each node; an explicit
    ``cuda:i`` is kept). Also makes it the current CUDA device."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and group.distributed:
        count = torch.cuda.device_count()
        if group.local_rank >= count:
            raise DistributedError(f"torchrun local rank {group.local_rank}: only {count} CUDA device(s) on this "
                                   "node; start at most that many processes per node (--nproc_per_node) or use "
                                   "--device cpu")
        dev = torch.device("cuda", group.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def split_range(n: int, group: Group) -> range:
    """This rank's contiguous share of ``range(n)``: sizes differ by at most one, rank order."""
    return range(group.rank * n // group.world_size, (group.rank + 1) * n // group.world_size)
