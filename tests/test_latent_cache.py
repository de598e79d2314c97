"""Latent cache: same DiT inputs as the online path, world-independent chunks, stale caches refused,
interrupted builds resumed, peak memory independent of the dataset size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from rectok_fast import data as D
from rectok_fast.demo_data import demo_images_uint8
from rectok_fast.models.tokenizer import build_tokenizer
from rectok_fast.training import latent_cache as L

SIZE = 32


def tiny_tokenizer(seed=0, **over):
    torch.manual_seed(seed)
    kw = dict(img_size=SIZE, teachers={}, gamma=0.0, mask_ratio=0.0, mask_ratio_type="fix")
    kw.update(over)
    return build_tokenizer("rectok_tiny", **kw).eval()


def row_bytes(tok, dtype="fp32"):
    return 2 * tok.seq_h * tok.seq_w * 2 * tok.token_channels * (4 if dtype == "fp32" else 2)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes, 13 images of odd sizes (PNG), one of them large enough for ADM's BOX halving."""
    root = tmp_path_factory.mktemp("tree")
    photos = demo_images_uint8()
    rng = np.random.default_rng(1)
    n = 0
    for c, count in (("c0", 5), ("c1", 3), ("c2", 5)):
        os.makedirs(root / c)
        for k in range(count):
            img = photos[n % len(photos)]
            h, w = img.shape[:2]
            ch, cw = int(rng.integers(40, min(h, 160))), int(rng.integers(40, min(w, 160)))
            Image.fromarray(img[:ch, :cw]).save(root / c / f"{k}.png")
            n += 1
    return str(root)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _build(folder, tok, src, world=1, dtype="fp32", chunk_rows=4, **kw):
    """Build with ``world`` ranks as threads sharing a real barrier."""
    barrier = threading.Barrier(world)
    out, errors = [None] * world, []

    def rank(r):
        try:
            out[r] = L.prepare_latent_cache(folder, tok, src, SIZE, r, world, batch_size=3, device="cpu",
                                            dtype=dtype, seed=5, num_workers=0, progress=False,
                                            barrier=barrier.wait, chunk_bytes=chunk_rows * row_bytes(tok, dtype),
                                            **kw)
        except BaseException as exc:           # noqa: BLE001 - re-raised below
            errors.append(exc)
            barrier.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out[0]


def test_cache_gives_the_online_batches(tmp_path, tree, tok):
    """Two ranks (threads) build; chunks equal a one-rank build byte for byte; each rank's cached
    batches (moments for the planned indices and flips) equal the online encoder's on TrainLoader's
    batches, also when read through DataLoader workers."""
    src = D.build_source(tree)
    cache = _build(str(tmp_path / "w2"), tok, src, world=2)
    one = _build(str(tmp_path / "w1"), tok, src, world=1)
    assert len(cache) == 13 and cache.chunk_size == 4 and L.num_chunks(cache.manifest) == 4
    for c in range(4):
        a = open(L.chunk_path(cache.folder, c), "rb").read()
        assert a == open(L.chunk_path(one.folder, c), "rb").read()
    assert torch.equal(cache.labels, torch.from_numpy(src.labels))
    seen_flips = set()
    for r in range(2):
        online = D.TrainLoader(src, SIZE, 3, rank=r, world=2, seed=5, num_workers=0)
        cached = L.CacheLoader(cache, 3, r, 2, seed=5, num_workers=2 if r == 1 else 0)
        assert cached.steps_per_epoch == online.steps_per_epoch == 2
        for epoch in (0, 1):
            n = 0
            for a, b in zip(online.epoch(epoch), cached.epoch(epoch)):
                assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["flipped"], b["flipped"])
                assert torch.equal(a["labels"], b["labels"])
                with torch.no_grad():
                    want = tok.encode_moments(a["images"])
                assert b["moments"].dtype == torch.float32
                torch.testing.assert_close(b["moments"], want, atol=2e-5, rtol=1e-5)
                seen_flips.update(b["flipped"].tolist())
                n += 1
            assert n == 2
    assert seen_flips == {False, True}


