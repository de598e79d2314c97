"""Demo images that ship with an installed dependency (scikit-image's sample photos), so the demo
and the tests run offline with real pictures. Nothing is downloaded."""
from __future__ import annotations

import numpy as np
import torch

# Loaded from skimage/data inside the wheel; others (eagle, brain, ...) need a download and are left out.
# Training on the first seven alone, the demo tokenizer stopped improving on the held-out photos at ~19.3 dB
# and then overfitted; the motorcycle (the left view of ``stereo_motorcycle``) and the grey textures and
# objects after it give it more kinds of edges and surfaces to learn from (with random transpositions of the
# crops, rectok_fast.data.transforms.demo_sample: 19.23 -> 19.63 dB on the held-out crops).
DEMO_IMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                    "retina", "camera", "page", "stereo_motorcycle", "brick", "grass", "gravel", "coins",
                    "clock", "moon", "cell", "text")
#: photos the demo never trains on: its validation set (evaluation during training, the final grid)
HELDOUT_IMAGE_NAMES = ("coffee", "chelsea")
SPLITS = ("all", "train", "heldout")

# held-out crops: (side as a fraction of the short side, top, left as fractions of the free room);
# fixed positions, so every run and every rank evaluates the same pictures
HELDOUT_CROPS = ((1.0, 0.5, 0.5), (0.6, 0.0, 0.0), (0.6, 0.0, 1.0), (0.6, 1.0, 0.0), (0.6, 1.0, 1.0),
                 (0.4, 0.5, 0.5), (0.4, 0.2, 0.8), (0.4, 0.8, 0.2))


def demo_image_names(split: str = "all") -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return DEMO_IMAGE_NAMES
    held = split == "heldout"
    return tuple(n for n in DEMO_IMAGE_NAMES if (n in HELDOUT_IMAGE_NAMES) == held)


def demo_images_uint8(split: str = "all") -> list[np.ndarray]:
    """The bundled photos of ``split`` ('train': what the demo source crops from; 'heldout': never
    trained on) as HxWx3 uint8 arrays (grey ones are stacked to RGB)."""
    from skimage import data as skdata
    out = []
    for name in demo_image_names(split):
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        try:
            img = loader()
            # stereo_motorcycle returns (left, right, disparity): the left view is the photo
            img = np.asarray(img[0] if isinstance(img, tuple) else img)
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
    """(3, size, size) in [-1, 1]: the training preprocessing (official ADM center crop)."""
    from rectok_fast.data.transforms import preprocess_array
    return preprocess_array(img, size)


def demo_batch(size: int = 256, n: int | None = None) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: the bundled photos, center-cropped as in training."""
    imgs = demo_images_uint8()
    if n is not None:
        imgs = [imgs[i % len(imgs)] for i in range(n)]
    return torch.stack([center_crop_resize(im, size) for im in imgs])


def heldout_crops(size: int = 64, n: int | None = None) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: fixed crops of the held-out photos (:data:`HELDOUT_CROPS` of each,
    photo by photo), through the training preprocessing. ``n`` caps the count."""
    crops = []
    for img in demo_images_uint8("heldout"):
        h, w = img.shape[:2]
        for frac, top, left in HELDOUT_CROPS:
            side = int(min(h, w) * frac)
            y, x = int(round((h - side) * top)), int(round((w - side) * left))
            crops.append(center_crop_resize(np.ascontiguousarray(img[y:y + side, x:x + side]), size))
    if n is not None:
        crops = crops[:n]
    return torch.stack(crops)


def write_demo_image_folder(root: str | None = None, size: int | None = None, quality: int = 95) -> str:
    """Write the bundled photos as JPEGs into an ImageFolder tree (one class); returns the root."""
    import os
    import tempfile

    from PIL import Image
    root = root or tempfile.mkdtemp(prefix="rectok_demo_")
    os.makedirs(os.path.join(root, "photos"), exist_ok=True)
    for i, img in enumerate(demo_images_uint8()):
        pil = Image.fromarray(img)
        if size:
            pil = pil.resize((size, size), Image.BICUBIC)
        pil.save(os.path.join(root, "photos", f"{i:03d}.jpg"), quality=quality)
    return root
