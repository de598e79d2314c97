"""Per-rank training batches: a torch DataLoader over PIL decoding, or the DALI pipeline.

Corrupt or unreadable images never crash training: the torch path substitutes the next readable
sample of the dataset (fixed batch shapes on every rank), the DALI path decodes such a batch with the
torch path; both count what they skipped and the trainer warns at the end.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from rectok_fast.data.plan import rank_plan, steps_per_epoch
from rectok_fast.data.sources import DataError, Source
from rectok_fast.data.transforms import demo_sample, preprocess_file, sample_flips, to_tensor_pm1

MAX_SUBSTITUTIONS = 64          # consecutive unreadable files before the loader gives up with an error


class PlanDataset(torch.utils.data.Dataset):
    """Maps a flat array of dataset indices (one epoch, one rank) to preprocessed samples.

    Returns (image (3,H,W) in [-1,1], label, index, flipped, n_skipped). An unreadable image is
    replaced by the next readable one (index + 1, + 2, ...) and counted in ``n_skipped``. Indices are
    held as a numpy array (forked workers share it without copy-on-read).
    """

    def __init__(self, source: Source, size: int, indices, seed: int, epoch: int, flip: str = "random"):
        self.source, self.size = source, int(size)
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.seed, self.epoch, self.flip = seed, epoch, flip
        self.flips = sample_flips(seed, epoch, self.indices, flip)

    def __len__(self):
        return int(self.indices.shape[0])

    def load(self, index: int):
        """(PIL image after the official crop / demo crop, label, actual index, n_skipped)."""
        src = self.source
        if src.kind == "demo":
            return demo_sample(index, self.size, self.seed, self.epoch), 0, index, 0
        n = len(src.samples)
        for k in range(MAX_SUBSTITUTIONS):
            i = (index + k) % n
            path = src.samples.path(i)
            try:
                return preprocess_file(path, self.size), int(src.samples.labels[i]), i, k
            except Exception as exc:  # corrupt, truncated, missing, unsupported: skip it
                if os.environ.get("RECTOK_FAST_DATA_VERBOSE"):
                    warnings.warn(f"skipping unreadable image {path}: {exc!r}")
        raise DataError(f"{MAX_SUBSTITUTIONS} consecutive unreadable images starting at {src.samples.path(index)!r}")

    def load_uint8(self, j: int):
        """(HxWx3 uint8 unflipped, label, index, n_skipped) of position ``j``."""
        img, label, _, skipped = self.load(int(self.indices[j]))
        return np.array(img, dtype=np.uint8), label, int(self.indices[j]), skipped

    def __getitem__(self, j):
        arr, label, index, skipped = self.load_uint8(j)
        flipped = bool(self.flips[j])
        if flipped:
            arr = arr[:, ::-1]
        return to_tensor_pm1(arr), label, index, flipped, skipped


def collate(items):
    imgs, labels, idx, flips, skipped = zip(*items)
    return {"images": torch.stack(imgs), "labels": torch.tensor(labels, dtype=torch.long),
            "indices": torch.tensor(idx, dtype=torch.long), "flipped": torch.tensor(flips, dtype=torch.bool),
            "skipped": int(sum(skipped))}



class TrainLoader:
    """Per-rank batches of one epoch, for any source, with the torch or DALI backend.

    ``for batch in loader.epoch(e, start_step=k)`` yields dicts with ``images`` (B,3,S,S) float32
    in [-1,1] (pinned on CPU for torch; on the GPU for DALI "mixed"), ``labels``, ``indices`` (dataset
    indices), ``flipped``, ``skipped``. ``loader.skipped`` counts the unreadable images met so far.
    """

    def __init__(self, source: Source, size: int, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, flip: str = "random",
                 backend: str = "torch", num_workers: int = 2, device: str | torch.device = "cpu",
                 dali_threads: int | None = None, prefetch: int = 2):
        if backend not in ("torch", "dali"):
            raise DataError(f"unknown loader {backend!r}; choose 'torch' or 'dali'")
        if flip not in ("random", "none", "always"):
            raise DataError(f"unknown flip mode {flip!r}")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} outside world size {world}")
        if prefetch < 1:
            raise DataError(f"prefetch must be >= 1, got {prefetch}")
        self.source, self.size, self.batch_size = source, int(size), int(batch_size)
        self.rank, self.world, self.seed = rank, world, int(seed)
        self.shuffle, self.drop_last, self.flip = shuffle, drop_last, flip
        self.backend, self.num_workers, self.device = backend, int(num_workers), torch.device(device)
        self.prefetch = int(prefetch)
        self.skipped = 0
        self.steps_per_epoch = steps_per_epoch(len(source), world, batch_size, drop_last)
        if self.steps_per_epoch == 0:
            raise DataError(f"the dataset has {len(source)} samples, fewer than one global batch "
                            f"({world} ranks x {batch_size}); lower --batch_size or pass --no_drop_last")
        self._dali = None
        if backend == "dali":
            if source.kind == "demo":
                raise DataError("the DALI loader reads files; use --loader torch for the demo source "
                                "(or write the demo photos to a folder with rectok_fast.data.write_demo_image_folder)")
            from rectok_fast.data.dali import DaliReader
            self._dali = DaliReader(source, self.size, self.batch_size, self.device, dali_threads,
                                    max(2, self.prefetch), self.seed)

    def plan(self, epoch: int, start_step: int = 0) -> torch.Tensor:
        """(steps_left, batch) dataset indices of this rank."""
        return rank_plan(len(self.source), self.world, self.batch_size, self.seed, epoch, self.rank,
                         self.shuffle, self.drop_last, start_step)

    def epoch(self, epoch: int, start_step: int = 0):
        plan = self.plan(epoch, start_step)
        if plan.shape[0] == 0:
            return
        if self._dali is not None:
            yield from self._dali.epoch(plan, epoch, self.flip, self)
            return
        ds = PlanDataset(self.source, self.size, plan.reshape(-1).numpy(), self.seed, epoch, self.flip)
        dl = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, shuffle=False, drop_last=False, collate_fn=collate,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False, prefetch_factor=max(2, self.prefetch) if self.num_workers > 0 else None)
        for batch in dl:
            self.skipped += batch["skipped"]
            yield batch


def _cfg(cfg, name, default):
    return getattr(cfg, name, default)


def build_loader(cfg, rank: int, world: int, device, flip: str = "random", shuffle: bool = True,
                 drop_last: bool | None = None, source: Source | None = None) -> TrainLoader:
    """The trainer's loader from its config (data_path, file_list, loader, img_size, batch_size,
    num_workers, seed, drop_last, listing_cache_dir, dali_threads, prefetch). An argparse namespace with
    ``no_drop_last`` instead of ``drop_last`` works too."""
    from rectok_fast.data.sources import build_source
    if source is None:
        source = build_source(_cfg(cfg, "data_path", None), _cfg(cfg, "file_list", None),
                              _cfg(cfg, "listing_cache_dir", None), rank)
    if drop_last is None:
        drop_last = _cfg(cfg, "drop_last", None)
        if drop_last is None:
            drop_last = not _cfg(cfg, "no_drop_last", False)
    return TrainLoader(source, cfg.img_size, cfg.batch_size, rank, world, seed=cfg.seed, shuffle=shuffle,
                       drop_last=bool(drop_last), flip=flip, backend=_cfg(cfg, "loader", "torch"),
                       num_workers=_cfg(cfg, "num_workers", 2), device=device,
                       dali_threads=_cfg(cfg, "dali_threads", None), prefetch=_cfg(cfg, "prefetch", 2) or 2)
