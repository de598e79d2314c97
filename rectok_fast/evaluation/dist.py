"""Ranks for evaluation: launch detection, batch assignment that does not depend on the rank
count, and gathering rows back into global order.

Work is cut into GLOBAL batches of a fixed size (``--eval_bsz``) and batch ``k`` goes to rank
``k % world``. An image is therefore always processed in the same batch with the same companions,
whatever the number of ranks, so the results do not depend on how the job was launched.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world, device). Under torchrun / deepspeed (WORLD_SIZE > 1) the process group is
    started here: NCCL with one GPU per local rank when CUDA is used, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_name)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device_name} was asked for but no CUDA device is visible")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def global_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of every global batch of ``n`` items."""
    if batch_size < 1:
        raise ValueError(f"the evaluation batch size must be >= 1, got {batch_size}")
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def rank_batches(n: int, batch_size: int, rank: int, world: int) -> list[tuple[int, int]]:
    """The global batches rank ``rank`` of ``world`` processes: batch k -> rank k % world."""
    return global_batches(n, batch_size)[rank::world]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(index: torch.Tensor, rows: dict) -> tuple[torch.Tensor, dict]:
    """All-gather ``rows`` ({name: (n_local, ...) tensor}) and their global ``index`` (n_local,) from
    every rank; return them sorted by index (every rank gets everything)."""
    if not is_distributed():
        order = torch.argsort(index)
        return index[order], {k: v[order] for k, v in rows.items()}
    dev = _comm_device()
    world = dist.get_world_size()
    count = torch.tensor([index.numel()], device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)

    def gather(t: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros((most - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
        local = torch.cat([t.cpu(), pad]).to(dev).contiguous()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local)
        return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])

    all_index = gather(index.long())
    order = torch.argsort(all_index)
    # every rank must issue the collectives in the same order: sort the names
    return all_index[order], {k: gather(rows[k])[order] for k in sorted(rows)}
