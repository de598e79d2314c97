"""Shared benchmark plumbing.

Timing lives in benchmarks/timing.py (:func:`timing.measure`): on a GPU, CUDA events around CUDA-graph
replays with a 256 MB L2 flush before each; on CPU, pytest-benchmark's host timer. Every benchmark
records what it moves and computes (``bytes``, ``flops``) through :func:`record`; on a GPU the session
also measures a large device-to-device copy and a bf16 matmul once, with the same device clock
(:func:`calibration`), and the JSON gets each benchmark's achieved bandwidth and FLOP rate as fractions
of those, so results quote the hardware limits measured in the same run. The goal shapes live in
benchmarks/cases.py. ``benchmarks/gpu_suite.sh`` runs the whole thing on a lent GPU.
"""
from __future__ import annotations

import os
import platform
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402  (benchmarks/timing.py)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_CAL = {}


def calibration() -> dict:
    """Copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s) on this device, measured once
    with the benchmarks' own clock (on random data: zeros run faster)."""
    if _CAL:
        return _CAL
    dev = device()
    tiny = os.environ.get("RECTOK_BENCH_TINY", "0") not in ("", "0")
    n = (1 << 28) if dev.type == "cuda" else (1 << 16 if tiny else 1 << 24)   # 1 GiB / 64 MiB of fp32
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    sec = timing.device_seconds(lambda: dst.copy_(src))
    _CAL["copy_bytes_per_s"] = 2 * src.numel() * src.element_size() / sec
    del src, dst
    m = 8192 if dev.type == "cuda" else (128 if tiny else 1024)
    a = torch.randn(m, m, device=dev).to(torch.bfloat16)
    b = torch.randn(m, m, device=dev).to(torch.bfloat16)
    sec = timing.device_seconds(lambda: a @ b, reps=10)
    _CAL["bf16_matmul_flops_per_s"] = 2 * m ** 3 / sec
    _CAL["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    _CAL["timing"] = ("cuda-graph replay, L2 flushed, CUDA events" if dev.type == "cuda" else "host clock (CPU)")
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


@pytest.fixture(scope="session")
def bench_device():
    return device()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add the hardware figures, and per benchmark the fraction of copy bandwidth / matmul rate at p50."""
    cal = calibration()
    output_json["rectok_fast_calibration"] = dict(cal)
    output_json["rectok_fast_env"] = {"python": platform.python_version(),
                                      "RECTOK_FAST_IMPL": os.environ.get("RECTOK_FAST_IMPL", "auto")}
    if not torch.cuda.is_available():
        # CPU timings are for the CPU paths only: a host-clock "fraction of copy" there mostly measures
        # caches (earlier CPU results showed > 100 %), so no fractions are derived on CPU.
        return
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
