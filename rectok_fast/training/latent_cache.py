"""Latent cache for the DiT stage: posterior moments of every training image for BOTH flips, computed
once with the (frozen, eval) tokenizer, stored in per-rank shards; training then samples the posterior
from the cached moments each step (``tokenizer.latents_from_moments``), exactly as the online path
does from freshly encoded moments. The cache freezes the augmentation to the official one (ADM
center crop + horizontal flip), which is all the official pipeline has.

Layout::

    DIR/shard_00000.pt   {'indices': (n,), 'labels': (n,), 'moments': (n, 2, N, 2C)}  [:, 0] unflipped, [:, 1] flipped
    DIR/meta.json        {'num_samples', 'tokens', 'channels2', 'dtype', 'img_size', 'source', 'world'}
    DIR/COMPLETE         written last; a cache without it is rebuilt
"""
from __future__ import annotations

import json
import os

import torch

from rectok_fast.checkpoint import atomic_torch_save
from rectok_fast.data import PlanDataset, Source, _collate, epoch_plan, sample_flip

MARKER = "COMPLETE"


def cache_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER)) and os.path.isfile(os.path.join(folder, "meta.json"))


@torch.no_grad()
def build_latent_cache(folder: str, tokenizer, source: Source, img_size: int, rank: int, world: int,
                       batch_size: int, device, dtype: str = "bf16", seed: int = 0, num_workers: int = 0,
                       autocast: bool = False, progress: bool = True, barrier=lambda: None) -> None:
    """Every rank encodes the samples ``rank::world``; rank 0 writes meta + marker after the barrier."""
    from tqdm.auto import tqdm
    os.makedirs(folder, exist_ok=True)
    n = len(source)
    mine = list(range(rank, n, world))
    store = torch.bfloat16 if dtype == "bf16" else torch.float32
    was = tokenizer.training
    tokenizer.eval()
    out_m, out_i, out_l = [], [], []
    chunks = [mine[k:k + batch_size] for k in range(0, len(mine), batch_size)]
    for idx in tqdm(chunks, disable=not (progress and rank == 0), desc="latent cache", unit="batch"):
        pair = []
        labels = None
        for flip in ("none", "always"):
            ds = PlanDataset(source, img_size, idx, seed, 0, flip)
            batch = _collate([ds[j] for j in range(len(idx))])
            labels = batch["labels"]
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
                m = tokenizer.encode_moments(batch["images"].to(device))
            pair.append(m.float().cpu())
        out_m.append(torch.stack(pair, 1).to(store))
        out_i.append(torch.tensor(idx, dtype=torch.long))
        out_l.append(labels)
    tokenizer.train(was)
    shard = {"indices": torch.cat(out_i) if out_i else torch.zeros(0, dtype=torch.long),
             "labels": torch.cat(out_l) if out_l else torch.zeros(0, dtype=torch.long),
             "moments": torch.cat(out_m) if out_m else torch.zeros(0)}
    atomic_torch_save(shard, os.path.join(folder, f"shard_{rank:05d}.pt"))
    barrier()
    if rank == 0:
        m = shard["moments"]
        meta = {"num_samples": n, "tokens": int(m.shape[2]), "channels2": int(m.shape[3]), "dtype": dtype,
                "img_size": img_size, "source": source.description, "world": world}
        with open(os.path.join(folder, "meta.json"), "w") as fh:
            json.dump(meta, fh)
        with open(os.path.join(folder, MARKER), "w") as fh:
            fh.write("ok\n")
    barrier()


class LatentCache:
    """All shards (memory-mapped) with a dataset-index -> row lookup."""

    def __init__(self, folder: str):
        if not cache_complete(folder):
            raise FileNotFoundError(f"latent cache {folder!r} is missing or incomplete")
        with open(os.path.join(folder, "meta.json")) as fh:
            self.meta = json.load(fh)
        n = self.meta["num_samples"]
        self.shards = []
        self.where = torch.full((n, 2), -1, dtype=torch.long)
        for s in range(self.meta["world"]):
            d = torch.load(os.path.join(folder, f"shard_{s:05d}.pt"), map_location="cpu", weights_only=True,
                           mmap=True)
            k = len(self.shards)
            self.shards.append(d)
            self.where[d["indices"], 0] = k
            self.where[d["indices"], 1] = torch.arange(d["indices"].numel())
        if (self.where[:, 0] < 0).any():
            raise RuntimeError(f"latent cache {folder!r} does not cover every sample")
        self.labels = torch.zeros(n, dtype=torch.long)
        for d in self.shards:
            self.labels[d["indices"]] = d["labels"]

    def __len__(self):
        return self.meta["num_samples"]

    def moments(self, indices, flips) -> torch.Tensor:
        """(B, N, 2C) fp32 moments of the given samples and flip states."""
        out = []
        for i, f in zip(indices.tolist(), flips.tolist() if torch.is_tensor(flips) else flips):
            s, r = self.where[i].tolist()
            out.append(self.shards[s]["moments"][r, int(bool(f))].float())
        return torch.stack(out)

    def stats(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean/std of the unflipped moments' first ``channels`` channels (spec 5.3)."""
        s1 = s2 = 0.0
        cnt = 0
        for d in self.shards:
            m = d["moments"][:, 0].double().reshape(-1, d["moments"].shape[-1])
            s1 = s1 + m.sum(0)
            s2 = s2 + (m * m).sum(0)
            cnt += m.shape[0]
        mean = s1 / cnt
        std = (s2 / cnt - mean * mean).clamp_min(0).sqrt()
        return mean[:channels].float(), std[:channels].float()


class CacheLoader:
    """Same order/sharding/flips as :class:`rectok_fast.data.TrainLoader`, yielding cached moments."""

    def __init__(self, cache: LatentCache, batch_size: int, rank: int, world: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True):
        from rectok_fast.data import steps_per_epoch
        self.cache, self.batch_size, self.rank, self.world, self.seed = cache, batch_size, rank, world, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.skipped = 0
        self.steps_per_epoch = steps_per_epoch(len(cache), world, batch_size, drop_last)

    def epoch(self, epoch: int, start_step: int = 0):
        plan = epoch_plan(len(self.cache), self.world, self.batch_size, self.seed, epoch, self.shuffle,
                          self.drop_last)[start_step:, self.rank]
        for idx in plan:
            flips = torch.tensor([sample_flip(self.seed, epoch, i) for i in idx.tolist()])
            yield {"moments": self.cache.moments(idx, flips), "labels": self.cache.labels[idx], "indices": idx,
                   "flipped": flips, "skipped": 0}
