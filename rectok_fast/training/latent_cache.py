"""Latent cache for the DiT stage: the tokenizer's posterior moments of every training image, for BOTH
flips, computed once with the frozen (eval) tokenizer. Training then samples the posterior from the
cached moments each step (``tokenizer.latents_from_moments``), exactly as the online path does from
freshly encoded moments. The cache freezes the augmentation to the official one (ADM center crop +
horizontal flip), which is all the official pipeline has.

Sized for ImageNet (1.28M images; ~336 GB in bf16 for the official tokenizer):

* Build: DataLoader workers decode each image once; the image and its mirror are encoded in one
  batch; rows are streamed to ``.npy`` chunk files batch by batch, so peak memory is one batch
  whatever the dataset size. Chunk ``c`` holds dataset indices ``[c*K, (c+1)*K)`` (a layout that does
  not depend on the number of ranks); rank ``r`` builds the chunks ``c = r, r + W, ...``. A finished
  chunk is renamed into place, so an interrupted build resumes at the missing chunks.
* A manifest (format version, sha256 of the tokenizer weights, image size, sha256 of the file list,
  storage dtype, count, token shape) is checked on every use: a stale cache is refused with an error
  naming what differs, or rebuilt when asked.
* Read: a DataLoader over the steps of an epoch gathers each batch from memory-mapped chunks in
  worker processes and prefetches it; the training step only receives tensors.

Layout::

    DIR/manifest.json
    DIR/chunk_00000.npy          (rows, 2, N, 2C) moments, [:, 0] unflipped, [:, 1] flipped
                                 (bf16 stored as int16 bit patterns, fp32 as float32)
    DIR/chunk_00000.labels.npy   (rows,) int64 labels (of the substitute when an image was unreadable)
    DIR/COMPLETE                 json {"skipped": ...}; written last
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil

import numpy as np
import torch

from rectok_fast.data import PlanDataset, Source, rank_plan, sample_flips, steps_per_epoch

FORMAT_VERSION = 2
MARKER = "COMPLETE"
MANIFEST = "manifest.json"
CHUNK_BYTES = 256 << 20          # target size of one chunk file
# manifest fields that must match for a cache to be used; the others are informational
KEY_FIELDS = ("format_version", "tokenizer_sha256", "img_size", "file_list_sha256", "dtype", "count",
              "tokens", "channels2")
STORE_DTYPES = {"bf16": (torch.bfloat16, np.dtype("<i2")), "fp32": (torch.float32, np.dtype("<f4"))}


class LatentCacheMismatch(RuntimeError):
    """The cache on disk was made with another tokenizer, image size, file list or dtype."""


# ------------------------------------------------------------------------------------- manifest
def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 over the tokenizer's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(tokenizer.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _token_shape(tokenizer, img_size: int, device) -> tuple[int, int]:
    """(N tokens, 2C moment channels) of one image."""
    if hasattr(tokenizer, "seq_h") and hasattr(tokenizer, "token_channels"):
        return int(tokenizer.seq_h * tokenizer.seq_w), 2 * int(tokenizer.token_channels)
    with torch.no_grad():
        m = tokenizer.encode_moments(torch.zeros(1, 3, img_size, img_size, device=device))
    return int(m.shape[1]), int(m.shape[2])


def expected_manifest(tokenizer, source: Source, img_size: int, dtype: str = "bf16", seed: int = 0,
                      tokenizer_id: str = "", device="cpu", chunk_bytes: int = CHUNK_BYTES) -> dict:
    if dtype not in STORE_DTYPES:
        raise ValueError(f"latent cache dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    tokens, ch2 = _token_shape(tokenizer, img_size, device)
    n = len(source)
    row_bytes = 2 * tokens * ch2 * STORE_DTYPES[dtype][1].itemsize
    return {"format_version": FORMAT_VERSION, "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "img_size": int(img_size), "file_list_sha256": source.fingerprint(seed), "dtype": dtype,
            "count": n, "tokens": tokens, "channels2": ch2,
            "chunk_size": int(max(1, min(n, chunk_bytes // row_bytes))),
            "tokenizer_id": str(tokenizer_id or ""), "source": source.description}


def manifest_differences(have: dict, want: dict) -> list[str]:
    return [f"{k}: cache has {have.get(k)!r}, expected {want.get(k)!r}" for k in KEY_FIELDS
            if have.get(k) != want.get(k)]


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def cache_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER)) and os.path.isfile(os.path.join(folder, MANIFEST))


def num_chunks(manifest: dict) -> int:
    return -(-manifest["count"] // manifest["chunk_size"])


def chunk_path(folder: str, c: int) -> str:
    return os.path.join(folder, f"chunk_{c:05d}.npy")


def labels_path(folder: str, c: int) -> str:
    return os.path.join(folder, f"chunk_{c:05d}.labels.npy")


# ------------------------------------------------------------------------------------------ build
class _DecodeOnce(torch.utils.data.Dataset):
    """uint8 HWC images (unflipped; the mirror is made from the same decode), labels, indices."""

    def __init__(self, source: Source, size: int, indices: np.ndarray, seed: int):
        self.plan = PlanDataset(source, size, indices, seed, epoch=0, flip="none")

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, j):
        arr, label, index, skipped = self.plan.load_uint8(j)
        return torch.from_numpy(arr), label, index, skipped


def _collate_uint8(items):
    imgs, labels, idx, skipped = zip(*items)
    return torch.stack(imgs), torch.tensor(labels), torch.tensor(idx), int(sum(skipped))


class _ChunkWriter:
    """Streams rows, in ascending dataset order, into chunk files; a chunk is renamed into place when full."""

    def __init__(self, folder: str, manifest: dict):
        self.folder, self.m = folder, manifest
        self.k, self.n = manifest["chunk_size"], manifest["count"]
        self.np_dtype = STORE_DTYPES[manifest["dtype"]][1]
        self.fh, self.chunk, self.rows_left, self.labels = None, -1, 0, []

    def _open(self, c: int):
        rows = min(self.n, (c + 1) * self.k) - c * self.k
        self.tmp = chunk_path(self.folder, c) + f".tmp{os.getpid()}"
        self.fh = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(self.fh, {
            "descr": np.lib.format.dtype_to_descr(self.np_dtype), "fortran_order": False,
            "shape": (rows, 2, self.m["tokens"], self.m["channels2"])})
        self.chunk, self.rows_left, self.labels = c, rows, []

    def write(self, indices: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> None:
        pos = 0
        while pos < len(indices):
            c = int(indices[pos]) // self.k
            if self.fh is None:
                self._open(c)
            elif c != self.chunk:
                raise RuntimeError(f"latent cache chunk {self.chunk} is incomplete before chunk {c} starts")
            take = min(self.rows_left, len(indices) - pos)
            self.fh.write(np.ascontiguousarray(rows[pos:pos + take]).tobytes())
            self.labels.append(labels[pos:pos + take])
            self.rows_left -= take
            pos += take
            if self.rows_left == 0:
                self._close()

    def _close(self):
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        np.save(labels_path(self.folder, self.chunk), np.concatenate(self.labels).astype(np.int64))
        os.replace(self.tmp, chunk_path(self.folder, self.chunk))   # last: the chunk now counts as done

    def abort(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


@torch.no_grad()
def _build_chunks(folder: str, manifest: dict, tokenizer, source: Source, img_size: int, rank: int, world: int,
                  batch_size: int, device, seed: int, num_workers: int, autocast: bool, progress: bool) -> int:
    """Encode this rank's missing chunks; returns the number of unreadable images substituted."""
    from tqdm.auto import tqdm
    k, n = manifest["chunk_size"], manifest["count"]
    todo = [c for c in range(rank, num_chunks(manifest), world) if not os.path.exists(chunk_path(folder, c))]
    if not todo:
        return 0
    mine = {os.path.basename(chunk_path(folder, c)) for c in todo}
    for f in os.listdir(folder):                # leftovers of an interrupted build of these chunks
        if ".npy.tmp" in f and f.split(".tmp")[0] in mine:
            os.unlink(os.path.join(folder, f))
    indices = np.concatenate([np.arange(c * k, min(n, (c + 1) * k), dtype=np.int64) for c in todo])
    ds = _DecodeOnce(source, img_size, indices, seed)
    device = torch.device(device)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=_collate_uint8,
                                     num_workers=num_workers, pin_memory=device.type == "cuda",
                                     prefetch_factor=2 if num_workers > 0 else None)
    store = STORE_DTYPES[manifest["dtype"]][0]
    writer = _ChunkWriter(folder, manifest)
    was = tokenizer.training
    tokenizer.eval()
    skipped = 0
    try:
        for imgs, labels, idx, sk in tqdm(dl, disable=not (progress and rank == 0), desc="latent cache",
                                          unit="batch"):
            # the exact arithmetic of to_tensor_pm1, on the device; the mirror costs no second decode
            x = imgs.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                m = tokenizer.encode_moments(torch.cat([x, x.flip(-1)]))
            b = x.shape[0]
            pair = torch.stack([m[:b], m[b:]], 1).to(store)
            if store == torch.bfloat16:
                pair = pair.view(torch.int16)
            writer.write(idx.numpy(), pair.cpu().numpy(), labels.numpy())
            skipped += sk
    except BaseException:
        writer.abort()
        raise
    finally:
        tokenizer.train(was)
    return skipped


