"""Eager per-call overhead: a fused op on tiny tensors vs a plain torch op (goal: at most 1.5x torch.add).

    pytest benchmarks/test_bench_overhead.py --benchmark-only

On tensors of a few elements the kernels take no time, so the host time per call is the dispatch cost
the models pay on every eager call (about 4 AdaLN / gated-residual calls per DiT block). Each round
makes ``CALLS`` calls through the public entry point the models use (rectok_fast.ops.<op>, backend
"fused"), timed on the host clock; without and with autograd (inputs that require grad, so the
autograd node is built too). Baselines in the same group: ``torch.add`` on the same tensors and the
eager reference. benchmarks/summarize.py prints each op's time as a multiple of torch.add's.
On a shared CPU machine, ``OMP_NUM_THREADS=1 ... --benchmark-timer time.thread_time`` times the calling
thread's CPU time, which other jobs' time slices do not inflate (the calls are single-threaded anyway).
On CUDA the launches are asynchronous and the kernels finish long before the host's next call, so
this is the host's dispatch time there too; no synchronisation is timed.
"""
from __future__ import annotations

import pytest
import torch

import cases
from rectok_fast import ops
from rectok_fast.ops import registry

CUDA = torch.cuda.is_available()
CALLS = 200
ROUNDS = 5 if cases.TINY else 100


def _inputs(op: str, dev, grad: bool):
    g = torch.Generator(device=dev).manual_seed(0)
    B, N, D = 2, 3, 16
    x = torch.randn(B, N, D, generator=g, device=dev)
    mod = torch.randn(B, D, generator=g, device=dev)
    y = torch.randn(B, N, D, generator=g, device=dev)
    w = torch.randn(D, generator=g, device=dev)
    if op == "adaln_modulate":
        args = (x, w, mod, mod * 0.5)
    elif op == "gated_residual":
        args = (x, mod, y)
    elif op == "flow_interpolate":
        args = (x, y, torch.rand(B, generator=g, device=dev))
    else:
        raise ValueError(op)
    if grad:
        args = tuple(a.requires_grad_(True) if a.dim() > 1 else a for a in args)
    return args, (x.requires_grad_(grad), y.requires_grad_(grad))


def _ops():
    out = ["adaln_modulate", "gated_residual"]
    if CUDA:                       # the Triton ops run eagerly only on a GPU (the interpreter is not a speed path)
        out.append("flow_interpolate")
    return out


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("impl", ["torch_add", "reference", "fused"])
@pytest.mark.parametrize("op", _ops())
def test_call_overhead(benchmark, bench_device, op, impl, grad):
    spec = registry.spec(op)
    if impl == "fused" and spec.family == "cuda-ext":
        from rectok_fast.ops import adaln_ext
        if adaln_ext.load_error() is not None:
            pytest.skip(adaln_ext.load_error())
    args, (x, y) = _inputs(op, bench_device, grad)
    if impl == "torch_add":
        call = lambda: torch.add(x, y)  # noqa: E731
        backend = "reference"
    else:
        fn = getattr(ops, op)      # bound once: the timed call is the op call itself, as for torch.add
        call = lambda: fn(*args)  # noqa: E731
        backend = "fused" if impl == "fused" else "reference"

    def many():
        for _ in range(CALLS):
            call()
    with ops.use_backend(backend):
        many()                     # warm-up: lazy loads and first-call caches stay out of the timing
        benchmark.group = f"overhead {op} {'grad' if grad else 'nograd'}"
        benchmark.extra_info.update(op=op, impl=impl, calls_per_round=CALLS, grad=grad, timing="host clock",
                                    overhead=True)
        benchmark.pedantic(many, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if CUDA:
        torch.cuda.synchronize()
