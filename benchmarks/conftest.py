"""Shared benchmark plumbing.

Every benchmark records what it moves and computes (``bytes``, ``flops``) in
``benchmark.extra_info`` through :func:`record`. On a GPU, the session also measures a large
device-to-device copy and a bf16 matmul once (:func:`calibration`), and each benchmark stores its
achieved bandwidth and FLOP rate as fractions of those, so results quote the hardware limit
measured in the same run. ``benchmarks/gpu_suite.sh`` collects the JSON into benchmarks/results/.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, dev, reps=20):
    import time
    fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


_CAL = {}


def calibration() -> dict:
    """Copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s) on this device, measured once."""
    if _CAL:
        return _CAL
    dev = device()
    n = (1 << 28) if dev.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    sec = _median_seconds(lambda: dst.copy_(src), dev)
    _CAL["copy_bytes_per_s"] = 2 * src.numel() * src.element_size() / sec
    m = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    sec = _median_seconds(lambda: a @ b, dev, reps=10)
    _CAL["bf16_matmul_flops_per_s"] = 2 * m ** 3 / sec
    _CAL["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    _CAL["torch"] = torch.__version__
    try:
        import triton
        _CAL["triton"] = triton.__version__
    except Exception:
        _CAL["triton"] = None
    return _CAL


def record(benchmark, *, bytes_moved: int | None = None, flops: float | None = None, **extra) -> None:
    """Store bytes/FLOPs of one call, and after the run the achieved fractions of the calibration."""
    cal = calibration()
    benchmark.extra_info.update({"device": cal["device"], "torch": cal["torch"], **extra})
    if bytes_moved is not None:
        benchmark.extra_info["bytes"] = int(bytes_moved)
        benchmark.extra_info["copy_bytes_per_s"] = cal["copy_bytes_per_s"]
    if flops is not None:
        benchmark.extra_info["flops"] = float(flops)
        benchmark.extra_info["bf16_matmul_flops_per_s"] = cal["bf16_matmul_flops_per_s"]


def sync_wrap(fn):
    """Make a timed call include its GPU work."""
    dev = device()
    if dev.type != "cuda":
        return fn

    def wrapped(*a, **k):
        out = fn(*a, **k)
        torch.cuda.synchronize()
        return out
    return wrapped


@pytest.fixture(scope="session")
def bench_device():
    return device()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add the hardware figures, and per benchmark the fraction of copy bandwidth / matmul rate at p50."""
    cal = calibration()
    output_json["rectok_fast_calibration"] = dict(cal)
    output_json["rectok_fast_env"] = {"python": platform.python_version(),
                                      "RECTOK_FAST_IMPL": os.environ.get("RECTOK_FAST_IMPL", "auto")}
    for b in output_json.get("benchmarks", []):
        stats, info = b.get("stats") or {}, b.get("extra_info") or {}
        med = stats.get("median")
        if not med:
            continue
        if "bytes" in info:
            info["achieved_bytes_per_s"] = info["bytes"] / med
            info["fraction_of_copy"] = info["achieved_bytes_per_s"] / cal["copy_bytes_per_s"]
        if "flops" in info:
            info["achieved_flops_per_s"] = info["flops"] / med
            info["fraction_of_bf16_matmul"] = info["achieved_flops_per_s"] / cal["bf16_matmul_flops_per_s"]
