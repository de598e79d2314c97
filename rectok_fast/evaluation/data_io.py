"""Evaluation inputs and outputs: labelled image sets read in rank batches, PNGs written atomically,
JSON results, comparison grids."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import numpy as np
import torch

from rectok_fast.evaluation import dist as edist


class ImageSet(torch.utils.data.Dataset):
    """(global index, (3, size, size) uint8 ADM center crop, label) of ``samples`` [(path, label)]."""

    def __init__(self, samples: list, size: int):
        self.samples, self.size = samples, int(size)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from rectok_fast.data import adm_center_crop, load_rgb
        path, label = self.samples[i]
        crop = np.asarray(adm_center_crop(load_rgb(path), self.size), dtype=np.uint8)
        return i, torch.from_numpy(crop.copy()).permute(2, 0, 1), int(label)


def _collate(items):
    idx, imgs, labels = zip(*items)
    return torch.tensor(idx, dtype=torch.long), torch.stack(imgs), torch.tensor(labels, dtype=torch.long)


def load_samples(data_path=None, file_list=None, num_images: int | None = None) -> list:
    """[(path, label)] of an ImageFolder tree or an official ``train.txt``-style list, in its order."""
    from rectok_fast.data import DataError, build_source
    from rectok_fast.evaluation.fidelity import EvalError
    if not data_path and not file_list:
        raise EvalError("give the images: --data_path FOLDER (ImageFolder or a flat folder) or --file_list LIST")
    try:
        samples = build_source(data_path, file_list).samples
    except DataError as exc:
        raise EvalError(str(exc)) from exc
    if num_images is not None:
        if num_images < 1:
            raise EvalError(f"--num_images must be >= 1, got {num_images}")
        samples = samples[:num_images]
    return samples


def rank_loader(samples: list, size: int, batch_size: int, rank: int, world: int, workers: int = 0):
    """Batches (index, uint8 images, labels) of this rank: the global batches k = rank, rank + world, ..."""
    batches = [list(range(s, e)) for s, e in edist.rank_batches(len(samples), batch_size, rank, world)]
    return torch.utils.data.DataLoader(ImageSet(samples, size), batch_sampler=batches, num_workers=workers,
                                       collate_fn=_collate)


def save_png_atomic(image_u8_chw: torch.Tensor, path: str) -> None:
    """Write a PNG through a hidden temporary file + rename, so a killed run never leaves a truncated
    image that a resumed run would take as done (torch-fidelity ignores the ``.tmp`` name)."""
    from PIL import Image
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        Image.fromarray(image_u8_chw.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_grid(images_u8: torch.Tensor, path: str, cols: int, pad: int = 2) -> str:
    """(N, 3, H, W) uint8 -> one PNG grid with white padding."""
    from PIL import Image
    n, _, h, w = images_u8.shape
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    canvas = torch.full((3, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, y:y + h, x:x + w] = images_u8[i]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(path)
    return path


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(obj: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as fh:
        json.dump(_json_safe(obj), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def print_result(obj: dict) -> None:
    """The machine-readable result: ONE JSON object on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(_json_safe(obj), sort_keys=True), flush=True)


def log(msg: str) -> None:
    print(f"[rectok-eval] {msg}", file=sys.stderr, flush=True)
