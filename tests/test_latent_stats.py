"""Latent statistics: a class-spread sample, one streaming fp64 pass, sharded over ranks and reduced,
online and from the latent cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rectok_fast import data as D
from rectok_fast.latent_stats import (MomentSums, latent_stats_from_cache, latent_stats_online,
                                      latent_stats_sample)
from rectok_fast.training import latent_cache as L
from test_latent_cache import SIZE, tiny_tokenizer, tree  # noqa: F401  (fixture)


def test_sample_covers_every_class_of_a_labelled_tree(tree):  # noqa: F811
    src = D.build_source(tree)
    labels = src.labels
    assert labels.tolist() == sorted(labels.tolist())      # a sorted listing: the first n see one class
    assert set(labels[:3].tolist()) == {0}
    idx = latent_stats_sample(labels, 3, seed=0)
    assert len(idx) == 3 and set(labels[idx].tolist()) == {0, 1, 2}
    assert np.array_equal(idx, latent_stats_sample(labels, 3, seed=0))
    assert latent_stats_sample(labels, 1, seed=0).size == 3                 # raised to one per class
    assert np.array_equal(latent_stats_sample(labels, None, 0), np.arange(len(labels)))


def test_sample_quotas_on_unequal_classes():
    rng = np.random.default_rng(0)
    counts = [1, 2, 50, 7, 300, 3, 40]
    labels = np.repeat(np.arange(7), counts)
    rng.shuffle(labels)
    for n in (7, 20, 61, 200, 402):
        idx = latent_stats_sample(labels, n, seed=3)
        assert idx.size == n and len(np.unique(idx)) == n and np.all(np.diff(idx) > 0)
        per = np.bincount(labels[idx], minlength=7)
        assert (per >= 1).all() and (per <= counts).all()
        # equal shares, capped by the class size (water-filling): uncapped classes differ by <= 1
        open_ = per < counts
        if open_.sum() > 1:
            assert per[open_].max() - per[open_].min() <= 1, (n, per)
    assert not np.array_equal(latent_stats_sample(labels, 61, 3), latent_stats_sample(labels, 61, 4))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(seed=2)


def _direct(tok, src, indices):
    """fp64 reference over the listed images, by hand."""
    imgs = torch.stack([D.to_tensor_pm1(D.preprocess_file(src.path(int(i)), SIZE)) for i in indices])
    with torch.no_grad():
        m = tok.encode_moments(imgs).double()[..., :tok.token_channels].reshape(-1, tok.token_channels)
    return m.mean(0), m.std(0, unbiased=False), m.shape[0]


def test_online_sharded_and_cached_stats_agree(tmp_path, tree, tok):  # noqa: F811
    src = D.build_source(tree)
    sample = latent_stats_sample(src.labels, 7, seed=1)
    mean, std, count = _direct(tok, src, sample)
    m1, s1, c1 = latent_stats_online(tok, src, SIZE, sample, batch_size=3, num_workers=0)
    assert c1 == count
    torch.testing.assert_close(m1.double(), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s1.double(), std, atol=1e-6, rtol=1e-5)
    # two ranks: each sums its share; the all-reduce (here: adding the two partial sums) gives the same
    parts = []
    for r in range(2):
        latent_stats_online(tok, src, SIZE, sample, rank=r, world=2, batch_size=2, num_workers=0,
                            all_reduce=lambda t: parts.append(t.clone()))
    total = MomentSums(tok.token_channels)
    total.sums = parts[0] + parts[1]
    assert parts[0][2, 0] > 0 and parts[1][2, 0] > 0
    m2, s2, c2 = total.result()
    assert c2 == count
    torch.testing.assert_close(m2, m1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s2, s1, atol=1e-6, rtol=1e-5)
    # from the cache (fp32): the sample, and the whole set, in one streaming pass over the chunks
    cache = L.prepare_latent_cache(str(tmp_path / "c"), tok, src, SIZE, batch_size=4, dtype="fp32",
                                   num_workers=0, progress=False, chunk_bytes=5 * 2 * 4 * 32 * 4)
    m3, s3, c3 = latent_stats_from_cache(cache, tok.token_channels, sample)
    assert c3 == count
    torch.testing.assert_close(m3, m1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s3, s1, atol=1e-5, rtol=1e-5)
    mean_all, std_all, _ = _direct(tok, src, range(len(src)))
    m4, s4 = cache.stats(tok.token_channels)
    torch.testing.assert_close(m4.double(), mean_all, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s4.double(), std_all, atol=1e-5, rtol=1e-5)
    parts = []
    for r in range(3):
        latent_stats_from_cache(cache, tok.token_channels, None, r, 3, all_reduce=lambda t: parts.append(t.clone()))
    total.sums = sum(parts)
    torch.testing.assert_close(total.result()[0], m4, atol=1e-6, rtol=1e-5)
