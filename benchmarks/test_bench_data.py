"""Data throughput, in images/s (``extra_info['images_per_s']``):

* loaders: DALI (CPU pipeline here, "mixed" GPU decode on CUDA) vs the torch DataLoader + PIL path,
  on the same JPEG files (the bundled photos, listed repeatedly in a train.txt);
* the latent cache: build (decode once, encode both flips, stream to chunks) and read (epoch batches);
* listing + epoch planning of an ImageNet-sized (1.28M-line) train.txt (the files need not exist).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from conftest import record
from rectok_fast import data as D
from rectok_fast.data import sources as S

SIZE, BATCH, REPEAT = 128, 8, 8          # 10 photos x 8 = 80 images, 10 steps per epoch


@pytest.fixture(scope="module")
def jpeg_list(tmp_path_factory):
    root = D.write_demo_image_folder(str(tmp_path_factory.mktemp("demo_jpeg")))
    files = sorted(os.listdir(os.path.join(root, "photos")))
    lst = os.path.join(root, "train.txt")
    with open(lst, "w") as fh:
        fh.writelines(f"photos/{f} 0\n" for _ in range(REPEAT) for f in files)
    return lst


@pytest.mark.parametrize("loader, workers", [("torch", 0), ("torch", 2), ("dali", 0)])
def test_loader_images_per_s(benchmark, jpeg_list, loader, workers, bench_device):
    src = D.build_source(file_list=jpeg_list)
    ld = D.TrainLoader(src, SIZE, BATCH, seed=0, num_workers=workers, backend=loader, device=bench_device)
    n = ld.steps_per_epoch * BATCH

    def epoch():
        for b in ld.epoch(0):
            pass
    epoch()   # warm-up (pipeline build, worker start, page cache)
    benchmark.group = "data loader"
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    threads = ld._dali.threads if ld._dali is not None else None
    record(benchmark, loader=loader, workers=workers, dali_threads=threads, images=n, size=SIZE)
    benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.median


# ------------------------------------------------------------------------------------ latent cache
CACHE_IMAGES, CACHE_SIZE = 256, 32


@pytest.fixture(scope="module")
def cache_setup(tmp_path_factory):
    from PIL import Image

    from rectok_fast.demo_data import demo_images_uint8
    from rectok_fast.models.tokenizer import build_tokenizer
    root = tmp_path_factory.mktemp("cache_src")
    photos = demo_images_uint8()
    for i, img in enumerate(photos):
        Image.fromarray(img[:96, :80]).save(root / f"{i}.png")
    lst = root / "train.txt"
    lst.write_text("".join(f"{i % len(photos)}.png {i % 10}\n" for i in range(CACHE_IMAGES)))
    torch.manual_seed(0)
    tok = build_tokenizer("rectok_tiny", img_size=CACHE_SIZE, teachers={}, gamma=0.0, mask_ratio=0.0,
                          mask_ratio_type="fix").eval()
    return tok, D.build_source(file_list=str(lst)), root


def test_latent_cache_build_images_per_s(benchmark, cache_setup):
    from rectok_fast.training.latent_cache import prepare_latent_cache
    tok, src, root = cache_setup
    folder = str(root / "build")

    def build():
        shutil.rmtree(folder, ignore_errors=True)
        prepare_latent_cache(folder, tok, src, CACHE_SIZE, batch_size=32, dtype="bf16", num_workers=0,
                             progress=False, chunk_bytes=1 << 16)
    benchmark.group = "latent cache"
    benchmark.pedantic(build, rounds=3, iterations=1)
    record(benchmark, images=CACHE_IMAGES, size=CACHE_SIZE, tokenizer="rectok_tiny", what="build, both flips")
    benchmark.extra_info["images_per_s"] = CACHE_IMAGES / benchmark.stats.stats.median


READ_IMAGES, OFFICIAL_TOKENS, OFFICIAL_CH2 = 512, 256, 256     # official latents: 16x16 tokens, 2C = 256


@pytest.fixture(scope="module")
def official_shape_cache(tmp_path_factory):
    """A complete bf16 cache with the official row shape (random contents; 128 MiB on disk), written
    through the cache's own chunk writer."""
    import json

    from rectok_fast.training import latent_cache as L
    folder = str(tmp_path_factory.mktemp("official_cache"))
    manifest = {"format_version": L.FORMAT_VERSION, "tokenizer_sha256": "synthetic", "img_size": 256,
                "file_list_sha256": "synthetic", "dtype": "bf16", "count": READ_IMAGES, "tokens": OFFICIAL_TOKENS,
                "channels2": OFFICIAL_CH2, "chunk_size": 128}
    with open(os.path.join(folder, L.MANIFEST), "w") as fh:
        json.dump(manifest, fh)
    writer = L._ChunkWriter(folder, manifest)
    rng = np.random.default_rng(0)
    for a in range(0, READ_IMAGES, 64):
        rows = torch.randn(64, 2, OFFICIAL_TOKENS, OFFICIAL_CH2).to(torch.bfloat16).view(torch.int16).numpy()
        writer.write(np.arange(a, a + 64), rows, rng.integers(0, 1000, 64))
    with open(os.path.join(folder, L.MARKER), "w") as fh:
        json.dump({"skipped": 0}, fh)
    return L.LatentCache(folder)


