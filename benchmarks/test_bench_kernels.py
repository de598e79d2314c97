"""Benchmarks of the Triton ops (kernels/) vs the eager reference and torch.compile(reference).

    pytest benchmarks/test_bench_kernels.py --benchmark-only

Goal shapes (benchmarks/cases.py, B = 64, 256 tokens): cosine distillation at teacher dim 1024 and 768,
all tokens and masked (pred holds the ~40 % picked rows); flow interpolation on the tokenizer latent
(64, 256, 128) and the DiT latent (64, 128, 16, 16) with velocity; posterior + flow noise on moments
(64, 256, 256) bf16, with z unused (as in training).

Modes: forward, backward (the forward runs once, untimed; the backward replays with the graph
retained), full. Each benchmark records the op's minimal traffic, so the JSON quotes the fraction of
a copy measured in the same run (benchmarks/conftest.py); on a GPU the time is device time from CUDA
events over CUDA-graph replays with an L2 flush before each (benchmarks/timing.py). The fused variant
runs on CUDA, and on CPU only in the tiny dry run (RECTOK_BENCH_TINY=1, Triton interpreter: checks the
plumbing, not speed). On CPU torch.compile runs for one case per op (each compile costs ~15 s there).
"""
from __future__ import annotations

import functools

import pytest
import torch

import cases
from conftest import record
from rectok_fast.ops import reference, registry
from timing import measure

CUDA = torch.cuda.is_available()
IMPLS = ["reference", "compiled"] + (["fused"] if (CUDA or cases.TINY) else [])
MODES = ["forward", "backward", "full"]
ROUNDS = 30 if CUDA else (2 if cases.TINY else 3)


def _cpu_compiled(op: str, case: str) -> bool:
    """CPU compiles are slow: the first case of each op (tiny dry run: of the first op only)."""
    first_op = next(iter(cases.KERNEL_CASES))
    return case == next(iter(cases.KERNEL_CASES[op][1])) and (not cases.TINY or op == first_op)


@functools.lru_cache(maxsize=None)
def _impl(public: str, impl: str):
    if impl == "reference":
        return getattr(reference, public)
    if impl == "fused":
        return registry.resolve(registry.spec(public).fused)
    return torch.compile(getattr(reference, public), dynamic=False)


def _params():
    out = []
    for op, (_public, op_cases) in cases.KERNEL_CASES.items():
        for case in list(op_cases)[:1] if cases.TINY else op_cases:   # dry run: one case per op
            for impl in IMPLS:
                if impl == "compiled" and not CUDA and not _cpu_compiled(op, case):
                    continue
                for mode in MODES:
                    out.append(pytest.param(op, case, impl, mode, id=f"{case}-{impl}-{mode}"))
    return out


@pytest.mark.parametrize("op,case_name,impl,mode", _params())
def test_kernel_op(benchmark, bench_device, op, case_name, impl, mode):
    public, op_cases = cases.KERNEL_CASES[op]
    case = op_cases[case_name](bench_device)
    fn = _impl(public, impl)
    benchmark.group = f"{case_name}-{mode}"
    nbytes = {"forward": case.bytes_fwd, "backward": case.bytes_bwd, "full": case.bytes_fwd + case.bytes_bwd}[mode]
    record(benchmark, bytes_moved=nbytes, op=public, impl=impl, mode=mode, case=case_name, **case.info)

    def grads(outs, retain):
        outs, seeds = case.outputs_with_seeds(outs)
        return torch.autograd.grad(outs, case.grad_inputs, seeds, retain_graph=retain)

    if mode == "forward":
        run = lambda: case.call(fn)  # noqa: E731
    elif mode == "full":
        run = lambda: grads(case.call(fn), False)  # noqa: E731
    else:
        outs = case.call(fn)
        run = lambda: grads(outs, True)  # noqa: E731
    measure(benchmark, run, rounds=ROUNDS, warmup=2 if (CUDA or impl == "compiled") else 0)
