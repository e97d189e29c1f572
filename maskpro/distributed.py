"""Data parallelism over ``torch.distributed`` (launched by ``torchrun``), kept to what MaskPro needs.

The learner is forward-only and its randomness is keyed by (seed, step), so every rank draws the same masks
without talking to the others; a step only has to agree on one number, the minibatch loss. This module
gives the process-group facts (rank, world, device), the scalar all-reduce, the row split of the learning
data, and the calibration split of the one-shot methods. Without ``torchrun`` (``WORLD_SIZE`` unset or 1)
everything here is a no-op and the single-process code paths run unchanged.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import MaskproError


@dataclass(frozen=True)
class Group:
    """This process's place in the job: a single process is rank 0 of a world of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value in (None, "") else int(value)
    except ValueError:
        raise MaskproError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def init_from_env(device: str | None = None, timeout_s: float = 1800.0) -> Group:
    """Join the ``torchrun`` job described by the environment, or describe a single process.

    ``device`` is ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). CUDA ranks use NCCL on
    ``cuda:LOCAL_RANK``; CPU ranks use gloo. Calling it twice returns the group already joined.
    """
    world, local = _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise MaskproError("a CUDA device was asked, but torch sees no CUDA GPU; use --device cpu")
    if world <= 1:
        dev = torch.device(device) if device not in (None, "cuda") else torch.device("cuda" if cuda else "cpu")
        return Group(device=dev)
    if cuda:
        if local >= torch.cuda.device_count():
            raise MaskproError(f"LOCAL_RANK {local} has no GPU (torch sees {torch.cuda.device_count()}); "
                               "start at most one process per GPU (torchrun --nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kw = {"device_id": dev} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return Group(dist.get_rank(), dist.get_world_size(), local, dev)


def current() -> Group:
    """The group this process already joined (a single process when ``torch.distributed`` is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Group()
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dev)


def is_main() -> bool:
    """True on rank 0 and in a single process: the one that writes files and prints progress."""
    return current().is_main


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it (a no-op in a single process)."""
    if current().distributed:
        dist.all_reduce(tensor.view(-1) if tensor.dim() == 0 else tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks, in place: a SUM all-reduce then a division (gloo has no AVG)."""
    world = current().world_size
    if world > 1:
        all_sum_(tensor).div_(world)
    return tensor


def agree(value: int) -> bool:
    """True when every rank passed the same integer (always in a single process); a collective call."""
    group = current()
    if not group.distributed:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == value == -int(t[1])


def local_batch(global_batch: int, world: int) -> int:
    """Rows each of ``world`` processes runs per step, or a one-line error when the batch does not split evenly."""
    if global_batch % world:
        raise MaskproError(f"--batch-size {global_batch} does not split over {world} processes; use a multiple of "
                           f"{world}")
    return global_batch // world


def shard_rows(rows: torch.Tensor, global_batch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of every global minibatch, in order.

    Global minibatch b is rows ``[b*G, (b+1)*G)`` of the single-process data; rank r gets its slice
    ``[b*G + r*G/W, b*G + (r+1)*G/W)``, so local minibatch b on every rank together is exactly global
    minibatch b. Rows past the last whole minibatch are dropped, as the single-process learner never uses them.
    """
    per = local_batch(global_batch, world)
    if not 0 <= rank < world:
        raise MaskproError(f"rank {rank} is outside a world of {world}")
    n = rows.shape[0] // global_batch
    return rows[:n * global_batch].reshape(n, world, per, *rows.shape[1:])[:, rank].reshape(n * per,
                                                                                           *rows.shape[1:])


def calibration_share(calib: torch.Tensor, batch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's calibration windows: whole batches of ``batch`` rows, dealt out in contiguous blocks.

    Splitting at batch boundaries makes each rank's per-batch statistics bit-identical to the
    single-process ones, so the summed Hessians differ from one process only in the order of the sum.
    """
    n_batches = -(-calib.shape[0] // batch)
    if n_batches < world:
        raise MaskproError(f"{calib.shape[0]} calibration windows in batches of {batch} do not give each of "
                           f"{world} processes a batch; pass more --calib-samples or run fewer processes")
    starts = torch.tensor_split(torch.arange(n_batches), world)[rank]
    return calib[int(starts[0]) * batch:min(calib.shape[0], (int(starts[-1]) + 1) * batch)]


def shutdown() -> None:
    """Leave the process group (after a final barrier, so no rank tears down while another still talks)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
