"""AdaLN ops (C++/CUDA extension, csrc/) vs the eager reference and torch.compile(reference).

    pytest benchmarks/test_bench_adaln.py --benchmark-only

Ops: adaln_modulate (modulated RMSNorm) and gated_residual; modes: fwd, bwd (the forward runs once,
untimed; the backward replays with the graph retained), full. The modulation is a chunk view of one
(B, [N,] 6D) adaLN output, as in the DiT; every mode differentiates the op's own inputs (x, weight and
the chunk views), so the times are the op's. Assembling the (B, [N,] 6D) gradient of the adaLN output
from the chunk gradients is the same work for every implementation and is timed on its own
(``test_bench_chunk_grad``), not counted in the op.

Shapes (benchmarks/cases.py): CUDA, the goal shapes in bf16 -- B = 64, 256 tokens, D = 1152 per sample
(DiT-XL blocks), D = 1152 per token (P3), D = 2048 per sample (the DiT^DH head). CPU: the C++ path in
fp32 at B = 8 (D = 1152 per sample and per token). ``bytes`` is the op's minimal traffic (each input
read once, each output written once), the same for every implementation.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

import cases
from conftest import record
from rectok_fast.ops import adaln_ext, reference, registry
from timing import measure

CUDA = torch.cuda.is_available()
IMPLS = ("eager", "compiled", "fused")
MODES = ("fwd", "bwd", "full")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH = None if (CUDA or cases.TINY) else 8
SHAPES = list(cases.ADALN_SHAPES) if CUDA else ["D1152_sample", "D1152_token"]
ROUNDS = 30 if CUDA else (2 if cases.TINY else 15)


@functools.lru_cache(maxsize=None)
def _impl(op: str, impl: str):
    if impl == "eager":
        return getattr(reference, op)
    if impl == "compiled":
        return torch.compile(getattr(reference, op), dynamic=False)
    return registry.resolve(registry.spec(op).fused)


def _require_fused(dev):
    err = adaln_ext.load_error()
    if err is None and dev.type == "cuda" and not adaln_ext.has_cuda():
        err = "the extension was built without its CUDA kernels"
    if err is not None:
        if os.environ.get("RECTOK_REQUIRE_EXT", "0") not in ("", "0"):
            pytest.fail(f"RECTOK_REQUIRE_EXT=1 but the fused AdaLN path is unavailable: {err}")
        pytest.skip(err)


def _skip_cpu_compile(impl, shape):
    # torch.compile on CPU costs ~15 s per graph: compile one shape (tiny dry run: none beyond the kernels').
    if impl == "compiled" and not CUDA and (cases.TINY or shape != SHAPES[0]):
        pytest.skip("torch.compile on CPU only for the first shape")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bench_adaln(benchmark, bench_device, shape, op, impl, mode):
    if impl == "fused":
        _require_fused(bench_device)
    _skip_cpu_compile(impl, shape)
    D, mod = cases.ADALN_SHAPES[shape]
    c = cases.adaln(op, D, mod, bench_device, DTYPE, batch=BATCH)
    fn = _impl(op, impl)
    if mode == "fwd":
        run = lambda: fn(*c.args)  # noqa: E731
    elif mode == "bwd":
        out = fn(*c.args)
        run = lambda: torch.autograd.grad(out, c.op_grad_inputs, c.dy, retain_graph=True)  # noqa: E731
    else:
        run = lambda: torch.autograd.grad(fn(*c.args), c.op_grad_inputs, c.dy)  # noqa: E731
    x = c.args[0]
    benchmark.group = f"{op} {'x'.join(map(str, x.shape))} {str(DTYPE).split('.')[-1]} {mod} {mode}"
    record(benchmark, bytes_moved=c.bytes[mode], op=op, impl=impl, mode=mode, shape=list(x.shape),
           dtype=str(DTYPE), modulation=mod, case=shape)
    measure(benchmark, run, rounds=ROUNDS, warmup=2)


@pytest.mark.parametrize("op", ["adaln_modulate", "gated_residual"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bench_chunk_grad(benchmark, bench_device, shape, op):
    """The (B, [N,] 6D) gradient of the adaLN output from the chunk gradients (reported apart from the op)."""
    D, mod = cases.ADALN_SHAPES[shape]
    c = cases.adaln(op, D, mod, bench_device, DTYPE, batch=BATCH)
    g = torch.Generator(device=bench_device).manual_seed(1)
    grads = [torch.randn(ch.shape, generator=g, device=bench_device).to(DTYPE) for ch in c.chunks]
    run = lambda: torch.autograd.grad(c.chunks, c.ada, grads, retain_graph=True)  # noqa: E731
    benchmark.group = f"chunk gradient {op} {'x'.join(map(str, c.ada.shape))} {mod}"
    record(benchmark, bytes_moved=c.chunk_grad_bytes, op=op, impl="torch", mode="chunk_grad",
           shape=list(c.ada.shape), dtype=str(DTYPE), modulation=mod, case=shape)
    measure(benchmark, run, rounds=ROUNDS, warmup=2)
