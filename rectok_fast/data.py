"""Training data for rectok_fast: sources, the official preprocessing, and two loaders.

Sources (:func:`build_source`)
    * an ImageFolder tree (``root/<class>/<image>``; labels = index of the sorted class folder),
    * the official ``train.txt`` ("relative/or/absolute/path label" per line, resolved against a root),
    * the demo source: scikit-image's bundled photos with random square crops (no data argument).

Preprocessing (official, ADM): halve with BOX while the short side is >= 2*size, BICUBIC resize of
the short side to ``size``, center crop, random horizontal flip p = 0.5, scale to [-1, 1].

Order and sharding (:func:`epoch_plan`)
    One permutation per epoch from ``seed + epoch``; the global batch ``k`` of an epoch is the
    slice ``[k*B*W, (k+1)*B*W)`` and rank ``r`` takes every W-th element of it starting at ``r``
    (the DistributedSampler interleave), so every rank takes the same number of steps with the same
    shapes. The tail is dropped (``drop_last``, official) or padded by wrapping around. Sharding
    uses the GLOBAL rank. Resuming inside an epoch skips the consumed batches by index arithmetic.

Per-sample randomness (flip, demo crops) comes from ``(seed, epoch, index)`` alone, so it is the
same whichever rank, worker or loader handles the sample and across resumes.

Loaders
    * ``torch``: a DataLoader over PIL decoding (CPU workers);
    * ``dali``: NVIDIA DALI decodes/resizes/crops/flips/normalizes ("mixed" nvJPEG decode on a
      GPU when CUDA is available, its CPU pipeline otherwise). File bytes and flip flags are fed
      from the same plan as the torch loader. DALI's resize approximates ADM's BOX halving +
      BICUBIC with one antialiased cubic resize (differences are at the level of resampling noise).

Corrupt or unreadable images never crash training: the torch loader substitutes the next readable
sample of the dataset (fixed batch shapes on every rank) and the DALI loader decodes such a batch
with the torch path; both count what they skipped and the trainer warns at the end.
"""
from __future__ import annotations

import io
import math
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jfif")
DEMO_VIRTUAL_SIZE = 64          # samples per epoch of the demo source (random crops of the bundled photos)
MAX_SUBSTITUTIONS = 64          # consecutive unreadable files before the loader gives up with an error


class DataError(RuntimeError):
    """Bad data arguments (missing folder, empty list, malformed train.txt line)."""


# ----------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A list of (path, label) samples, or the demo photos when ``demo`` is set."""
    kind: str                       # 'folder' | 'list' | 'demo'
    samples: list                   # [(path, label)] (empty for demo)
    num_classes: int
    description: str

    def __len__(self):
        return DEMO_VIRTUAL_SIZE if self.kind == "demo" else len(self.samples)


