"""The order of an epoch and its sharding over ranks.

One permutation per epoch from ``seed + epoch``; the global batch ``k`` of an epoch is the slice
``[k*B*W, (k+1)*B*W)`` and rank ``r`` takes every W-th element of it starting at ``r`` (the
DistributedSampler interleave), so every rank takes the same number of steps with the same shapes.
The tail is dropped (``drop_last``, official) or padded by wrapping around. Sharding uses the GLOBAL
rank. Resuming inside an epoch skips the consumed batches by index arithmetic.
"""
from __future__ import annotations

import math

import torch

from rectok_fast.data.sources import DataError


def epoch_plan(n: int, world: int, batch: int, seed: int, epoch: int, shuffle: bool = True,
               drop_last: bool = True) -> torch.Tensor:
    """Indices (steps, world, batch), int64, of one epoch. Rank r's k-th batch is plan[k, r]."""
    if n <= 0:
        raise DataError("the dataset is empty")
    g = world * batch
    if shuffle:
        gen = torch.Generator().manual_seed(int(seed) + int(epoch))
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    if drop_last:
        steps = n // g
        if steps == 0:
            raise DataError(f"the dataset has {n} samples, fewer than one global batch "
                            f"({world} ranks x {batch}); lower --batch_size or pass --no_drop_last")
        order = order[: steps * g]
    else:
        steps = math.ceil(n / g)
        pad = steps * g - n
        if pad:
            order = torch.cat([order, order.repeat(math.ceil(pad / n))[:pad]])
    # interleave like DistributedSampler: rank r takes positions r, r+W, ... of each global batch
    return order.view(steps, batch, world).transpose(1, 2).contiguous()


def rank_plan(n: int, world: int, batch: int, seed: int, epoch: int, rank: int, shuffle: bool = True,
              drop_last: bool = True, start_step: int = 0) -> torch.Tensor:
    """(steps_left, batch) indices of one rank from ``start_step`` on."""
    return epoch_plan(n, world, batch, seed, epoch, shuffle, drop_last)[start_step:, rank].contiguous()


def steps_per_epoch(n: int, world: int, batch: int, drop_last: bool = True) -> int:
    g = world * batch
    return n // g if drop_last else math.ceil(n / g)