@pytest.mark.parametrize("workers", [0, 2])
def test_latent_cache_read_images_per_s(benchmark, official_shape_cache, workers):
    """Random-order epoch batches of 64 (one flip each, 128 KiB per image) gathered from the chunks."""
    from rectok_fast.training.latent_cache import CacheLoader
    ld = CacheLoader(official_shape_cache, 64, 0, 1, seed=0, num_workers=workers)
    n = ld.steps_per_epoch * 64
    state = {"epoch": 0}

    def epoch():
        for b in ld.epoch(state["epoch"]):
            assert b["moments"].shape == (64, OFFICIAL_TOKENS, OFFICIAL_CH2)
        state["epoch"] += 1
    epoch()
    benchmark.group = "latent cache"
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    record(benchmark, bytes_moved=n * OFFICIAL_TOKENS * OFFICIAL_CH2 * 2, images=n, workers=workers,
           what="read, random order over chunks, official row shape, bf16")
    benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.median


# ------------------------------------------------------------------------------ ImageNet listing
IMAGENET_LINES, WORLD, GPU_BATCH = 1_281_167, 8, 32


@pytest.fixture(scope="module")
def imagenet_train_txt(tmp_path_factory):
    """An official-style train.txt: 1000 synset folders, 'n0xxxxxxx/n0xxxxxxx_k.JPEG label'."""
    path = tmp_path_factory.mktemp("imagenet") / "train.txt"
    per = np.bincount(np.arange(IMAGENET_LINES) % 1000, minlength=1000)
    with open(path, "w") as fh:
        for c in range(1000):
            syn = f"n{1440764 + 7919 * c:08d}"
            fh.write("".join(f"{syn}/{syn}_{k}.JPEG {c}\n" for k in range(per[c])))
    return str(path)


def test_listing_and_planning_1p28m(benchmark, imagenet_train_txt):
    """Parse the list (memo cleared each round) and plan one epoch for 8 ranks; rank 0's indices."""
    def plan():
        S._SOURCES.clear()
        src = D.build_source("/data/imagenet/train", imagenet_train_txt)
        return src, D.rank_plan(len(src), WORLD, GPU_BATCH, seed=0, epoch=3, rank=0)
    src, p = plan()
    assert len(src) == IMAGENET_LINES and src.num_classes == 1000 and p.shape == (IMAGENET_LINES // 256, 32)
    benchmark.group = "listing"
    benchmark.pedantic(plan, rounds=3, iterations=1)
    table = src.samples
    held = table.blob.nbytes + table.start.nbytes + table.end.nbytes + table.labels.nbytes
    record(benchmark, lines=IMAGENET_LINES, world=WORLD, batch=GPU_BATCH, listing_bytes=int(held))
    benchmark.extra_info["lines_per_s"] = IMAGENET_LINES / benchmark.stats.stats.median
