"""Fused flow interpolation ``(1 - t) * x + t * noise`` (+ optional velocity ``noise - x``).

Same function as :func:`rectok_fast.ops.reference.flow_interpolate`: one weight ``t`` per sample
(treated as data, no gradient), math in fp32, results in ``x.dtype``; gradients go to ``x`` (in
``x.dtype``) and ``noise`` (in ``noise.dtype``).

Layout: the inputs are viewed as (B, S) with S = numel / B. Each program handles BLOCK contiguous
elements of one sample, so ``t[b]`` is one scalar load per program and the loads along S are
vectorized. Forward reads x, noise and writes out (and v); backward reads the output gradients
and writes both input gradients in one pass.

Registered as ``rectok_fast::flow_interpolate_fwd`` / ``rectok_fast::flow_interpolate_bwd``
(triton_op on a GPU, see _launch.define_op, with autograd), so ``torch.compile`` traces through it;
eager calls take an autograd.Function over the same launchers (cheaper dispatch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rectok_fast.kernels._launch import (alloc, check_tensor, define_op, kernel, needs_bf16_rounding, num_warps_for,
                                        signature, store_cast, use_custom_op)
from rectok_fast.ops.registry import check_flow_interpolate

_OP = "flow_interpolate"


@triton.jit
def _flow_fwd_kernel(x_ptr, n_ptr, t_ptr, out_ptr, v_ptr, S, nblk,
                     BLOCK: tl.constexpr, WITH_V: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // nblk
    offs = (pid - b * nblk) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    base = b.to(tl.int64) * S
    t = tl.load(t_ptr + b)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(n_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    store_cast(out_ptr + base + offs, (1.0 - t) * x + t * n, mask, ROUND)
    if WITH_V:
        store_cast(v_ptr + base + offs, n - x, mask, ROUND)


@triton.jit
def _flow_bwd_kernel(go_ptr, gv_ptr, t_ptr, gx_ptr, gn_ptr, S, nblk,
                     BLOCK: tl.constexpr, WITH_V: tl.constexpr, NEED_X: tl.constexpr,
                     NEED_N: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // nblk
    offs = (pid - b * nblk) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    base = b.to(tl.int64) * S
    t = tl.load(t_ptr + b)
    go = tl.load(go_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if WITH_V:
        gv = tl.load(gv_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_X:
            store_cast(gx_ptr + base + offs, (1.0 - t) * go - gv, mask, ROUND)
        if NEED_N:
            store_cast(gn_ptr + base + offs, t * go + gv, mask, ROUND)
    else:
        if NEED_X:
            store_cast(gx_ptr + base + offs, (1.0 - t) * go, mask, ROUND)
        if NEED_N:
            store_cast(gn_ptr + base + offs, t * go, mask, ROUND)


def _settings(S: int):
    block = min(2048, triton.next_power_of_2(max(S, 1)))
    return block, num_warps_for(block)


def _empty0(device):
    return torch.empty(0, dtype=torch.float32, device=device)


def production_configs() -> list[dict]:
    """The launch configs at the goal shapes (tokenizer latent (64, 256, 128) and DiT latent
    (64, 128, 16, 16) + velocity, fp32), for benchmarks/static_report.py."""
    out = []
    for shape, vel in (((64, 256, 128), False), ((64, 128, 16, 16), True)):
        S = 1
        for d in shape[1:]:
            S *= d
        block, warps = _settings(S)
        grid = (shape[0] * triton.cdiv(S, block),)
        desc = dict(shape=shape, velocity=vel, dtype="fp32")
        for fn, c in ((_flow_fwd_kernel, dict(BLOCK=block, WITH_V=vel, ROUND=False)),
                      (_flow_bwd_kernel, dict(BLOCK=block, WITH_V=vel, NEED_X=True, NEED_N=True, ROUND=False))):
            out.append(dict(kernel=fn.__name__, fn=fn, shape=desc, grid=grid, num_warps=warps, constexprs=c,
                            signature=signature(fn, c, {})))
    return out


# ---------------------------------------------------------------------------------------- launchers
def flow_fwd(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, with_velocity: bool, traced: bool = False):
    """x, noise (B, ...) same shape; t (B,) fp32. Returns (out, v) in x.dtype; v is empty without velocity."""
    x, noise, t = x.contiguous(), noise.contiguous(), t.contiguous()
    B = x.shape[0]
    S = x.numel() // B if B else 0
    out = alloc(x.shape, x.dtype, x.device)
    v = alloc(x.shape, x.dtype, x.device) if with_velocity else _empty0(x.device)
    if x.numel() == 0:
        return out, v
    block, warps = _settings(S)
    nblk = triton.cdiv(S, block)
    kernel(_flow_fwd_kernel, traced)[(B * nblk,)](x, noise, t, out, v if with_velocity else out, S, nblk,
                                  BLOCK=block, WITH_V=with_velocity, ROUND=needs_bf16_rounding(x.dtype),
                                  num_warps=warps)
    return out, v


def flow_bwd(g_out: torch.Tensor, g_v: torch.Tensor, t: torch.Tensor, with_velocity: bool,
             x_dtype: torch.dtype, noise_dtype: torch.dtype, need_x: bool, need_noise: bool, traced: bool = False):
    """Gradients (grad_x in x_dtype, grad_noise in noise_dtype); an empty tensor for one not needed."""
    g_out, t = g_out.contiguous(), t.contiguous()
    g_v = g_v.contiguous() if with_velocity else g_out
    dev = g_out.device
    gx = alloc(g_out.shape, x_dtype, dev) if need_x else _empty0(dev)
    gn = alloc(g_out.shape, noise_dtype, dev) if need_noise else _empty0(dev)
    B = g_out.shape[0]
    if g_out.numel() == 0 or not (need_x or need_noise):
        return gx, gn
    S = g_out.numel() // B
    block, warps = _settings(S)
    nblk = triton.cdiv(S, block)
    kernel(_flow_bwd_kernel, traced)[(B * nblk,)](g_out, g_v, t, gx if need_x else gn, gn if need_noise else gx, S, nblk,
                                  BLOCK=block, WITH_V=with_velocity, NEED_X=need_x, NEED_N=need_noise,
                                  ROUND=needs_bf16_rounding(x_dtype, noise_dtype), num_warps=warps)
    return gx, gn


# ------------------------------------------------------------------------------- custom ops + autograd
def _fwd_fake(x, noise, t, with_velocity):
    v = x.new_empty(x.shape) if with_velocity else x.new_empty(0, dtype=torch.float32)
    return x.new_empty(x.shape), v


@define_op("rectok_fast::flow_interpolate_fwd", _fwd_fake)
def _flow_fwd_op(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                 with_velocity: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return flow_fwd(x, noise, t, with_velocity, traced=True)


def _bwd_fake(g_out, g_v, t, with_velocity, x_dtype, noise_dtype, need_x, need_noise):
    gx = g_out.new_empty(g_out.shape, dtype=x_dtype) if need_x else g_out.new_empty(0, dtype=torch.float32)
    gn = g_out.new_empty(g_out.shape, dtype=noise_dtype) if need_noise else g_out.new_empty(0, dtype=torch.float32)
    return gx, gn


@define_op("rectok_fast::flow_interpolate_bwd", _bwd_fake)
def _flow_bwd_op(g_out: torch.Tensor, g_v: torch.Tensor, t: torch.Tensor, with_velocity: bool,
                 x_dtype: torch.dtype, noise_dtype: torch.dtype, need_x: bool,
                 need_noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return flow_bwd(g_out, g_v, t, with_velocity, x_dtype, noise_dtype, need_x, need_noise, traced=True)


def _setup(ctx, inputs, output):
    x, noise, t, with_velocity = inputs
    ctx.save_for_backward(t)
    ctx.with_velocity = with_velocity
    ctx.x_dtype, ctx.noise_dtype = x.dtype, noise.dtype
    ctx.set_materialize_grads(False)     # an unused velocity sends None: its zeros are never read


def _grads(ctx, g_out, g_v, bwd):
    (t,) = ctx.saved_tensors
    need_x, need_noise = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if g_out is None and g_v is None:
        return None, None, None, None
    with_v = ctx.with_velocity and g_v is not None
    if g_out is None:                    # only the velocity is used (rare): the kernel needs both seeds
        g_out = torch.zeros_like(g_v)
    gx, gn = bwd(g_out, g_v if with_v else g_out, t, with_v, ctx.x_dtype, ctx.noise_dtype, need_x, need_noise)
    return (gx if need_x else None), (gn if need_noise else None), None, None


def _backward(ctx, g_out, g_v):
    return _grads(ctx, g_out, g_v, torch.ops.rectok_fast.flow_interpolate_bwd)


torch.library.register_autograd("rectok_fast::flow_interpolate_fwd", _backward, setup_context=_setup)


class _FlowInterpolate(torch.autograd.Function):
    """Eager twin of the custom op (same launchers, cheaper dispatch); see kernels/_launch.py."""

    @staticmethod
    def forward(ctx, x, noise, t, with_velocity):
        out = flow_fwd(x, noise, t, with_velocity)
        _setup(ctx, (x, noise, t, with_velocity), out)
        return out

    @staticmethod
    def backward(ctx, g_out, g_v):
        return _grads(ctx, g_out, g_v, flow_bwd)


# ------------------------------------------------------------------------------------------ public
def flow_interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, return_velocity: bool = False):
    """Fused :func:`rectok_fast.ops.reference.flow_interpolate` (same signature and results)."""
    check_flow_interpolate(x, noise, t, return_velocity)
    check_tensor(_OP, "x", x)
    check_tensor(_OP, "noise", noise)
    tt = t.detach().reshape(x.shape[0]).to(torch.float32)
    if use_custom_op():
        out, v = torch.ops.rectok_fast.flow_interpolate_fwd(x, noise, tt, bool(return_velocity))
    else:
        out, v = _FlowInterpolate.apply(x, noise, tt, bool(return_velocity))
    return (out, v) if return_velocity else out


def opcheck_samples(device) -> list:
    """One sample call per registered op (forward and backward) for torch.library.opcheck."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g).to(device).requires_grad_(True)
    n = torch.randn(2, 3, 5, generator=g).to(device).requires_grad_(True)
    t = torch.rand(2, generator=g).to(device)
    go, gv = torch.randn(2, 3, 5, generator=g).to(device), torch.randn(2, 3, 5, generator=g).to(device)
    f32 = torch.float32
    return [("rectok_fast::flow_interpolate_fwd", (x, n, t, True)),
            ("rectok_fast::flow_interpolate_fwd", (x, n, t, False)),
            ("rectok_fast::flow_interpolate_bwd", (go, gv, t, True, f32, f32, True, True)),
            ("rectok_fast::flow_interpolate_bwd", (go, go, t, False, f32, f32, True, False))]
