"""Multi-process runs under `torchrun`: who am I, which prompts are mine, gather to rank 0.

`torchrun --nproc_per_node=N python -m d2sd.bench ...` starts N processes with the environment
variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Each process (rank) decodes its
share of the prompts on its own device (`cuda:LOCAL_RANK`, or the CPU) and rank 0 gathers the
per-prompt results and writes the files.

Conventions:
- Partition: round-robin by index, rank r takes prompts r, r + N, r + 2N, ... (`shard`). It is
  deterministic and balances prompt counts to within one; `merge_shards` puts the gathered
  `(index, item)` pairs back in index order, so rank 0's list equals a 1-process run's.
- The process group is gloo, also on GPUs: only small pickled Python objects cross it (results of a
  finished cell, a status line), never tensors of a decode step, so NCCL would add a second device
  context per rank and nothing else. gloo runs the object collectives on CPU tensors.
- Every rank must call the collectives in the same order (one gather and one broadcast per cell).
  A rank that fails sends its error in the gather instead of raising, so that no rank waits forever;
  rank 0 broadcasts the verdict and every rank raises the same error.
- A single process (no WORLD_SIZE, or 1) needs no process group: the helpers return their input.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from d2sd.errors import D2SDError

__all__ = [
    "World",
    "broadcast_from_main",
    "device_for_rank",
    "gather_to_main",
    "init_process_group",
    "merge_shards",
    "shard",
    "shutdown",
    "world_from_env",
]

T = TypeVar("T")
# a rank waits at a gather while the slowest rank finishes its share of one cell
DEFAULT_TIMEOUT = _dt.timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place: `rank` in [0, size), `local_rank` on its host (picks the GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and prints the tables."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(environ: Mapping[str, str] | None = None) -> World:
    """The World of torchrun's RANK / WORLD_SIZE / LOCAL_RANK (defaults 0 / 1 / RANK).

    Raises D2SDError for values that are not integers or out of range.
    """
    env = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", None)):
        raw = env.get(name, default if default is not None else env.get("RANK", "0"))
        try:
            values[name] = int(raw)
        except ValueError:
            raise D2SDError(f"environment variable {name}={raw!r} is not an integer") from None
    rank, size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise D2SDError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local_rank)


def device_for_rank(requested: str | None, world: World) -> str | None:
    """The device name this rank decodes on.

    One process: `requested` unchanged (None lets the caller pick its default). Several: "cpu"
    stays "cpu"; None or "cuda" become `cuda:LOCAL_RANK` when CUDA exists (else "cpu" for None);
    an explicit "cuda:N" is refused, since every rank would share GPU N.
    """
    if not world.distributed:
        return requested
    if requested == "cpu":
        return "cpu"
    if requested is None and not torch.cuda.is_available():
        return "cpu"
    if requested in (None, "cuda"):
        return f"cuda:{world.local_rank}"
    raise D2SDError(
        f"--device {requested} under torchrun would put every rank on one device: give "
        "--device cuda (rank r uses cuda:LOCAL_RANK) or --device cpu"
    )


def init_process_group(world: World, timeout: _dt.timedelta = DEFAULT_TIMEOUT) -> None:
    """Join torchrun's gloo group (env:// rendezvous); nothing to do for one process."""
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    if not dist.is_available():
        raise D2SDError(
            "torchrun with WORLD_SIZE > 1 needs torch.distributed, absent from this torch"
        )
    dist.init_process_group(backend="gloo", rank=world.rank, world_size=world.size, timeout=timeout)


def shutdown(world: World) -> None:
    """Leave the process group (if this process joined one)."""
    import torch.distributed as dist

    if world.distributed and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(count: int, world: World) -> list[int]:
    """Indices of the `count` items that this rank runs: rank, rank + size, ... (round-robin)."""
    return list(range(world.rank, count, world.size))


def merge_shards(shards: Iterable[Sequence[tuple[int, T]]], count: int | None = None) -> list[T]:
    """Gathered `(index, item)` lists of every rank -> the items in index order.

    Checks that no index repeats and, when `count` is given, that indices are exactly 0..count-1.
    """
    by_index: dict[int, T] = {}
    for part in shards:
        for index, item in part:
            if index in by_index:
                raise ValueError(f"index {index} came from two ranks")
            by_index[index] = item
    order = sorted(by_index)
    if count is not None and order != list(range(count)):
        missing = sorted(set(range(count)) - set(order))
        raise ValueError(f"gathered {len(order)} of {count} items; missing indices {missing[:8]}")
    return [by_index[i] for i in order]


def gather_to_main(obj: Any, world: World) -> list[Any] | None:
    """Every rank's `obj` (picklable), listed by rank on rank 0; None on the other ranks."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (the others' argument is ignored)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
