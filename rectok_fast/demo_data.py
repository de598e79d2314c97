"""Demo images that ship with an installed dependency (scikit-image's sample photos), so the demo
and the tests run offline with real pictures. Nothing is downloaded."""
from __future__ import annotations

import numpy as np
import torch

# Loaded from skimage/data inside the wheel; others (eagle, brain, ...) need a download and are left out.
DEMO_IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                    "motorcycle_left", "retina", "camera", "page")


def demo_images_uint8() -> list[np.ndarray]:
    """The bundled photos as HxWx3 uint8 arrays (grey ones are stacked to RGB)."""
    from skimage import data as skdata
    out = []
    for name in DEMO_IMAGE_NAMES:
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            img = np.asarray(loader())
        except Exception:  # a sample that needs a download (pooch) on this skimage version
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        if img.shape[-1] == 4:
            img = img[..., :3]
        if img.dtype != np.uint8:
            img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.dtype.kind == "f" else img.astype(np.uint8)
        out.append(img)
    if not out:
        raise RuntimeError("no scikit-image sample photos could be loaded; is scikit-image installed?")
    return out


def center_crop_resize(img: np.ndarray, size: int) -> torch.Tensor:
    """Short side to ``size`` (bicubic), center crop, -> (3, size, size) float in [-1, 1]."""
    from PIL import Image
    pil = Image.fromarray(img)
    w, h = pil.size
    s = size / min(w, h)
    pil = pil.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = pil.size
    left, top = (w - size) // 2, (h - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def demo_batch(size: int = 256, n: int | None = None) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: the bundled photos, center-cropped."""
    imgs = demo_images_uint8()
    if n is not None:
        imgs = [imgs[i % len(imgs)] for i in range(n)]
    return torch.stack([center_crop_resize(im, size) for im in imgs])
