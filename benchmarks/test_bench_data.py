"""Data loading throughput: DALI (CPU pipeline here, "mixed" GPU decode on CUDA) vs the torch
DataLoader + PIL path, on the bundled demo photos written to a temporary ImageFolder (JPEG)."""
from __future__ import annotations

import pytest

from conftest import record
from rectok_fast import data as D

SIZE, BATCH = 128, 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return D.write_demo_image_folder(str(tmp_path_factory.mktemp("demo_jpeg")))


@pytest.mark.parametrize("loader, workers", [("torch", 0), ("torch", 2), ("dali", 0)])
def test_loader_images_per_s(benchmark, folder, loader, workers, bench_device):
    src = D.build_source(folder)
    ld = D.TrainLoader(src, SIZE, BATCH, seed=0, num_workers=workers, backend=loader, device=bench_device)
    n = ld.steps_per_epoch * BATCH

    def epoch():
        for b in ld.epoch(0):
            pass
    epoch()   # warm-up (pipeline build, worker start, page cache)
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    record(benchmark, loader=loader, workers=workers, images=n, size=SIZE)
    benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.median