def prepare_latent_cache(folder: str, tokenizer, source: Source, img_size: int, rank: int = 0, world: int = 1,
                         batch_size: int = 64, device="cpu", dtype: str = "bf16", seed: int = 0,
                         num_workers: int = 2, autocast: bool = False, progress: bool = True,
                         barrier=lambda: None, tokenizer_id: str = "", rebuild: bool = False,
                         chunk_bytes: int = CHUNK_BYTES) -> "LatentCache":
    """Open the cache in ``folder``, building (or finishing) it first when needed. Collective: every
    rank calls it with the same arguments; ``barrier`` synchronises them.

    A cache made for another tokenizer, image size, file list or dtype raises
    :class:`LatentCacheMismatch`, or is deleted and rebuilt with ``rebuild=True``."""
    want = expected_manifest(tokenizer, source, img_size, dtype, seed, tokenizer_id, device, chunk_bytes)
    want["encoded_with"] = "bf16 autocast" if autocast else "fp32"         # informational
    have = read_manifest(folder)
    if have is not None:
        diffs = manifest_differences(have, want)
        if diffs:
            if not rebuild:
                raise LatentCacheMismatch(
                    f"latent cache {folder!r} was made for different inputs ({'; '.join(diffs)}). Point "
                    f"--latent_cache at a new folder, delete this one, or rebuild it (prepare_latent_cache(..., "
                    f"rebuild=True)).")
            barrier()                   # every rank has read the old manifest before rank 0 deletes it
            if rank == 0:
                _clear(folder)
            have = None
            barrier()
        else:
            want["chunk_size"] = have["chunk_size"]          # resume with the layout on disk
    if not cache_complete(folder):
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
            if have is None:
                _write_json(os.path.join(folder, MANIFEST), want)
        barrier()
        skipped = _build_chunks(folder, want, tokenizer, source, img_size, rank, world, batch_size, device,
                                seed, num_workers, autocast, progress)
        _write_json(os.path.join(folder, f"build-rank{rank:05d}.json"), {"skipped": skipped})
        barrier()
        if rank == 0:
            missing = [c for c in range(num_chunks(want)) if not os.path.exists(chunk_path(folder, c))]
            if missing:
                raise RuntimeError(f"latent cache {folder!r}: chunks {missing[:5]} were not written")
            total = 0
            for f in os.listdir(folder):
                if f.startswith("build-rank") and f.endswith(".json"):
                    with open(os.path.join(folder, f)) as fh:
                        total += json.load(fh)["skipped"]
            _write_json(os.path.join(folder, MARKER), {"skipped": total})
        barrier()
    return LatentCache(folder, expect=want)


