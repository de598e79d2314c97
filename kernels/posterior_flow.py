"""Fused posterior sample + KL + tokenizer flow noise on the encoder's moments, in one pass.

Same function as :func:`rectok_fast.ops.reference.posterior_flow_noise`:
moments (B, L, 2C) = [mean | logvar], logvar clamped to [-30, 20]; eps_post, eps_flow (B, L, C);
tau (B,) (tokenizer convention: tau = 1 is pure noise, no gradient)::

    z     = mean + exp(0.5 * logvar) * eps_post                      (fp32)
    z_tau = (1 - tau) * z + tau * (gamma * eps_flow)                 (fp32)
    kl[b] = 0.5 * sum_{l,c} mean^2 + exp(logvar) - 1 - logvar        (fp32, per sample)

The random numbers are inputs, so the RNG stream is the caller's and stays reproducible
(:func:`posterior_flow_philox` draws them in-kernel instead, behind a flag: a different stream).

Forward: each program takes a (BLOCK_L x BLOCK_C) tile of one sample, reads mean, logvar, both
eps tiles, writes z and z_tau and one KL partial sum; the program that draws the last ticket of a
counter (_launch.ticket_counter) adds each sample's partials in a fixed order (deterministic; the one
atomic is the ticket, never the sum) and writes kl, so the forward is one launch. Backward: reads the
moments, eps_post and the three output gradients and writes the moments gradient (plus eps gradients
when asked for):

    g      = g_z + (1 - tau) * g_z_tau
    d mean = g + g_kl[b] * mean
    d logv = (0.5 * g * eps_post * std + 0.5 * g_kl[b] * (var - 1)) * [-30 < logvar_raw < 20]

(torch.clamp passes the gradient only strictly inside its bounds; this matches it.)
The KL seed g_kl is read inside the kernel, so nothing syncs with the host. Output gradients that
autograd does not have (in training z itself is unused, so g_z is None) are never materialized:
the backward takes them as None and a constexpr drops their loads.

Registered as ``rectok_fast::posterior_flow_fwd`` / ``_bwd`` (triton_op on a GPU, see _launch.define_op)
with autograd; eager calls take an autograd.Function over the same launchers (cheaper dispatch).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from rectok_fast.kernels._launch import (alloc, check_tensor, define_op, kernel, needs_bf16_rounding, num_warps_for,
                                        signature, store_cast, ticket_counter, use_custom_op)
from rectok_fast.ops.registry import LOGVAR_MAX, LOGVAR_MIN, check_posterior_flow_noise

_OP = "posterior_flow_noise"


@triton.jit
def _tile(pid, L, C, nlb, ncb, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    per_b = nlb * ncb
    b = pid // per_b
    r = pid - b * per_b
    lb = r // ncb
    cb = r - lb * ncb
    rows = lb * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < L)[:, None] & (cols < C)[None, :]
    row = b.to(tl.int64) * L + rows.to(tl.int64)
    m_off = row[:, None] * (2 * C) + cols[None, :]      # mean; logvar is at m_off + C
    e_off = row[:, None] * C + cols[None, :]
    return b, mask, m_off, e_off


@triton.jit
def _post_fwd_kernel(m_ptr, e1_ptr, e2_ptr, tau_ptr, z_ptr, zt_ptr, klp_ptr, cnt_ptr, kl_ptr, L, C, gamma, nlb, ncb,
                     seed, n_total, LO: tl.constexpr, HI: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                     PHILOX: tl.constexpr, KL_B: tl.constexpr, KL_P: tl.constexpr, KL_ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    b, mask, m_off, e_off = _tile(pid, L, C, nlb, ncb, BLOCK_L, BLOCK_C)
    tau = tl.load(tau_ptr + b)
    mean = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(m_ptr + m_off + C, mask=mask, other=0.0).to(tl.float32)
    lv = tl.minimum(tl.maximum(lv, LO), HI)
    std = tl.exp(0.5 * lv)
    var = tl.exp(lv)
    if PHILOX:      # eps_post at offsets [0, n), eps_flow at [n, 2n) of the (seed) Philox stream
        e1 = tl.randn(seed, e_off.to(tl.int32))
        e2 = tl.randn(seed, (e_off + n_total).to(tl.int32))
    else:
        e1 = tl.load(e1_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
        e2 = tl.load(e2_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
    z = mean + std * e1
    zt = (1.0 - tau) * z + tau * (gamma * e2)
    tl.store(z_ptr + e_off, z, mask=mask)
    tl.store(zt_ptr + e_off, zt, mask=mask)
    term = tl.where(mask, mean * mean + var - 1.0 - lv, 0.0)
    tl.store(klp_ptr + pid, 0.5 * tl.sum(tl.sum(term, axis=1), axis=0))
    # kl[b]: the program that draws the last ticket adds each sample's partials (no second launch); see
    # cosine_distill._cos_fwd_kernel for the ordering argument. Fixed order: deterministic.
    tl.debug_barrier()
    per_b = nlb * ncb
    nprog = tl.num_programs(0)
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if ticket == nprog - 1:
        nb = nprog // per_b
        if KL_ONE_PASS:     # B <= KL_B and per_b <= KL_P (the goal shape): one tile, no loop
            bs = tl.arange(0, KL_B)
            j = tl.arange(0, KL_P)
            msk = (bs < nb)[:, None] & (j < per_b)[None, :]
            parts = tl.load(klp_ptr + bs[:, None] * per_b + j[None, :], mask=msk, other=0.0, cache_modifier=".cg")
            tl.store(kl_ptr + bs, tl.sum(parts, axis=1), mask=bs < nb)
        else:
            for b0 in range(0, nb, KL_B):
                bs = b0 + tl.arange(0, KL_B)
                acc = tl.zeros([KL_B, KL_P], dtype=tl.float32)
                for j0 in range(0, per_b, KL_P):
                    j = j0 + tl.arange(0, KL_P)
                    msk = (bs < nb)[:, None] & (j < per_b)[None, :]
                    acc += tl.load(klp_ptr + bs[:, None] * per_b + j[None, :], mask=msk, other=0.0,
                                   cache_modifier=".cg")
                tl.store(kl_ptr + bs, tl.sum(acc, axis=1), mask=bs < nb)
        tl.atomic_xchg(cnt_ptr, 0)            # back to zero for the next launch on this stream


@triton.jit
def _post_bwd_kernel(m_ptr, e1_ptr, tau_ptr, gz_ptr, gzt_ptr, gkl_ptr, gm_ptr, ge1_ptr, ge2_ptr,
                     L, C, gamma, nlb, ncb, seed, LO: tl.constexpr, HI: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, NEED_M: tl.constexpr,
                     NEED_E1: tl.constexpr, NEED_E2: tl.constexpr, HAS_GZ: tl.constexpr, HAS_GZT: tl.constexpr,
                     HAS_GKL: tl.constexpr, PHILOX: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)
    b, mask, m_off, e_off = _tile(pid, L, C, nlb, ncb, BLOCK_L, BLOCK_C)
    tau = tl.load(tau_ptr + b)
    if HAS_GZT:
        gzt = tl.load(gzt_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
    else:
        gzt = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    if NEED_E2:
        store_cast(ge2_ptr + e_off, gamma * (tau * gzt), mask, ROUND)
    if NEED_M or NEED_E1:
        g = (1.0 - tau) * gzt
        if HAS_GZ:
            g += tl.load(gz_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
        lv_raw = tl.load(m_ptr + m_off + C, mask=mask, other=0.0).to(tl.float32)
        lv = tl.minimum(tl.maximum(lv_raw, LO), HI)
        std = tl.exp(0.5 * lv)
        if NEED_E1:
            store_cast(ge1_ptr + e_off, g * std, mask, ROUND)
        if NEED_M:
            if HAS_GKL:
                gkl = tl.load(gkl_ptr + b)
            else:
                gkl = 0.0
            mean = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
            if PHILOX:  # the forward's eps_post, regenerated (never stored)
                e1 = tl.randn(seed, e_off.to(tl.int32))
            else:
                e1 = tl.load(e1_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
            var = tl.exp(lv)
            store_cast(gm_ptr + m_off, g + gkl * mean, mask, ROUND)
            glv = 0.5 * (g * e1 * std) + 0.5 * gkl * (var - 1.0)
            glv = tl.where((lv_raw > LO) & (lv_raw < HI), glv, 0.0)
            store_cast(gm_ptr + m_off + C, glv, mask, ROUND)


def _settings(L: int, C: int):
    block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    block_l = min(max(1, 2048 // block_c), triton.next_power_of_2(max(L, 1)))
    return block_l, block_c, num_warps_for(block_l * block_c)


def _grid(B, L, C):
    block_l, block_c, warps = _settings(L, C)
    nlb, ncb = triton.cdiv(L, block_l), triton.cdiv(C, block_c)
    return block_l, block_c, warps, nlb, ncb


KL_TILE = 2048        # partials the last forward program adds per pass (KL_B samples x KL_P partials)


def _kl_blocks(B: int, per_b: int) -> tuple[int, int, bool]:
    """(KL_B, KL_P, one pass): samples and partials per sample in each pass of the last program's KL sum,
    and whether one pass covers them all (the goal shape: 64 x 16)."""
    kl_p = min(triton.next_power_of_2(max(per_b, 1)), KL_TILE)
    kl_b = max(1, min(triton.next_power_of_2(max(B, 1)), KL_TILE // kl_p))
    return kl_b, kl_p, B <= kl_b and per_b <= kl_p


def _empty0(device):
    return torch.empty(0, dtype=torch.float32, device=device)


def production_configs() -> list[dict]:
    """The launch configs at the goal shape (P2: moments (64, 256, 256) bf16, eps fp32), for
    benchmarks/static_report.py: kernel, constexprs, num_warps, grid, and the shape they serve."""
    B, L, C = 64, 256, 128
    block_l, block_c, warps, nlb, ncb = _grid(B, L, C)
    shape = dict(B=B, L=L, C=C, moments_dtype="bf16", eps_dtype="fp32")
    grid = (B * nlb * ncb,)
    ptrs = dict(m_ptr="*bf16", gm_ptr="*bf16", cnt_ptr="*i32")
    kl_b, kl_p, one = _kl_blocks(B, nlb * ncb)
    base = dict(LO=LOGVAR_MIN, HI=LOGVAR_MAX, BLOCK_L=block_l, BLOCK_C=block_c, PHILOX=False)
    fwd = dict(base, KL_B=kl_b, KL_P=kl_p, KL_ONE_PASS=one)
    bwd = dict(base, NEED_M=True, NEED_E1=False, NEED_E2=False, HAS_GZ=False, HAS_GZT=True, HAS_GKL=True, ROUND=False)
    return [dict(kernel=fn.__name__, fn=fn, shape=shape, grid=grid, num_warps=warps, constexprs=c,
                 signature=signature(fn, c, ptrs)) for fn, c in ((_post_fwd_kernel, fwd), (_post_bwd_kernel, bwd))]


# ---------------------------------------------------------------------------------------- launchers
def posterior_fwd(moments, eps_post, eps_flow, tau, gamma: float, traced: bool = False, seed: int | None = None):
    """With ``seed`` the eps are drawn in-kernel (Philox) and ``eps_post`` / ``eps_flow`` are ignored."""
    if seed is not None:
        eps_post = eps_flow = tau
    moments, eps_post, eps_flow, tau = (t.contiguous() for t in (moments, eps_post, eps_flow, tau))
    B, L, C2 = moments.shape
    C = C2 // 2
    dev = moments.device
    z = alloc((B, L, C), torch.float32, dev)
    zt = alloc((B, L, C), torch.float32, dev)
    if B * L * C == 0:
        return z, zt, torch.zeros(B, dtype=torch.float32, device=dev)
    block_l, block_c, warps, nlb, ncb = _grid(B, L, C)
    partial = alloc((B, nlb * ncb), torch.float32, dev)
    kl = alloc((B,), torch.float32, dev)
    kl_b, kl_p, one = _kl_blocks(B, nlb * ncb)
    kernel(_post_fwd_kernel, traced)[(B * nlb * ncb,)](
        moments, eps_post, eps_flow, tau, z, zt, partial, ticket_counter(dev, traced), kl, L, C, float(gamma),
        nlb, ncb, seed if seed is not None else 0, B * L * C,
        LO=LOGVAR_MIN, HI=LOGVAR_MAX, BLOCK_L=block_l, BLOCK_C=block_c, PHILOX=seed is not None,
        KL_B=kl_b, KL_P=kl_p, KL_ONE_PASS=one, num_warps=warps)
    return z, zt, kl


def posterior_bwd(moments, eps_post, tau, g_z: Optional[torch.Tensor], g_zt: Optional[torch.Tensor],
                  g_kl: Optional[torch.Tensor], gamma: float, need_m: bool, need_e1: bool, need_e2: bool,
                  e1_dtype: torch.dtype, e2_dtype: torch.dtype, traced: bool = False, seed: int | None = None):
    """Input gradients; g_z / g_zt / g_kl may be None (that output got no gradient: nothing is read).
    With ``seed`` eps_post is regenerated in-kernel (Philox) and the ``eps_post`` argument is ignored."""
    if seed is not None:
        eps_post = tau
    moments, eps_post, tau = moments.contiguous(), eps_post.contiguous(), tau.contiguous()
    B, L, C2 = moments.shape
    C = C2 // 2
    dev = moments.device
    gm = alloc(moments.shape, moments.dtype, dev) if need_m else _empty0(dev)
    ge1 = alloc((B, L, C), e1_dtype, dev) if need_e1 else _empty0(dev)
    ge2 = alloc((B, L, C), e2_dtype, dev) if need_e2 else _empty0(dev)
    if B * L * C == 0 or not (need_m or need_e1 or need_e2):
        if need_m and moments.numel():
            gm.zero_()
        return gm, ge1, ge2
    has_gz, has_gzt, has_gkl = g_z is not None, g_zt is not None, g_kl is not None
    g_z = g_z.contiguous() if has_gz else tau          # placeholders are never read (constexpr)
    g_zt = g_zt.contiguous() if has_gzt else tau
    g_kl = g_kl.to(torch.float32).contiguous() if has_gkl else tau
    block_l, block_c, warps, nlb, ncb = _grid(B, L, C)
    any_out = gm if need_m else (ge1 if need_e1 else ge2)
    kernel(_post_bwd_kernel, traced)[(B * nlb * ncb,)](
        moments, eps_post, tau, g_z, g_zt, g_kl, gm if need_m else any_out, ge1 if need_e1 else any_out,
        ge2 if need_e2 else any_out, L, C, float(gamma), nlb, ncb, seed if seed is not None else 0,
        LO=LOGVAR_MIN, HI=LOGVAR_MAX,
        BLOCK_L=block_l, BLOCK_C=block_c, NEED_M=need_m, NEED_E1=need_e1, NEED_E2=need_e2,
        HAS_GZ=has_gz, HAS_GZT=has_gzt, HAS_GKL=has_gkl, PHILOX=seed is not None,
        ROUND=needs_bf16_rounding(moments.dtype, e1_dtype, e2_dtype), num_warps=warps)
    return gm, ge1, ge2


# ------------------------------------------------------------------------------- custom ops + autograd
def _fwd_fake(moments, eps_post, eps_flow, tau, gamma):
    B, L, C2 = moments.shape
    f = dict(dtype=torch.float32)
    return (moments.new_empty((B, L, C2 // 2), **f), moments.new_empty((B, L, C2 // 2), **f),
            moments.new_empty((B,), **f))


@define_op("rectok_fast::posterior_flow_fwd", _fwd_fake)
def _post_fwd_op(moments: torch.Tensor, eps_post: torch.Tensor, eps_flow: torch.Tensor, tau: torch.Tensor,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return posterior_fwd(moments, eps_post, eps_flow, tau, gamma, traced=True)


def _bwd_fake(moments, eps_post, tau, g_z, g_zt, g_kl, gamma, need_m, need_e1, need_e2, e1_dtype, e2_dtype):
    def e0():     # one fresh tensor per output: outputs must not alias each other
        return moments.new_empty(0, dtype=torch.float32)
    return (moments.new_empty(moments.shape) if need_m else e0(),
            eps_post.new_empty(eps_post.shape, dtype=e1_dtype) if need_e1 else e0(),
            eps_post.new_empty(eps_post.shape, dtype=e2_dtype) if need_e2 else e0())


@define_op("rectok_fast::posterior_flow_bwd", _bwd_fake)
def _post_bwd_op(moments: torch.Tensor, eps_post: torch.Tensor, tau: torch.Tensor, g_z: Optional[torch.Tensor],
                 g_zt: Optional[torch.Tensor], g_kl: Optional[torch.Tensor], gamma: float, need_m: bool,
                 need_e1: bool, need_e2: bool, e1_dtype: torch.dtype,
                 e2_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return posterior_bwd(moments, eps_post, tau, g_z, g_zt, g_kl, gamma, need_m, need_e1, need_e2, e1_dtype,
                         e2_dtype, traced=True)


def _setup(ctx, inputs, output):
    moments, eps_post, eps_flow, tau, gamma = inputs
    ctx.save_for_backward(moments, eps_post, tau)
    ctx.gamma = gamma
    ctx.e2_dtype = eps_flow.dtype
    ctx.set_materialize_grads(False)     # unused outputs (z in training) send None, not zeros


def _grads(ctx, g_z, g_zt, g_kl, bwd):
    moments, eps_post, tau = ctx.saved_tensors
    need_m, need_e1, need_e2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if g_z is None and g_zt is None and g_kl is None:
        return None, None, None, None, None
    gm, ge1, ge2 = bwd(moments, eps_post, tau, g_z, g_zt, g_kl, ctx.gamma, need_m, need_e1, need_e2,
                       eps_post.dtype, ctx.e2_dtype)
    return (gm if need_m else None), (ge1 if need_e1 else None), (ge2 if need_e2 else None), None, None


def _backward(ctx, g_z, g_zt, g_kl):
    return _grads(ctx, g_z, g_zt, g_kl, torch.ops.rectok_fast.posterior_flow_bwd)


torch.library.register_autograd("rectok_fast::posterior_flow_fwd", _backward, setup_context=_setup)


class _PosteriorFlow(torch.autograd.Function):
    """Eager twin of the custom op (same launchers, cheaper dispatch); see kernels/_launch.py."""

    @staticmethod
    def forward(ctx, moments, eps_post, eps_flow, tau, gamma):
        out = posterior_fwd(moments, eps_post, eps_flow, tau, gamma)
        _setup(ctx, (moments, eps_post, eps_flow, tau, gamma), out)
        return out

    @staticmethod
    def backward(ctx, g_z, g_zt, g_kl):
        return _grads(ctx, g_z, g_zt, g_kl, posterior_bwd)


# ------------------------------------------------------------------------------------------ public
def posterior_flow_noise(moments: torch.Tensor, eps_post: torch.Tensor, eps_flow: torch.Tensor,
                         tau: torch.Tensor, gamma: float = 1.0):
    """Fused :func:`rectok_fast.ops.reference.posterior_flow_noise`: returns (z, z_tau, kl), all fp32."""
    check_posterior_flow_noise(moments, eps_post, eps_flow, tau, gamma)
    check_tensor(_OP, "moments", moments)
    check_tensor(_OP, "eps_post", eps_post)
    check_tensor(_OP, "eps_flow", eps_flow)
    tt = tau.detach().reshape(moments.shape[0]).to(torch.float32)
    if use_custom_op():
        return torch.ops.rectok_fast.posterior_flow_fwd(moments, eps_post, eps_flow, tt, float(gamma))
    return _PosteriorFlow.apply(moments, eps_post, eps_flow, tt, float(gamma))


def opcheck_samples(device) -> list:
    """One sample call per registered op (forward and backward; with and without the optional
    output gradients) for torch.library.opcheck."""
    g = torch.Generator().manual_seed(0)
    B, L, C = 2, 3, 5
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    m, e1, e2, tau = rnd(B, L, 2 * C).requires_grad_(True), rnd(B, L, C), rnd(B, L, C), torch.rand(B, generator=g).to(device)
    gz, gzt, gkl = rnd(B, L, C), rnd(B, L, C), rnd(B)
    bwd = "rectok_fast::posterior_flow_bwd"
    f32 = torch.float32
    return [("rectok_fast::posterior_flow_fwd", (m, e1, e2, tau, 0.7)),
            (bwd, (m.detach(), e1, tau, gz, gzt, gkl, 0.7, True, True, True, f32, f32)),
            (bwd, (m.detach(), e1, tau, None, gzt, gkl, 0.7, True, False, False, f32, f32)),
            (bwd, (m.detach(), e1, tau, gz, None, None, 0.7, True, True, False, f32, f32))]


# ------------------------------------------------------------------------------- in-kernel noise (flag)
class _PosteriorPhilox(torch.autograd.Function):
    @staticmethod
    def forward(ctx, moments, tau, gamma, seed):
        out = posterior_fwd(moments, None, None, tau, gamma, seed=seed)
        ctx.save_for_backward(moments, tau)
        ctx.gamma, ctx.seed = gamma, seed
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, g_z, g_zt, g_kl):
        moments, tau = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_z is None and g_zt is None and g_kl is None):
            return None, None, None, None
        f32 = torch.float32
        gm, _, _ = posterior_bwd(moments, None, tau, g_z, g_zt, g_kl, ctx.gamma, True, False, False, f32, f32,
                                 seed=ctx.seed)
        return gm, None, None, None


def posterior_flow_noise_philox(moments: torch.Tensor, tau: torch.Tensor, gamma: float, seed: int):
    """Opt-in variant of :func:`posterior_flow_noise` that draws eps_post and eps_flow inside the kernel
    (Philox keyed by ``seed``; eps_post at element offsets [0, n), eps_flow at [n, 2n), n = B*L*C) instead
    of reading them: two fewer fp32 tensors read in the forward and one fewer in the backward, which
    regenerates eps_post from the seed. The numbers are a DIFFERENT stream from torch.randn, so runs are
    not comparable draw-for-draw with the reference path; hence a flag, never the default. Eager only
    (an autograd.Function over the launchers). Returns (z, z_tau, kl), all fp32; gradient to moments."""
    zeros = moments.new_zeros(moments.shape[:-1] + (moments.shape[-1] // 2,))
    check_posterior_flow_noise(moments, zeros, zeros, tau, gamma)
    check_tensor(_OP, "moments", moments)
    seed = int(seed)
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"{_OP}: seed must be in [0, 2**31), got {seed}")
    if 2 * zeros.numel() >= 2 ** 31:
        raise ValueError(f"{_OP}: in-kernel noise supports up to 2**30 latent elements, got {zeros.numel()}")
    tt = tau.detach().reshape(moments.shape[0]).to(torch.float32)
    return _PosteriorPhilox.apply(moments, tt, float(gamma), seed)