def list_image_folder(root: str) -> tuple[list, list]:
    """(samples, classes) of an ImageFolder tree; images directly under ``root`` get label 0."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    samples = []
    if classes:
        for label, c in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        samples.append((os.path.join(dirpath, f), label))
    else:
        classes = [""]
        samples = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root)) if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}")
    return samples, classes


def read_file_list(list_path: str, root: str | None = None) -> list:
    """The official ``train.txt``: one "path label" per line; relative paths resolve against ``root``
    (default: the list's folder). The path may contain spaces (the label is the last field)."""
    if not os.path.isfile(list_path):
        raise DataError(f"file list {list_path!r} does not exist")
    root = root if root is not None else os.path.dirname(os.path.abspath(list_path))
    samples = []
    with open(list_path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{list_path}:{n}: expected 'path label', got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{list_path}:{n}: label {parts[1]!r} is not an integer") from None
            path = parts[0] if os.path.isabs(parts[0]) else os.path.join(root, parts[0])
            samples.append((path, label))
    if not samples:
        raise DataError(f"file list {list_path!r} has no samples")
    return samples


def build_source(data_path: str | None = None, file_list: str | None = None) -> Source:
    """ImageFolder (``data_path``), official list (``file_list`` [+ ``data_path`` as its root]), or demo."""
    if file_list:
        samples = read_file_list(file_list, data_path)
        ncls = max(l for _, l in samples) + 1
        return Source("list", samples, ncls, f"file list {file_list} ({len(samples)} images, {ncls} classes)")
    if data_path:
        samples, classes = list_image_folder(data_path)
        return Source("folder", samples, len(classes),
                      f"ImageFolder {data_path} ({len(samples)} images, {len(classes)} classes)")
    return Source("demo", [], 1, f"demo: scikit-image sample photos, random crops ({DEMO_VIRTUAL_SIZE} per epoch)")


# ----------------------------------------------------------------------------------- preprocessing
def adm_center_crop(pil_image, size: int):
    """ADM / official center crop: BOX-halve while the short side >= 2*size, BICUBIC short side to
    ``size``, center crop ``size`` x ``size``. Returns an RGB PIL image."""
    from PIL import Image
    img = pil_image
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor_pm1(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (3, H, W) float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x5EC7])


def sample_flip(seed: int, epoch: int, index: int, mode: str = "random") -> bool:
    """The horizontal-flip decision of one sample: a pure function of (seed, epoch, index)."""
    if mode == "none":
        return False
    if mode == "always":
        return True
    return bool(_sample_rng(seed, epoch, index).random() < 0.5)


def load_rgb(path: str):
    from PIL import Image
    with open(path, "rb") as fh:
        img = Image.open(fh)
        img.load()
    return img.convert("RGB")


_DEMO_CACHE: list = []
_DEMO_LOCK = threading.Lock()


def _demo_photos():
    with _DEMO_LOCK:
        if not _DEMO_CACHE:
            from rectok_fast.demo_data import demo_images_uint8
            _DEMO_CACHE.extend(demo_images_uint8())
    return _DEMO_CACHE


def demo_sample(index: int, size: int, seed: int, epoch: int):
    """A random square crop (40-100% of the short side) of bundled photo ``index % n``, resized to ``size``."""
    from PIL import Image
    photos = _demo_photos()
    img = photos[index % len(photos)]
    rng = _sample_rng(seed, epoch, index + 1_000_003)
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(img[top:top + side, left:left + side])
    return crop.resize((size, size), resample=Image.BICUBIC)


# ------------------------------------------------------------------------------------------ order
def epoch_plan(n: int, world: int, batch: int, seed: int, epoch: int, shuffle: bool = True,
               drop_last: bool = True) -> torch.Tensor:
    """Indices (steps, world, batch) of one epoch. Rank r's k-th batch is plan[k, r]."""
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


def steps_per_epoch(n: int, world: int, batch: int, drop_last: bool = True) -> int:
    g = world * batch
    return n // g if drop_last else math.ceil(n / g)


# --------------------------------------------------------------------------------------- datasets
class PlanDataset(torch.utils.data.Dataset):
    """Maps a flat list of dataset indices (one epoch, one rank) to preprocessed samples.

    Returns (image (3,H,W) in [-1,1], label, index, flipped, n_skipped). An unreadable image is
    replaced by the next readable one (index + 1, + 2, ...) and counted in ``n_skipped``.
    """

    def __init__(self, source: Source, size: int, indices, seed: int, epoch: int, flip: str = "random"):
        self.source, self.size, self.indices = source, size, list(map(int, indices))
        self.seed, self.epoch, self.flip = seed, epoch, flip

    def __len__(self):
        return len(self.indices)

    def load(self, index: int):
        """(PIL image after ADM crop / demo crop, label, actual index, n_skipped)."""
        src = self.source
        if src.kind == "demo":
            return demo_sample(index, self.size, self.seed, self.epoch), 0, index, 0
        n = len(src.samples)
        for k in range(MAX_SUBSTITUTIONS):
            i = (index + k) % n
            path, label = src.samples[i]
            try:
                return adm_center_crop(load_rgb(path), self.size), label, i, k
            except Exception as exc:  # corrupt, truncated, missing, unsupported: skip it
                if os.environ.get("RECTOK_FAST_DATA_VERBOSE"):
                    warnings.warn(f"skipping unreadable image {path}: {exc!r}")
        raise DataError(f"{MAX_SUBSTITUTIONS} consecutive unreadable images starting at {src.samples[index][0]!r}")

    def __getitem__(self, j):
        from PIL import Image
        img, label, index, skipped = self.load(self.indices[j])
        flipped = sample_flip(self.seed, self.epoch, self.indices[j], self.flip)
        if flipped:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor_pm1(np.asarray(img, dtype=np.uint8)), label, self.indices[j], flipped, skipped


def _collate(items):
    imgs, labels, idx, flips, skipped = zip(*items)
    return {"images": torch.stack(imgs), "labels": torch.tensor(labels, dtype=torch.long),
            "indices": torch.tensor(idx, dtype=torch.long), "flipped": torch.tensor(flips, dtype=torch.bool),
            "skipped": int(sum(skipped))}


# ---------------------------------------------------------------------------------------- loaders
class TrainLoader:
    """Per-rank batches of one epoch, for any source, with the torch or DALI backend.

    ``for batch in loader.epoch(e, start_step=k)`` yields dicts with ``images`` (B,3,S,S) float32
    in [-1,1] (pinned, on CPU), ``labels``, ``indices`` (dataset indices), ``flipped``, ``skipped``.
    ``loader.skipped`` counts the unreadable images met so far (this rank).
    """

    def __init__(self, source: Source, size: int, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True, flip: str = "random",
                 backend: str = "torch", num_workers: int = 2, device: str | torch.device = "cpu",
                 dali_threads: int = 2):
        if backend not in ("torch", "dali"):
            raise DataError(f"unknown loader {backend!r}; choose 'torch' or 'dali'")
        if flip not in ("random", "none", "always"):
            raise DataError(f"unknown flip mode {flip!r}")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} outside world size {world}")
        self.source, self.size, self.batch_size = source, int(size), int(batch_size)
        self.rank, self.world, self.seed = rank, world, int(seed)
        self.shuffle, self.drop_last, self.flip = shuffle, drop_last, flip
        self.backend, self.num_workers, self.device = backend, int(num_workers), torch.device(device)
        self.skipped = 0
        self.steps_per_epoch = steps_per_epoch(len(source), world, batch_size, drop_last)
        if self.steps_per_epoch == 0:
            raise DataError(f"the dataset has {len(source)} samples, fewer than one global batch "
                            f"({world} ranks x {batch_size}); lower --batch_size or pass --no_drop_last")
        self._dali = None
        if backend == "dali":
            self._dali = DaliDecoder(self.size, self.batch_size, self.device, dali_threads, seed)

    def plan(self, epoch: int) -> torch.Tensor:
        return epoch_plan(len(self.source), self.world, self.batch_size, self.seed, epoch, self.shuffle, self.drop_last)

    def epoch(self, epoch: int, start_step: int = 0):
        plan = self.plan(epoch)[start_step:, self.rank]          # (steps_left, batch)
        if plan.shape[0] == 0:
            return
        if self.backend == "dali":
            yield from self._dali_epoch(plan, epoch)
            return
        ds = PlanDataset(self.source, self.size, plan.reshape(-1).tolist(), self.seed, epoch, self.flip)
        dl = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, shuffle=False, drop_last=False, collate_fn=_collate,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False, prefetch_factor=4 if self.num_workers > 0 else None)
        for batch in dl:
            self.skipped += batch["skipped"]
            yield batch

    def _dali_epoch(self, plan, epoch):
        if self.source.kind == "demo":
            raise DataError("the DALI loader reads files; use --loader torch for the demo source "
                            "(or write the demo photos to a folder with rectok_fast.data.write_demo_image_folder)")
        ds = PlanDataset(self.source, self.size, [], self.seed, epoch, self.flip)
        # read file bytes one batch ahead on a thread (I/O overlaps DALI's decode)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(self._read_batch, plan[0].tolist())
            for k in range(plan.shape[0]):
                idx = plan[k].tolist()
                bufs, sizes, bad = fut.result()
                if k + 1 < plan.shape[0]:
                    fut = pool.submit(self._read_batch, plan[k + 1].tolist())
                flips = [sample_flip(self.seed, epoch, i, self.flip) for i in idx]
                labels = [self.source.samples[i][1] for i in idx]
                images = None
                if not bad:
                    images = self._dali.run(bufs, flips, sizes)
                if images is None:                    # a file DALI cannot decode: this batch via PIL
                    ds.indices = idx
                    batch = _collate([ds[j] for j in range(len(idx))])
                    self.skipped += batch["skipped"]
                    yield batch
                    continue
                yield {"images": images, "labels": torch.tensor(labels, dtype=torch.long),
                       "indices": torch.tensor(idx, dtype=torch.long), "flipped": torch.tensor(flips),
                       "skipped": 0}

    def _read_batch(self, idx):
        bufs, sizes, bad = [], [], False
        for i in idx:
            path = self.source.samples[i][0]
            try:
                with open(path, "rb") as fh:
                    raw = fh.read()
            except OSError:
                raw = b""
            size = _header_size(raw)
            bad = bad or size is None
            bufs.append(np.frombuffer(raw, dtype=np.uint8) if raw else np.zeros(1, np.uint8))
            sizes.append(size or (1, 1))
        return bufs, sizes, bad


