"""Per-channel latent statistics for the DiT (spec 5.3).

Over a dataset, with the tokenizer in eval mode (no masking, no noise), unflipped official center
crops: accumulate the posterior MOMENTS per channel, mean = E[x], std = sqrt(E[x^2] - E[x]^2), keep
the first C channels (the posterior mean). Officially this runs over the whole training list. Here
it runs over the whole set or over a seeded random sample spread over the classes
(:func:`latent_stats_sample`: every class gets its share, so a sample never sees only the first few
classes of a sorted listing). The pass streams: per-channel fp64 sums and sums of squares (size C)
are the only accumulators; each rank takes every W-th sample and the sums are all-reduced. The
result is stored beside the tokenizer checkpoint as ``<ckpt>.latent_stats.pt`` and installed with
``tokenizer.set_latent_stats``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from rectok_fast.checkpoint import atomic_torch_save, safe_torch_load


def latent_stats_path(checkpoint_path) -> str:
    return os.fspath(checkpoint_path) + ".latent_stats.pt"


@torch.no_grad()
def compute_latent_stats(tokenizer, batches: Iterable, total: int | None = None, progress: bool = True,
                         device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean (C,), std (C,), number of tokens) over ``batches`` of images in [-1, 1] (or (images, label))."""
    from tqdm.auto import tqdm
    was_training = tokenizer.training
    tokenizer.eval()
    device = device or next(tokenizer.parameters()).device
    s1 = s2 = None
    count = 0
    try:
        for batch in tqdm(batches, total=total, disable=not progress, desc="latent stats", unit="batch"):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            moments = tokenizer.encode_moments(images.to(device)).double()
            flat = moments.reshape(-1, moments.shape[-1])
            s1 = flat.sum(0) if s1 is None else s1 + flat.sum(0)
            s2 = (flat * flat).sum(0) if s2 is None else s2 + (flat * flat).sum(0)
            count += flat.shape[0]
    finally:
        tokenizer.train(was_training)
    if count == 0:
        raise ValueError("compute_latent_stats got no batches")
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0)
    c = tokenizer.token_channels
    return mean[:c].float().cpu(), var.sqrt()[:c].float().cpu(), count


def save_latent_stats(path, mean: torch.Tensor, std: torch.Tensor, num_tokens: int = 0) -> None:
    atomic_torch_save({"mean": mean.float().cpu(), "std": std.float().cpu(), "num_tokens": int(num_tokens)}, path)


def load_latent_stats(path) -> tuple[torch.Tensor, torch.Tensor]:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or "mean" not in obj or "std" not in obj:
        raise ValueError(f"{path}: not a latent-stats file (needs 'mean' and 'std')")
    return obj["mean"], obj["std"]


def attach_latent_stats(tokenizer, checkpoint_path) -> None:
    """Install ``<ckpt>.latent_stats.pt`` into the tokenizer (raises if the file is missing)."""
    path = latent_stats_path(checkpoint_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: compute it with rectok_fast.latent_stats.compute_latent_stats")
    mean, std = load_latent_stats(path)
    tokenizer.set_latent_stats(mean, std)


# ------------------------------------------------------------------------------ sampled, sharded
def latent_stats_sample(labels, n: int | None, seed: int = 0) -> np.ndarray:
    """Sorted dataset indices of a seeded random sample of ``n`` images spread over the classes.

    Every class gets ``n // K`` images (K classes; smaller classes give all they have and the rest is
    shared among the others), the remainder goes to randomly chosen classes; within a class the images
    are a random subset. ``n`` is raised to K so every class is covered; ``n=None`` or ``n >= len``
    means the whole set."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    total = labels.size
    if total == 0:
        raise ValueError("latent_stats_sample: no samples")
    if n is None or n >= total:
        return np.arange(total, dtype=np.int64)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x57A7])
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    k = classes.size
    n = max(int(n), k)
    quota = np.zeros(k, dtype=np.int64)
    left, open_ = n, counts > 0
    while left > 0 and open_.any():          # water-filling: equal shares, capped by class size
        share = max(1, left // int(open_.sum()))
        room = counts - quota
        add = np.where(open_, np.minimum(share, room), 0)
        if add.sum() > left:                 # the last units go to randomly chosen classes
            cand = np.flatnonzero(add > 0)
            add = np.zeros_like(add)
            add[rng.choice(cand, size=left, replace=False)] = 1
        quota += add
        left -= int(add.sum())
        open_ = quota < counts
    picked = []
    for c in range(k):
        members = order[starts[c]:starts[c] + counts[c]]
        picked.append(members if quota[c] == counts[c] else rng.choice(members, size=int(quota[c]), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


class MomentSums:
    """fp64 per-channel sums and sums of squares of the first ``channels`` moment channels."""

    def __init__(self, channels: int, device="cpu"):
        self.channels = int(channels)
        self.sums = torch.zeros(3, self.channels, dtype=torch.float64, device=device)   # s1, s2, count

    def add(self, moments: torch.Tensor) -> None:
        flat = moments[..., : self.channels].reshape(-1, self.channels).to(self.sums.device, torch.float64)
        self.sums[0] += flat.sum(0)
        self.sums[1] += flat.square().sum(0)
        self.sums[2] += flat.shape[0]

    def reduce(self, all_reduce=None) -> "MomentSums":
        if all_reduce is None:
            from rectok_fast.training.engine import all_reduce_ as all_reduce
        all_reduce(self.sums)
        return self

    def result(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        count = float(self.sums[2, 0])
        if count == 0:
            raise ValueError("latent statistics over zero tokens")
        mean = self.sums[0] / count
        var = (self.sums[1] / count - mean * mean).clamp_min(0)
        return mean.float().cpu(), var.sqrt().float().cpu(), int(count)


@torch.no_grad()
def latent_stats_online(tokenizer, source, img_size: int, indices=None, rank: int = 0, world: int = 1,
                        batch_size: int = 64, device="cpu", num_workers: int = 2, autocast: bool = False,
                        seed: int = 0, progress: bool = False, all_reduce=None):
    """(mean (C,), std (C,), number of tokens) of ``source`` (or its ``indices``), encoded now: this
    rank encodes every W-th image (unflipped official center crop), then the fp64 sums are reduced."""
    from tqdm.auto import tqdm

    from rectok_fast.data import PlanDataset, collate
    idx = np.arange(len(source), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    mine = idx[rank::world]
    device = torch.device(device)
    acc = MomentSums(tokenizer.token_channels, device)
    was = tokenizer.training
    tokenizer.eval()
    try:
        if mine.size:
            ds = PlanDataset(source, img_size, mine, seed, epoch=0, flip="none")
            dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                             num_workers=num_workers, pin_memory=device.type == "cuda",
                                             prefetch_factor=2 if num_workers > 0 else None)
            for batch in tqdm(dl, disable=not (progress and rank == 0), desc="latent stats", unit="batch"):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    m = tokenizer.encode_moments(batch["images"].to(device, non_blocking=True))
                acc.add(m)
    finally:
        tokenizer.train(was)
    if world > 1 or all_reduce is not None:
        acc.reduce(all_reduce)
    return acc.result()


def latent_stats_from_cache(cache, channels: int, indices=None, rank: int = 0, world: int = 1, all_reduce=None):
    """(mean (C,), std (C,), number of tokens) from a latent cache's unflipped moments, one streaming
    pass over this rank's share, then reduced over ranks."""
    acc = MomentSums(channels)
    for block in cache.unflipped_blocks(indices, rank, world):
        acc.add(block)
    if world > 1 or all_reduce is not None:
        acc.reduce(all_reduce)
    return acc.result()
