"""The few collective operations evaluation needs; every one is a no-op without a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors, gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (float64 stays float64); returns a CPU tensor."""
    if rank_world()[1] == 1:
        return flat.cpu()
    buf = flat.to(_comm_device()).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


def gather_rows(rows: torch.Tensor, indices: torch.Tensor, total: int) -> torch.Tensor:
    """Rows [n_local, D] with global row indices -> the full [total, D] on every rank, in index order.

    Each row is written by exactly one rank into a zero matrix and the matrices are summed, so the
    result is exact (x + 0 = x) and does not depend on the number of ranks.
    """
    rows = rows.detach().cpu()
    full = torch.zeros(total, rows.shape[1], dtype=rows.dtype)
    full[indices.cpu().long()] = rows
    seen = torch.zeros(total, dtype=torch.float64)
    seen[indices.cpu().long()] = 1.0
    full, seen = all_reduce_sum(full), all_reduce_sum(seen)
    if not torch.all(seen == 1.0):
        raise RuntimeError(f"gather_rows: {(seen != 1).sum().item()} of {total} rows were not written exactly once")
    return full


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's (picklable) object on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]
