"""Per-channel latent statistics for the DiT (spec 5.3).

Over a dataset, with the tokenizer in eval mode (no masking, no noise): accumulate the posterior
MOMENTS per channel, mean = E[x], std = sqrt(E[x^2] - E[x]^2), keep the first C channels (the posterior
mean). Sums run in float64 so a full ImageNet pass does not lose precision. The result is stored beside
the tokenizer checkpoint as ``<ckpt>.latent_stats.pt`` and installed with ``tokenizer.set_latent_stats``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

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
