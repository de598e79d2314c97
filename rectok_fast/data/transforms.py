"""The one preprocessing path, shared by training, the latent cache, latent statistics and the demo.

Official (ADM): halve with BOX while the short side is >= 2*size, BICUBIC resize of the short side to
``size``, center crop, random horizontal flip p = 0.5, scale to [-1, 1]. Per-sample randomness (flip,
demo crops) is a pure function of ``(seed, epoch, index)``, so it is the same whichever rank, worker
or loader handles the sample, and across resumes.
"""
from __future__ import annotations

import threading

import numpy as np
import torch


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


def adm_geometry(w: int, h: int, size: int):
    """(resize_w, resize_h, crop_left, crop_top) that :func:`adm_center_crop` ends up with for a
    w x h image (its BOX halvings and rounding); the DALI pipeline computes the same in its graph."""
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
    scale = size / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    return rw, rh, (rw - size) // 2, (rh - size) // 2


def to_tensor_pm1(arr) -> torch.Tensor:
    """HxWx3 uint8 (array or PIL image) -> (3, H, W) float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


def load_rgb(path: str):
    from PIL import Image
    with open(path, "rb") as fh:
        img = Image.open(fh)
        img.load()
    return img.convert("RGB")


def preprocess_file(path: str, size: int):
    """The official center crop of an image file (PIL, RGB)."""
    return adm_center_crop(load_rgb(path), size)


def preprocess_array(img: np.ndarray, size: int) -> torch.Tensor:
    """An HxWx3 uint8 array through the official center crop -> (3, size, size) in [-1, 1]."""
    from PIL import Image
    return to_tensor_pm1(adm_center_crop(Image.fromarray(img), size))


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x5EC7])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_flips(seed: int, epoch: int, indices, mode: str = "random") -> np.ndarray:
    """Horizontal-flip decisions (bool array) of the given dataset indices: a counter-based hash of
    (seed, epoch, index), vectorised, so no per-sample Python runs in a training step."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if mode == "none":
        return np.zeros(idx.shape, dtype=bool)
    if mode == "always":
        return np.ones(idx.shape, dtype=bool)
    if mode != "random":
        raise ValueError(f"unknown flip mode {mode!r}")
    key = _mix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ np.uint64(0x5EC7F11B))
    key = _mix64(key + np.array([int(epoch) & 0xFFFFFFFF], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    h = _mix64(key ^ (idx.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)))
    return (h >> np.uint64(63)).astype(bool)


def sample_flip(seed: int, epoch: int, index: int, mode: str = "random") -> bool:
    """The horizontal-flip decision of one sample: a pure function of (seed, epoch, index)."""
    return bool(sample_flips(seed, epoch, [index], mode)[0])


_DEMO_CACHE: list = []
_DEMO_LOCK = threading.Lock()


def _demo_photos():
    with _DEMO_LOCK:
        if not _DEMO_CACHE:
            from rectok_fast.demo_data import demo_images_uint8
            _DEMO_CACHE.extend(demo_images_uint8("train"))  # the held-out photos are the demo's validation set
    return _DEMO_CACHE


def demo_sample(index: int, size: int, seed: int, epoch: int):
    """A random square crop (40-100% of the short side) of bundled photo ``index % n``, transposed with
    probability 1/2, through the official center crop to ``size`` (a PIL image). With the loader's random
    horizontal flip that gives four orientations of every crop: the demo has few photos to learn from."""
    from PIL import Image
    photos = _demo_photos()
    img = photos[index % len(photos)]
    rng = _sample_rng(seed, epoch, index + 1_000_003)
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = img[top:top + side, left:left + side]
    if rng.uniform() < 0.5:
        crop = np.ascontiguousarray(crop.transpose(1, 0, 2))
    return adm_center_crop(Image.fromarray(crop), size)