def _header_size(raw: bytes):
    """(w, h) from the image header (PIL reads no pixels), or None when it is not an image."""
    if len(raw) < 16:
        return None
    from PIL import Image
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.size
    except Exception:
        return None


def adm_geometry(w: int, h: int, size: int):
    """(resize_w, resize_h, crop_left, crop_top) that :func:`adm_center_crop` ends up with for a
    w x h image (its BOX halvings and rounding), so DALI can reproduce the exact crop window."""
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
    scale = size / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    return rw, rh, (rw - size) // 2, (rh - size) // 2


class DaliDecoder:
    """A DALI pipeline fed with encoded bytes + flip flags: decode ("mixed" on GPU, CPU otherwise),
    antialiased cubic resize of the short side, center crop, mirror, normalize to [-1, 1], CHW."""

    def __init__(self, size: int, batch_size: int, device: torch.device, threads: int = 2, seed: int = 0):
        try:
            import nvidia.dali  # noqa: F401
        except Exception as exc:
            raise DataError(f"--loader dali needs NVIDIA DALI (pip install nvidia-dali-cuda130): {exc!r}") from None
        self.size, self.batch_size, self.threads, self.seed = size, batch_size, threads, seed
        self.gpu = device.type == "cuda" and torch.cuda.is_available()
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if self.gpu else None
        self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types
        size, gpu = self.size, self.gpu

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id,
                      seed=self.seed, exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        def pipe():
            enc = fn.external_source(name="encoded", dtype=types.UINT8)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            rx = fn.external_source(name="resize_x", dtype=types.FLOAT)
            ry = fn.external_source(name="resize_y", dtype=types.FLOAT)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
            # EXIF orientation is ignored, as PIL's Image.open (the official loader) ignores it
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False)
            # the exact ADM output geometry (computed from the header size), one antialiased cubic resize
            img = fn.resize(img, resize_x=rx, resize_y=ry, interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.slice(img, anchor, np.array([size, size], np.float32), axis_names="WH",
                           normalized_anchor=False, normalized_shape=False)
            # named (argument) inputs must stay on the CPU, also for GPU operators
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                            std=[127.5] * 3, mirror=flip)
        self.pipe = pipe()
        self.pipe.build()

    def run(self, bufs, flips, sizes):
        """(B,3,S,S) float32 tensor, or None when DALI failed on this batch (the pipeline is rebuilt).
        ``sizes``: the (w, h) of each encoded image (from its header)."""
        if len(bufs) != self.batch_size:
            raise ValueError(f"DALI pipeline expects {self.batch_size} samples, got {len(bufs)}")
        geo = [adm_geometry(w, h, self.size) for w, h in sizes]
        try:
            self.pipe.feed_input("encoded", bufs)
            self.pipe.feed_input("flip", [np.array(int(f), dtype=np.int32) for f in flips])
            self.pipe.feed_input("resize_x", [np.array(g[0], np.float32) for g in geo])
            self.pipe.feed_input("resize_y", [np.array(g[1], np.float32) for g in geo])
            self.pipe.feed_input("anchor", [np.array(g[2:], np.float32) for g in geo])
            (out,) = self.pipe.run()
        except Exception:
            self._build()
            return None
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray
            t = torch.empty((self.batch_size, 3, self.size, self.size), dtype=torch.float32,
                            device=torch.device("cuda", self.device_id))
            feed_ndarray(out.as_tensor(), t, cuda_stream=torch.cuda.current_stream())
            return t
        return torch.from_numpy(out.as_array())


