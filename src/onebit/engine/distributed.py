"""Multi-process calibration on PyTorch's own runtime (``torchrun``): gloo on CPU, NCCL on GPU.

Each rank takes every world-th calibration sample; partial Hessians (Σxxᵀ and N) are summed with an
all-reduce, so every rank solves with the same H; the linears of a layer are split over the ranks and
each result is broadcast from the rank that solved it. Rank 0 alone writes files and shows progress.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env(device: str) -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity in one process)."""
    if rank_world()[1] > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any, src: int) -> Any:
    """``obj`` from rank ``src`` on every rank (tensors inside come back on the CPU)."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()
