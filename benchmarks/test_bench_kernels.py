"""Benchmarks of the Triton ops (kernels/) vs the eager reference and torch.compile(reference).

    pytest benchmarks/test_bench_kernels.py --benchmark-only

Real shapes (spec section 9, B = 64, 256 tokens):
* cosine distillation: pred/target (64, 256, 1024) (DINOv3-L teacher) and (64, 256, 768), bf16,
  all tokens and ~40 % masked ids (M = 102);
* flow interpolation: tokenizer latent (64, 256, 128) and DiT latent (64, 128, 16, 16) (+ velocity), fp32;
* posterior + flow noise: moments (64, 256, 256) bf16 (encoder output under autocast), eps fp32.

Modes: forward, backward (the forward runs in the untimed setup), full. Each benchmark records the
bytes the fused kernels move (reads + writes, formulas in ``_make``), so the JSON quotes the
achieved fraction of a copy measured in the same run (benchmarks/conftest.py). The fused variant
runs only on CUDA (the Triton interpreter is not a speed path); on CPU the compiled baseline runs
for one shape per op (each torch.compile costs ~15 s of warm-up there) and a few rounds.
"""
from __future__ import annotations

import pytest
import torch

from conftest import record
from rectok_fast.ops import reference

CUDA = torch.cuda.is_available()
IMPLS = ["reference", "compiled"] + (["fused"] if CUDA else [])
MODES = ["forward", "backward", "full"]
ROUNDS, WARMUP = (30, 3) if CUDA else (2, 1)
B, N = 64, 256
M_MASKED = int(0.4 * N)            # 102 masked tokens of 256 (mask_ratio 0.4)

# case -> (op, parameters); the first case of each op is the one compiled on CPU too
CASES = {
    "cosine_D1024_all": ("cosine", dict(D=1024, masked=False)),
    "cosine_D1024_mask40": ("cosine", dict(D=1024, masked=True)),
    "cosine_D768_all": ("cosine", dict(D=768, masked=False)),
    "cosine_D768_mask40": ("cosine", dict(D=768, masked=True)),
    "flow_64x256x128": ("flow", dict(shape=(64, 256, 128), velocity=False)),
    "flow_64x128x16x16_vel": ("flow", dict(shape=(64, 128, 16, 16), velocity=True)),
    "posterior_64x256x256": ("posterior", dict(B=64, L=256, C=128)),
}
CPU_COMPILED = {"cosine_D1024_all", "flow_64x256x128", "posterior_64x256x256"}


# --------------------------------------------------------------------------------------- callables
def _fused(op):
    if op == "cosine":
        from rectok_fast.kernels.cosine_distill import cosine_distill_loss
        return cosine_distill_loss
    if op == "flow":
        from rectok_fast.kernels.flow_interpolate import flow_interpolate
        return flow_interpolate
    from rectok_fast.kernels.posterior_flow import posterior_flow_noise
    return posterior_flow_noise


_REFS = {"cosine": reference.cosine_distill_loss, "flow": reference.flow_interpolate,
         "posterior": reference.posterior_flow_noise}
_COMPILED: dict = {}               # one torch.compile wrapper per op, shared by all modes and shapes


def _impl(op, impl):
    if impl == "reference":
        return _REFS[op]
    if impl == "fused":
        return _fused(op)
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(_REFS[op], dynamic=False)
    return _COMPILED[op]