def test_bf16_storage_and_resume(tmp_path, tree, tok):
    """bf16 rows are the fp32 moments rounded; a build interrupted after some chunks redoes only
    the missing ones."""
    src = D.build_source(tree)
    folder = str(tmp_path / "c")
    cache = _build(folder, tok, src, dtype="bf16")
    idx, flips = np.arange(13), np.arange(13) % 2 == 1
    m = cache.read(idx, flips)
    assert m.dtype == torch.bfloat16 and m.shape == (13, tok.seq_h * tok.seq_w, 2 * tok.token_channels)
    ref = _build(str(tmp_path / "f"), tok, src, dtype="fp32").read(idx, flips)
    assert torch.equal(m, ref.to(torch.bfloat16))
    before = {c: os.stat(L.chunk_path(folder, c)).st_mtime_ns for c in range(4)}
    os.unlink(L.chunk_path(folder, 2))
    os.unlink(os.path.join(folder, L.MARKER))
    with open(L.chunk_path(folder, 2) + ".tmp999", "wb") as fh:     # a half-written chunk of a crashed build
        fh.write(b"partial")
    again = _build(folder, tok, src, dtype="bf16")
    assert not os.path.exists(L.chunk_path(folder, 2) + ".tmp999")
    assert torch.equal(again.read(idx, flips), m)
    assert all(os.stat(L.chunk_path(folder, c)).st_mtime_ns == before[c] for c in (0, 1, 3))


def test_stale_manifest_is_refused_or_rebuilt(tmp_path, tree, tok):
    src = D.build_source(tree)
    folder = str(tmp_path / "c")
    _build(folder, tok, src)
    other = tiny_tokenizer(seed=1)
    with pytest.raises(L.LatentCacheMismatch, match="tokenizer_sha256"):
        _build(folder, other, src)
    with pytest.raises(L.LatentCacheMismatch, match="dtype"):
        _build(folder, tok, src, dtype="bf16")
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{p} {l}\n" for p, l in list(src.samples)[:-1]))
    fewer = D.build_source(file_list=str(lst))
    with pytest.raises(L.LatentCacheMismatch, match="file_list_sha256"):
        _build(folder, tok, fewer)
    with pytest.raises(L.LatentCacheMismatch, match="img_size"):
        L.prepare_latent_cache(folder, tiny_tokenizer(img_size=64), src, 64, progress=False, num_workers=0)
    # a stale cache opened directly with the expected manifest is refused too
    want = L.expected_manifest(other, src, SIZE, "fp32", seed=5)
    with pytest.raises(L.LatentCacheMismatch, match="tokenizer_sha256"):
        L.LatentCache(folder, expect=want)
    rebuilt = _build(folder, tok, fewer, rebuild=True)
    assert len(rebuilt) == 12 and json.load(open(os.path.join(folder, L.MANIFEST)))["count"] == 12
    assert L.num_chunks(rebuilt.manifest) == 3 and not os.path.exists(L.chunk_path(folder, 3))


RSS_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[4])
from rectok_fast import data as D
from rectok_fast.training import latent_cache as L
from test_latent_cache import tiny_tokenizer, row_bytes, SIZE
torch.set_num_threads(1)
n, folder, lst = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tok = tiny_tokenizer(token_channels=256)
src = D.build_source(file_list=lst)
assert len(src) == n
with open("/proc/self/clear_refs", "w") as fh:      # reset the peak (VmHWM): measure the build only
    fh.write("5")
L.prepare_latent_cache(folder, tok, src, SIZE, batch_size=25, dtype="fp32", num_workers=0, progress=False,
                       chunk_bytes=40 * row_bytes(tok, "fp32"))
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path, tree):
    """Building 2,000 vs 200 images (a train.txt that repeats the tree's files; fp32, 16 KiB rows):
    the caches differ by ~28 MiB, the builds' peak RSS (reset after the imports) by far less."""
    src = D.build_source(tree)
    peaks, sizes = {}, {}
    for n in (200, 2000):
        lst = tmp_path / f"train{n}.txt"
        lst.write_text("".join(f"{src.samples.path(i % len(src))} {int(src.labels[i % len(src)])}\n"
                               for i in range(n)))
        folder = tmp_path / f"cache{n}"
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(n), str(folder), str(lst),
                              os.path.dirname(__file__)], capture_output=True, text=True, timeout=300,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[n] = int(out.stdout.split()[-1])
        sizes[n] = sum(os.path.getsize(folder / f) for f in os.listdir(folder) if f.endswith(".npy"))
    grown = sizes[2000] - sizes[200]
    assert grown > 25 * 2 ** 20
    assert peaks[2000] - peaks[200] < grown / 4, (peaks, sizes)
