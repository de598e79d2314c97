"""Fused posterior sample + KL + tokenizer flow noise on the encoder's moments, in one pass.

Same function as :func:`rectok_fast.ops.reference.posterior_flow_noise`:
moments (B, L, 2C) = [mean | logvar], logvar clamped to [-30, 20]; eps_post, eps_flow (B, L, C);
tau (B,) (tokenizer convention: tau = 1 is pure noise, no gradient)::

    z     = mean + exp(0.5 * logvar) * eps_post                      (fp32)
    z_tau = (1 - tau) * z + tau * (gamma * eps_flow)                 (fp32)
    kl[b] = 0.5 * sum_{l,c} mean^2 + exp(logvar) - 1 - logvar        (fp32, per sample)

The random numbers are inputs, so the RNG stream is the caller's and stays reproducible.

Forward: each program takes a (BLOCK_L x BLOCK_C) tile of one sample, reads mean, logvar, both
eps tiles, writes z and z_tau and one KL partial sum; the partials (B, tiles per sample) are summed
afterwards in a fixed order (deterministic, no atomics). Backward: reads the moments, eps_post and
the three output gradients and writes the moments gradient (plus eps gradients when asked for):

    g      = g_z + (1 - tau) * g_z_tau
    d mean = g + g_kl[b] * mean
    d logv = (0.5 * g * eps_post * std + 0.5 * g_kl[b] * (var - 1)) * [-30 < logvar_raw < 20]

(torch.clamp passes the gradient only strictly inside its bounds; this matches it.)
The KL seed g_kl is read inside the kernel, so nothing syncs with the host.

Registered as ``rectok_fast::posterior_flow_fwd`` / ``_bwd`` custom ops (fake kernels + autograd) for
torch.compile; eager calls take an autograd.Function over the same launchers (cheaper dispatch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rectok_fast.kernels._launch import (alloc, check_tensor, needs_bf16_rounding, num_warps_for, store_cast,
                                        use_custom_op)

_OP = "posterior_flow_noise"
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0      # must equal rectok_fast.ops.reference (models/gaussian.py clamp)


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
def _post_fwd_kernel(m_ptr, e1_ptr, e2_ptr, tau_ptr, z_ptr, zt_ptr, klp_ptr, L, C, gamma, nlb, ncb,
                     LO: tl.constexpr, HI: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b, mask, m_off, e_off = _tile(pid, L, C, nlb, ncb, BLOCK_L, BLOCK_C)
    tau = tl.load(tau_ptr + b)
    mean = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(m_ptr + m_off + C, mask=mask, other=0.0).to(tl.float32)
    lv = tl.minimum(tl.maximum(lv, LO), HI)
    std = tl.exp(0.5 * lv)
    var = tl.exp(lv)
    e1 = tl.load(e1_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
    e2 = tl.load(e2_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
    z = mean + std * e1
    zt = (1.0 - tau) * z + tau * (gamma * e2)
    tl.store(z_ptr + e_off, z, mask=mask)
    tl.store(zt_ptr + e_off, zt, mask=mask)
    term = tl.where(mask, mean * mean + var - 1.0 - lv, 0.0)
    tl.store(klp_ptr + pid, 0.5 * tl.sum(tl.sum(term, axis=1), axis=0))


@triton.jit
def _post_bwd_kernel(m_ptr, e1_ptr, tau_ptr, gz_ptr, gzt_ptr, gkl_ptr, gm_ptr, ge1_ptr, ge2_ptr,
                     L, C, gamma, nlb, ncb, LO: tl.constexpr, HI: tl.constexpr,
                     BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, NEED_M: tl.constexpr,
                     NEED_E1: tl.constexpr, NEED_E2: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)
    b, mask, m_off, e_off = _tile(pid, L, C, nlb, ncb, BLOCK_L, BLOCK_C)
    tau = tl.load(tau_ptr + b)
    gzt = tl.load(gzt_ptr + e_off, mask=mask, other=0.0).to(tl.float32)
    if NEED_E2:
        store_cast(ge2_ptr + e_off, gamma * (tau * gzt), mask, ROUND)
    if NEED_M or NEED_E1:
        g = tl.load(gz_ptr + e_off, mask=mask, other=0.0).to(tl.float32) + (1.0 - tau) * gzt
        lv_raw = tl.load(m_ptr + m_off + C, mask=mask, other=0.0).to(tl.float32)
        lv = tl.minimum(tl.maximum(lv_raw, LO), HI)
        std = tl.exp(0.5 * lv)
        if NEED_E1:
            store_cast(ge1_ptr + e_off, g * std, mask, ROUND)
        if NEED_M:
            gkl = tl.load(gkl_ptr + b)
            mean = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
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


def _empty0(device):
    return torch.empty(0, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------- launchers
def posterior_fwd(moments, eps_post, eps_flow, tau, gamma: float):
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
    _post_fwd_kernel[(B * nlb * ncb,)](moments, eps_post, eps_flow, tau, z, zt, partial, L, C, float(gamma),
                                       nlb, ncb, LO=LOGVAR_MIN, HI=LOGVAR_MAX, BLOCK_L=block_l,
                                       BLOCK_C=block_c, num_warps=warps)
    return z, zt, partial.sum(dim=1)


def posterior_bwd(moments, eps_post, tau, g_z, g_zt, g_kl, gamma: float, need_m: bool, need_e1: bool,
                  need_e2: bool, e1_dtype: torch.dtype, e2_dtype: torch.dtype):
    moments, eps_post, tau, g_z, g_zt, g_kl = (t.contiguous() for t in (moments, eps_post, tau, g_z, g_zt, g_kl))
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
    g_kl = g_kl.to(torch.float32)
    block_l, block_c, warps, nlb, ncb = _grid(B, L, C)
    any_out = gm if need_m else (ge1 if need_e1 else ge2)
    _post_bwd_kernel[(B * nlb * ncb,)](
        moments, eps_post, tau, g_z, g_zt, g_kl, gm if need_m else any_out, ge1 if need_e1 else any_out,
        ge2 if need_e2 else any_out, L, C, float(gamma), nlb, ncb, LO=LOGVAR_MIN, HI=LOGVAR_MAX,
        BLOCK_L=block_l, BLOCK_C=block_c, NEED_M=need_m, NEED_E1=need_e1, NEED_E2=need_e2,
        ROUND=needs_bf16_rounding(moments.dtype, e1_dtype, e2_dtype), num_warps=warps)
    return gm, ge1, ge2


# ------------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("rectok_fast::posterior_flow_fwd", mutates_args=())
def _post_fwd_op(moments: torch.Tensor, eps_post: torch.Tensor, eps_flow: torch.Tensor, tau: torch.Tensor,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return posterior_fwd(moments, eps_post, eps_flow, tau, gamma)


@_post_fwd_op.register_fake
def _(moments, eps_post, eps_flow, tau, gamma):
    B, L, C2 = moments.shape
    f = dict(dtype=torch.float32)
    return (moments.new_empty((B, L, C2 // 2), **f), moments.new_empty((B, L, C2 // 2), **f),
            moments.new_empty((B,), **f))


@torch.library.custom_op("rectok_fast::posterior_flow_bwd", mutates_args=())
def _post_bwd_op(moments: torch.Tensor, eps_post: torch.Tensor, tau: torch.Tensor, g_z: torch.Tensor,
                 g_zt: torch.Tensor, g_kl: torch.Tensor, gamma: float, need_m: bool, need_e1: bool, need_e2: bool,
                 e1_dtype: torch.dtype, e2_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return posterior_bwd(moments, eps_post, tau, g_z, g_zt, g_kl, gamma, need_m, need_e1, need_e2, e1_dtype, e2_dtype)


@_post_bwd_op.register_fake
def _(moments, eps_post, tau, g_z, g_zt, g_kl, gamma, need_m, need_e1, need_e2, e1_dtype, e2_dtype):
    e0 = moments.new_empty(0, dtype=torch.float32)
    return (moments.new_empty(moments.shape) if need_m else e0,
            eps_post.new_empty(eps_post.shape, dtype=e1_dtype) if need_e1 else e0,
            eps_post.new_empty(eps_post.shape, dtype=e2_dtype) if need_e2 else e0)


def _setup(ctx, inputs, output):
    moments, eps_post, eps_flow, tau, gamma = inputs
    ctx.save_for_backward(moments, eps_post, tau)
    ctx.gamma = gamma
    ctx.e2_dtype = eps_flow.dtype


def _grads(ctx, g_z, g_zt, g_kl, bwd):
    moments, eps_post, tau = ctx.saved_tensors
    need_m, need_e1, need_e2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
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
    check_tensor(_OP, "moments", moments)
    if moments.dim() != 3 or moments.shape[-1] % 2:
        raise ValueError(f"moments must be (B, L, 2C), got {tuple(moments.shape)}")
    expected = (*moments.shape[:-1], moments.shape[-1] // 2)
    for name, e in (("eps_post", eps_post), ("eps_flow", eps_flow)):
        check_tensor(_OP, name, e, device=moments.device)
        if tuple(e.shape) != expected:
            raise ValueError(f"{name} must be {expected}, got {tuple(e.shape)}")
    check_tensor(_OP, "tau", tau, dtypes=None, device=moments.device)
    b = moments.shape[0]
    if tau.numel() != b:
        raise ValueError(f"{_OP}: tau must hold one value per sample: expected {b} values, got shape {tuple(tau.shape)}")
    if tau.is_complex() or tau.dtype == torch.bool:
        raise TypeError(f"{_OP}: tau must be a real tensor, got {tau.dtype}")
    if isinstance(gamma, torch.Tensor):
        raise TypeError(f"{_OP}: gamma must be a Python number, got a tensor")
    tt = tau.detach().reshape(b).to(torch.float32)
    if use_custom_op():
        return torch.ops.rectok_fast.posterior_flow_fwd(moments, eps_post, eps_flow, tt, float(gamma))
    return _PosteriorFlow.apply(moments, eps_post, eps_flow, tt, float(gamma))