# ------------------------------------------------------------------------------------ inputs/bytes
def _make(op, p, dev):
    """-> (call(fn) -> tuple of outputs, grad inputs, output seeds, bytes fwd, bytes bwd)."""
    g = torch.Generator(device=dev).manual_seed(0)
    if op == "cosine":
        D, dt = p["D"], torch.bfloat16
        pred = torch.randn(B, N, D, device=dev, generator=g).to(dt).requires_grad_(True)
        target = torch.randn(B, N, D, device=dev, generator=g).to(dt)
        ids = torch.rand(B, N, device=dev, generator=g).argsort(dim=1)[:, :M_MASKED] if p["masked"] else None
        rows = B * (M_MASKED if ids is not None else N)
        s = pred.element_size()
        stats = (4 if ids is not None else 3) * B * N * 4              # per-token fp32 scalars (+ pick count)
        fwd = 2 * rows * D * s + (ids.numel() * 8 if ids is not None else 0) + stats
        bwd = 2 * rows * D * s + B * N * D * s + stats                # read picked rows, write all of dL/dpred
        seed = torch.ones((), device=dev)
        return (lambda fn: (fn(pred, target, ids),)), [pred], [seed], fwd, bwd
    if op == "flow":
        shape, vel = p["shape"], p["velocity"]
        x = torch.randn(shape, device=dev, generator=g).requires_grad_(True)
        noise = torch.randn(shape, device=dev, generator=g).requires_grad_(True)
        t = torch.rand(shape[0], device=dev, generator=g)
        n_out = 2 if vel else 1
        nb = x.numel() * x.element_size()
        fwd = (2 + n_out) * nb                                       # read x, noise; write out (+ v)
        bwd = (n_out + 2) * nb                                       # read g_out (+ g_v); write g_x, g_noise
        seeds = [torch.randn(shape, device=dev, generator=g) for _ in range(n_out)]

        def call(fn):
            r = fn(x, noise, t, return_velocity=vel)
            return tuple(r) if vel else (r,)
        return call, [x, noise], seeds, fwd, bwd
    Bp, L, C = p["B"], p["L"], p["C"]
    moments = torch.randn(Bp, L, 2 * C, device=dev, generator=g).to(torch.bfloat16).requires_grad_(True)
    e1 = torch.randn(Bp, L, C, device=dev, generator=g)
    e2 = torch.randn(Bp, L, C, device=dev, generator=g)
    tau = torch.rand(Bp, device=dev, generator=g)
    sm, se, n = moments.element_size(), e1.element_size(), Bp * L * C
    fwd = n * (2 * sm + 2 * se + 2 * 4) + Bp * 4                      # moments, eps x2 -> z, z_tau (fp32), kl
    bwd = n * (2 * sm + se + 2 * 4 + 2 * sm) + Bp * 4                 # moments, eps_post, g_z, g_z_tau -> g_moments
    seeds = [torch.randn(Bp, L, C, device=dev, generator=g), torch.randn(Bp, L, C, device=dev, generator=g),
             torch.full((Bp,), 1.0 / Bp, device=dev)]
    return (lambda fn: tuple(fn(moments, e1, e2, tau, 1.0))), [moments], seeds, fwd, bwd


def _params():
    out = []
    for case, (op, _) in CASES.items():
        for impl in IMPLS:
            if impl == "compiled" and not CUDA and case not in CPU_COMPILED:
                continue
            for mode in MODES:
                out.append(pytest.param(case, impl, mode, id=f"{case}-{impl}-{mode}"))
    return out


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case,impl,mode", _params())
def test_kernel_op(benchmark, bench_device, case, impl, mode):
    op, p = CASES[case]
    dev = bench_device
    call, inputs, seeds, b_fwd, b_bwd = _make(op, p, dev)
    fn = _impl(op, impl)
    warmup = WARMUP if (CUDA or impl == "compiled") else 0     # eager on CPU needs no warm-up round
    benchmark.group = f"{case}-{mode}"
    record(benchmark, bytes_moved={"forward": b_fwd, "backward": b_bwd, "full": b_fwd + b_bwd}[mode],
           op=op, impl=impl, mode=mode, case=case)

    def forward():
        out = call(fn)
        _sync(dev)
        return out

    def backward_of(outs):
        grads = torch.autograd.grad(outs, inputs, seeds)
        _sync(dev)
        return grads

    if mode == "forward":
        benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=warmup, iterations=1)
    elif mode == "full":
        benchmark.pedantic(lambda: backward_of(call(fn)), rounds=ROUNDS, warmup_rounds=warmup, iterations=1)
    else:
        for _ in range(warmup):                       # compile / autotune the backward outside the timing
            backward_of(forward())
        benchmark.pedantic(backward_of, setup=lambda: ((forward(),), {}), rounds=ROUNDS, iterations=1)
