"""Fused AdaLN extension vs the eager reference and torch.compile(reference).

    pytest benchmarks/test_bench_adaln.py [--benchmark-json out.json]

Ops: adaln_modulate (modulated RMSNorm) and gated_residual; modes: fwd, bwd (backward only, graph
retained), full (fwd + bwd). Shapes: on CPU 8x256x1152 fp32 (the C++ path); on CUDA 64x256x1152 with
per-sample modulation and 64x256x2048 with per-token modulation, bf16. The modulation is a chunk view
of one (B, [N,] 6D) adaLN output, as in the DiT. ``bytes`` is the op's minimal traffic (each input
read once, each output written once), the same figure for every implementation.
"""
from __future__ import annotations

import functools

import pytest
import torch

from conftest import record, sync_wrap  # benchmarks/conftest.py
from rectok_fast.ops import adaln_ext, reference

IMPLS = ("eager", "compiled", "fused")
MODES = ("fwd", "bwd", "full")


def _cases(dev: torch.device):
    if dev.type == "cuda":
        return [((64, 256, 1152), torch.bfloat16, "sample"), ((64, 256, 2048), torch.bfloat16, "token")]
    return [((8, 256, 1152), torch.float32, "sample")]


@functools.lru_cache(maxsize=None)
def _compiled(op: str):
    return torch.compile(getattr(reference, op), dynamic=False)


def _impl(op: str, impl: str):
    if impl == "eager":
        return getattr(reference, op)
    if impl == "compiled":
        return _compiled(op)
    return getattr(adaln_ext, op)


def _setup(op, shape, dtype, mod, dev):
    B, N, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(dev, dtype).requires_grad_(True)
    ada = torch.randn(B, N, 6 * D, generator=g) if mod == "token" else torch.randn(B, 6 * D, generator=g)
    ada = (0.5 * ada).to(dev, dtype).requires_grad_(True)
    shift, scale, gate = ada.chunk(6, dim=-1)[:3]
    dy = torch.randn(B, N, D, generator=g).to(dev, dtype)
    s = x.element_size()
    mod_elems = B * D * (N if mod == "token" else 1)
    if op == "adaln_modulate":
        w = (1 + 0.1 * torch.randn(D, generator=g)).to(dev).requires_grad_(True)
        args, leaves = (x, w, shift, scale), (x, w, ada)
        fwd = 2 * x.numel() * s + 2 * mod_elems * s + 4 * D + 4 * B * N
        bwd = 3 * x.numel() * s + 3 * mod_elems * s + 4 * B * N + 8 * D
    else:
        y = torch.randn(B, N, D, generator=g).to(dev, dtype).requires_grad_(True)
        args, leaves = (x, gate, y), (x, y, ada)
        fwd = 3 * x.numel() * s + mod_elems * s
        bwd = 3 * x.numel() * s + 2 * mod_elems * s  # read dout, y; write dy (dx = dout is free)
    return args, leaves, dy, {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual"])
@pytest.mark.parametrize("case", [0, 1], ids=["case0", "case1"])
def test_bench_adaln(benchmark, bench_device, op, impl, mode, case):
    cases = _cases(bench_device)
    if case >= len(cases):
        pytest.skip("no such shape on this device")
    if impl == "fused" and adaln_ext.load_error() is not None:
        pytest.skip(adaln_ext.load_error())
    if impl == "fused" and bench_device.type == "cuda" and not adaln_ext.has_cuda():
        pytest.skip("extension built without CUDA kernels")
    shape, dtype, mod = cases[case]
    fn = _impl(op, impl)
    args, leaves, dy, nbytes = _setup(op, shape, dtype, mod, bench_device)

    if mode == "fwd":
        run = lambda: fn(*args)  # noqa: E731
    elif mode == "bwd":
        out = fn(*args)
        run = lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True)  # noqa: E731
    else:
        run = lambda: torch.autograd.grad(fn(*args), leaves, dy)  # noqa: E731

    run = sync_wrap(run)
    run()  # compile / warm up outside the timed rounds
    benchmark.group = f"{op} {'x'.join(map(str, shape))} {str(dtype).split('.')[-1]} {mod} {mode}"
    record(benchmark, bytes_moved=nbytes[mode], op=op, impl=impl, mode=mode, shape=list(shape),
           dtype=str(dtype), modulation=mod)
    rounds = 30 if bench_device.type == "cuda" else 20
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