def _clear(folder: str) -> None:
    for f in os.listdir(folder):
        if f.startswith("chunk_") or f.startswith("build-rank") or f in (MANIFEST, MARKER, "meta.json") \
                or f.startswith("shard_"):
            p = os.path.join(folder, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)


def build_latent_cache(folder: str, tokenizer, source: Source, img_size: int, rank: int, world: int,
                       batch_size: int, device, dtype: str = "bf16", seed: int = 0, num_workers: int = 0,
                       autocast: bool = False, progress: bool = True, barrier=lambda: None) -> None:
    """The older entry point: build (or finish) the cache; refuses a stale one."""
    prepare_latent_cache(folder, tokenizer, source, img_size, rank, world, batch_size, device, dtype, seed,
                         num_workers, autocast, progress, barrier)


# ------------------------------------------------------------------------------------------- read
class LatentCache:
    """A complete cache: labels in memory, moments read from memory-mapped chunks on demand."""

    MAX_OPEN = 64                       # memory maps kept open per process

    def __init__(self, folder: str, expect: dict | None = None):
        if not cache_complete(folder):
            raise FileNotFoundError(f"latent cache {folder!r} is missing or incomplete (no {MARKER} marker)")
        self.folder = folder
        self.manifest = read_manifest(folder)
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise LatentCacheMismatch(f"latent cache {folder!r} has format {self.manifest.get('format_version')}, "
                                      f"this version reads {FORMAT_VERSION}; rebuild it")
        if expect is not None:
            diffs = manifest_differences(self.manifest, expect)
            if diffs:
                raise LatentCacheMismatch(f"latent cache {folder!r} was made for different inputs: {'; '.join(diffs)}")
        with open(os.path.join(folder, MARKER)) as fh:
            self.skipped_at_build = int(json.load(fh).get("skipped", 0))
        self.chunk_size = self.manifest["chunk_size"]
        self.torch_dtype, self.np_dtype = STORE_DTYPES[self.manifest["dtype"]]
        self.labels_np = np.concatenate([np.load(labels_path(folder, c)) for c in range(num_chunks(self.manifest))])
        if self.labels_np.shape[0] != len(self):
            raise RuntimeError(f"latent cache {folder!r}: {self.labels_np.shape[0]} labels for {len(self)} samples")
        self.labels = torch.from_numpy(self.labels_np)
        self._open = collections.OrderedDict()

    @property
    def meta(self) -> dict:
        return self.manifest

    def __len__(self):
        return int(self.manifest["count"])

    def __getstate__(self):             # memory maps are reopened in each worker process
        state = dict(self.__dict__)
        state["_open"] = collections.OrderedDict()
        return state

    def chunk(self, c: int) -> np.ndarray:
        """Memory map of chunk ``c``: (rows, 2, N, 2C) in the storage dtype (int16 bits for bf16)."""
        mm = self._open.get(c)
        if mm is None:
            mm = np.load(chunk_path(self.folder, c), mmap_mode="r")
            self._open[c] = mm
            if len(self._open) > self.MAX_OPEN:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(c)
        return mm

    def _as_torch(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else t

    def read(self, indices, flips) -> torch.Tensor:
        """(B, N, 2C) moments of the given dataset indices and flip states, in the storage dtype."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        flp = np.asarray(flips, dtype=bool).reshape(-1).astype(np.int64)
        m = self.manifest
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent cache {self.folder!r} holds samples 0..{len(self) - 1}, asked for "
                             f"{idx[(idx < 0) | (idx >= len(self))][:5].tolist()}")
        if flp.size != idx.size:
            raise ValueError(f"{idx.size} indices but {flp.size} flip flags")
        result = torch.empty((idx.size, m["tokens"], m["channels2"]),
                             dtype=torch.int16 if self.torch_dtype == torch.bfloat16 else torch.float32)
        if torch.utils.data.get_worker_info() is not None:
            result.share_memory_()      # in a DataLoader worker: gathered straight into what is sent
        out = result.numpy()
        chunks, inverse = np.unique(idx // self.chunk_size, return_inverse=True)
        rows = idx % self.chunk_size
        for j, c in enumerate(chunks.tolist()):
            sel = np.flatnonzero(inverse == j)
            out[sel] = self.chunk(c)[rows[sel], flp[sel]]
        return result.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else result

    def moments(self, indices, flips) -> torch.Tensor:
        """(B, N, 2C) fp32 moments (the older interface)."""
        if torch.is_tensor(indices):
            indices = indices.cpu().numpy()
        if torch.is_tensor(flips):
            flips = flips.cpu().numpy()
        return self.read(indices, flips).float()

    def unflipped_blocks(self, indices=None, rank: int = 0, world: int = 1, block: int = 1024):
        """Streams (rows, N, 2C) unflipped moments (storage dtype, torch) of this rank's share: chunks
        ``rank::world`` of the whole cache, or of ``indices`` when given."""
        if indices is not None and len(indices) == len(self) and np.array_equal(np.sort(indices), np.arange(len(self))):
            indices = None                      # the whole set: stream whole chunks
        if indices is None:
            for c in range(rank, num_chunks(self.manifest), world):
                mm = self.chunk(c)
                for a in range(0, mm.shape[0], block):
                    yield self._as_torch(np.ascontiguousarray(mm[a:a + block, 0]))
            return
        idx = np.sort(np.asarray(indices, dtype=np.int64).reshape(-1))[rank::world]
        for a in range(0, idx.size, block):
            part = idx[a:a + block]
            yield self.read(part, np.zeros(part.size, dtype=bool))

    def stats(self, channels: int, indices=None, rank: int = 0, world: int = 1, all_reduce=None):
        """Per-channel (mean, std) of the unflipped posterior means (first ``channels``), one streaming
        fp64 pass (see :func:`rectok_fast.latent_stats.latent_stats_from_cache`)."""
        from rectok_fast.latent_stats import latent_stats_from_cache
        mean, std, _ = latent_stats_from_cache(self, channels, indices, rank, world, all_reduce)
        return mean, std


class _EpochSteps(torch.utils.data.Dataset):
    """Item (epoch, k) = the k-th batch of one rank's plan of that epoch, gathered from the cache (the
    plan is a pure function of (seed, epoch), computed where the item is made)."""

    def __init__(self, loader: "CacheLoader"):
        self.cache, self.loader = loader.cache, loader
        self._epoch, self._plan, self._flips = None, None, None

    def _epoch_plan(self, epoch: int):
        if self._epoch != epoch:
            ld = self.loader
            self._plan = rank_plan(len(self.cache), ld.world, ld.batch_size, ld.seed, epoch, ld.rank, ld.shuffle,
                                   ld.drop_last).numpy()
            self._flips = sample_flips(ld.seed, epoch, self._plan).reshape(self._plan.shape)
            self._epoch = epoch
        return self._plan, self._flips

    def __len__(self):
        return self.loader.steps_per_epoch

    def __getitem__(self, key):
        epoch, k = key
        plan, flips = self._epoch_plan(epoch)
        idx, flp = plan[k], flips[k]
        return {"moments": self.cache.read(idx, flp), "labels": torch.from_numpy(self.cache.labels_np[idx]),
                "indices": torch.from_numpy(idx.copy()), "flipped": torch.from_numpy(flp.copy()), "skipped": 0}


class _StepKeys(torch.utils.data.Sampler):
    """(epoch, step) keys of the steps left in the current epoch (set before each pass)."""

    def __init__(self):
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self):
        return ((self.epoch, k) for k in range(self.start, self.stop))

    def __len__(self):
        return max(0, self.stop - self.start)


class CacheLoader:
    """Same order, sharding and flips as :class:`rectok_fast.data.TrainLoader`, yielding cached moments
    ({"moments" (B, N, 2C) storage dtype, "labels", "indices", "flipped", "skipped"}), gathered and
    prefetched by DataLoader workers."""

    def __init__(self, cache: LatentCache, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0,
                 drop_last: bool = True, num_workers: int = 2, shuffle: bool = True, prefetch: int = 2):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.cache, self.batch_size, self.rank, self.world, self.seed = cache, int(batch_size), rank, world, int(seed)
        self.shuffle, self.drop_last = shuffle, bool(drop_last)
        self.num_workers, self.prefetch = int(num_workers), max(2, int(prefetch))
        self.skipped = 0
        self.steps_per_epoch = steps_per_epoch(len(cache), world, batch_size, self.drop_last)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the latent cache has {len(cache)} samples, fewer than one global batch "
                             f"({world} ranks x {batch_size})")
        self._keys = _StepKeys()
        self._dl = None

    def epoch(self, epoch: int, start_step: int = 0):
        if start_step >= self.steps_per_epoch:
            return
        if self._dl is None:
            w = self.num_workers
            self._dl = torch.utils.data.DataLoader(
                _EpochSteps(self), batch_size=None, sampler=self._keys, num_workers=w,
                pin_memory=torch.cuda.is_available(), persistent_workers=False,
                prefetch_factor=self.prefetch if w > 0 else None)
        self._keys.epoch, self._keys.start, self._keys.stop = int(epoch), int(start_step), self.steps_per_epoch
        yield from self._dl
