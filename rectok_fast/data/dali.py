"""The NVIDIA DALI loader: files read by DALI's own reader threads (no Python thread feeds it),
decoded ("mixed" nvJPEG on a GPU when the device is CUDA, its CPU decoder otherwise), resized and
cropped to the exact ADM geometry computed inside the graph from the image header, mirrored,
normalised to [-1, 1], CHW. The executor is asynchronous and pipelined with a prefetch queue >= 2.

Order and flips come from the same epoch plan and flip hash as the torch loader: each epoch, the
rank's planned file list (in plan order) is given to ``fn.readers.file`` with label
``2 * index + flip``, so the mirror flag travels with the file and the output order is checked
against the plan. The resampling differs from PIL's (one antialiased cubic resize instead of BOX
halvings + BICUBIC): differences are at the level of resampling noise.

A batch that DALI cannot read or decode is produced by the torch path instead (which substitutes
unreadable images and counts them), and the pipeline restarts at the next batch.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from rectok_fast.data.sources import DataError, Source
from rectok_fast.data.transforms import sample_flips

MAX_HALVINGS = 16       # BOX halvings the graph can reproduce: short side up to size * 2**17


class PlanOrderError(Exception):
    """DALI's reader returned samples out of plan order (a bug, never a data problem)."""


def default_threads() -> int:
    """CPU threads for one rank's pipeline: this process's CPUs shared by the ranks on the node."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 2
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(2, cpus // max(1, local))


def _adm_geometry_nodes(shape, size: int):
    """DALI expressions for :func:`rectok_fast.data.transforms.adm_geometry` of a HWC shape."""
    from nvidia.dali import math as dm
    h, w = shape[0], shape[1]
    for _ in range(MAX_HALVINGS):
        halve = dm.min(w, h) >= 2 * size           # bool: halve both sides (ADM's BOX halving)
        w, h = w // (halve + 1), h // (halve + 1)
    short = dm.min(w, h)

    def pyround(num, den):                        # Python's round(num / den): half to even
        q = num // den
        twice_r = 2 * (num - q * den)
        return q + (twice_r > den) + (twice_r == den) * (q - 2 * (q // 2))
    rw, rh = pyround(w * size, short), pyround(h * size, short)
    return rw, rh, (rw - size) // 2, (rh - size) // 2


class DaliReader:
    """One rank's DALI pipeline; :meth:`epoch` yields the batches of a plan."""

    def __init__(self, source: Source, size: int, batch_size: int, device: torch.device,
                 threads: int | None = None, prefetch: int = 2, seed: int = 0):
        try:
            import nvidia.dali  # noqa: F401
        except Exception as exc:
            raise DataError(f"--loader dali needs NVIDIA DALI (pip install nvidia-dali-cuda130): {exc!r}") from None
        if prefetch < 2:
            raise DataError(f"the DALI prefetch depth must be >= 2, got {prefetch}")
        self.source, self.size, self.batch_size = source, int(size), int(batch_size)
        self.threads = int(threads) if threads else default_threads()
        self.prefetch, self.seed = int(prefetch), int(seed)
        device = torch.device(device)
        self.gpu = device.type == "cuda" and torch.cuda.is_available()
        self.device_id = None
        if self.gpu:
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        self.fallback_batches = 0       # batches DALI could not read, made by the torch path

    def _pipeline(self, files: list, codes: list):
        from nvidia.dali import fn, pipeline_def, types
        size, gpu = self.size, self.gpu

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                      seed=self.seed, exec_async=True, exec_pipelined=True, prefetch_queue_depth=self.prefetch)
        def pipe():
            enc, code = fn.readers.file(files=files, labels=codes, random_shuffle=False, name="reader",
                                        prefetch_queue_depth=self.prefetch)
            # EXIF orientation is ignored, as PIL's Image.open (the official loader) ignores it
            shape = fn.peek_image_shape(enc, adjust_orientation=False, dtype=types.INT64)
            rw, rh, left, top = _adm_geometry_nodes(shape, size)
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False)
            img = fn.resize(img, resize_x=fn.cast(rw, dtype=types.FLOAT), resize_y=fn.cast(rh, dtype=types.FLOAT),
                            interp_type=types.INTERP_CUBIC, antialias=True)
            anchor = fn.cast(fn.stack(left, top), dtype=types.FLOAT)
            img = fn.slice(img, anchor, np.array([size, size], np.float32), axis_names="WH",
                           normalized_anchor=False, normalized_shape=False)
            mirror = fn.cast(code - 2 * (code // 2), dtype=types.INT32)
            # named (argument) inputs stay on the CPU, also for GPU operators
            img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                           std=[127.5] * 3, mirror=mirror)
            return img, code

        p = pipe()
        p.build()
        return p

    def _to_torch(self, out) -> torch.Tensor:
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            t = torch.empty((self.batch_size, 3, self.size, self.size), dtype=torch.float32,
                            device=torch.device("cuda", self.device_id))
            feed_ndarray(out.as_tensor(), t, cuda_stream=torch.cuda.current_stream())
            return t
        return torch.from_numpy(np.array(out.as_tensor(), copy=True))

    def epoch(self, plan: torch.Tensor, epoch: int, flip: str, owner):
        """Batches of ``plan`` (steps, batch); unreadable batches go through the torch path and are
        counted in ``owner.skipped``."""
        from rectok_fast.data.torch_loader import PlanDataset, collate
        plan_np = plan.numpy()
        flips = sample_flips(self.seed if owner is None else owner.seed, epoch, plan_np, flip).reshape(plan_np.shape)
        codes = plan_np * 2 + flips
        labels = torch.from_numpy(self.source.labels[plan_np])
        steps, k = plan_np.shape[0], 0
        while k < steps:
            files = [self.source.path(i) for i in plan_np[k:].reshape(-1).tolist()]
            try:        # files are opened when read, so a failure here is DALI's, not the data's
                pipe = self._pipeline(files, codes[k:].reshape(-1).astype(np.int32).tolist())
            except Exception as exc:
                raise DataError(f"could not build the DALI pipeline: {exc}") from exc
            try:
                while k < steps:
                    img, code = pipe.run()
                    got = np.asarray(code.as_tensor()).reshape(-1)
                    if not np.array_equal(got, codes[k]):
                        raise PlanOrderError(f"DALI returned samples (2*index+flip) {got} for planned {codes[k]}")
                    yield {"images": self._to_torch(img), "labels": labels[k], "indices": plan[k],
                           "flipped": torch.from_numpy(flips[k].copy()), "skipped": 0}
                    k += 1
            except RuntimeError:                 # DALI reports read/decode errors as RuntimeError
                ds = PlanDataset(self.source, self.size, plan_np[k], self.seed if owner is None else owner.seed,
                                 epoch, flip)
                batch = collate([ds[j] for j in range(len(ds))])
                self.fallback_batches += 1
                if owner is not None:
                    owner.skipped += batch["skipped"]
                yield batch
                k += 1
            finally:
                del pipe
