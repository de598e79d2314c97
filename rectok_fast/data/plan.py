"""The order of an epoch and its split into micro batches.

One permutation per epoch from ``seed + epoch`` (the tail dropped, ``drop_last``, official; or padded
by wrapping around). The data position is the count of samples consumed: optimizer step k of an epoch
trains on the slice ``[k*G, (k+1)*G)`` of the permutation (G = global batch = W ranks x B micro batch x
A accumulation steps), cut into M = W*A CONTIGUOUS micro batches of B samples; micro batch ``m`` of the
step is ``[k*G + m*B, k*G + (m+1)*B)``. Rank r at accumulation step a takes ``m = a*W + r``.

Why contiguous and why ``a*W + r``: the content of micro batch m is then a function of (seed, epoch,
step, m) alone, the same for every factorisation of G into W x A, so a run resumed on another number of
processes (the trainer recomputes A to keep G) computes the same micro batches; with the stages' seeding
on (seed, step, m) it draws the same noise too, and only the order of the gradient reduction differs.
(The DistributedSampler interleave, rank r taking positions r, r+W, ... of a global batch, ties a micro
batch's samples to W.) Of the two orders of m, ``a*W + r`` makes one rank's micro batches consecutive
rows of a ``(micro_steps, W, B)`` plan, which does not depend on A: a loader needs only W and, on a
resume, starts at micro step ``step * A``.

Every rank takes the same number of micro steps with the same shapes. Sharding uses the GLOBAL rank.
"""
from __future__ import annotations

import math

import torch

from rectok_fast.data.sources import DataError


def epoch_plan(n: int, world: int, batch: int, seed: int, epoch: int, shuffle: bool = True,
               drop_last: bool = True) -> torch.Tensor:
    """Indices (micro_steps, world, batch), int64, of one epoch. Rank r's j-th micro batch is plan[j, r],
    the slice ``[(j*W + r)*B, (j*W + r + 1)*B)`` of the epoch order."""
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
    # contiguous: row j holds micro batches m = j*W .. j*W + W-1, rank r the r-th (see the module doc)
    return order.view(steps, world, batch).contiguous()


def rank_plan(n: int, world: int, batch: int, seed: int, epoch: int, rank: int, shuffle: bool = True,
              drop_last: bool = True, start_step: int = 0) -> torch.Tensor:
    """(micro_steps_left, batch) indices of one rank from micro step ``start_step`` on."""
    return epoch_plan(n, world, batch, seed, epoch, shuffle, drop_last)[start_step:, rank].contiguous()


def global_micro_index(accum_step: int, rank: int, world: int) -> int:
    """The index m, within its optimizer step, of the micro batch that data-parallel ``rank`` (of
    ``world``) trains at accumulation step ``accum_step``: its samples and its random draws are keyed by
    m, which does not depend on how the global batch is split into ranks x accumulation steps."""
    return int(accum_step) * int(world) + int(rank)


def steps_per_epoch(n: int, world: int, batch: int, drop_last: bool = True) -> int:
    g = world * batch
    return n // g if drop_last else math.ceil(n / g)