def write_demo_image_folder(root: str | None = None, size: int | None = None, quality: int = 95) -> str:
    """Write the bundled photos as JPEGs into an ImageFolder tree (one class); returns the root."""
    from PIL import Image

    from rectok_fast.demo_data import demo_images_uint8
    root = root or tempfile.mkdtemp(prefix="rectok_demo_")
    os.makedirs(os.path.join(root, "photos"), exist_ok=True)
    for i, img in enumerate(demo_images_uint8()):
        pil = Image.fromarray(img)
        if size:
            pil = pil.resize((size, size), Image.BICUBIC)
        pil.save(os.path.join(root, "photos", f"{i:03d}.jpg"), quality=quality)
    return root


def build_loader(args, rank: int, world: int, device, flip: str = "random", shuffle: bool = True,
                 drop_last: bool | None = None) -> TrainLoader:
    """The trainer's loader from parsed arguments (data_path, file_list, img_size, batch_size, ...)."""
    source = build_source(getattr(args, "data_path", None), getattr(args, "file_list", None))
    return TrainLoader(source, args.img_size, args.batch_size, rank, world, seed=args.seed, shuffle=shuffle,
                       drop_last=(not getattr(args, "no_drop_last", False)) if drop_last is None else drop_last,
                       flip=flip, backend=args.loader, num_workers=args.num_workers, device=device)
