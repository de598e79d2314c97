"""Plain-PyTorch definitions of every op that a fused backend replaces: the oracle.

Each fused implementation (Triton kernels in kernels/, the C++/CUDA extension in csrc/) must compute
exactly these functions, with the same conventions and reductions, on any valid input. Tests and
benchmarks import these definitions; nothing else in the package should call them directly
(stages call :mod:`rectok_fast.ops`, which dispatches).

Numerics: reductions and element-wise math run in fp32 and the result is cast back to the
activation dtype, as the official code does for its norms. Time conventions: ``flow_interpolate``
is convention-free (it mixes ``x`` towards ``noise`` by weight ``t``); see :mod:`rectok_fast.flow`
for the tokenizer (tau = 1 is noise) and DiT (t = 1 is data) conventions built on it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rectok_fast.ops.registry import (ADALN_EPS, COSINE_EPS, LOGVAR_MAX, LOGVAR_MIN, check_adaln_modulate,
                                      check_cosine_distill_loss, check_flow_interpolate, check_gated_residual,
                                      check_ids_range, check_posterior_flow_noise)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or any shape with B elements -> fp32 (B, 1, ..., 1) broadcastable against ``like``."""
    b = like.shape[0]
    if t.numel() != b:
        raise ValueError(f"t must hold one value per sample: expected {b} values, got shape {tuple(t.shape)}")
    return t.detach().reshape(b, *([1] * (like.dim() - 1))).float()


def flow_interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, return_velocity: bool = False):
    """``(1 - t) * x + t * noise`` with ``t`` one weight per sample, treated as data (no gradient).

    With ``return_velocity=True`` also returns ``noise - x`` (the DiT transport's velocity target
    when ``x`` is the noise sample and ``noise`` the data, see :func:`rectok_fast.flow.transport_path`).
    Math in fp32, results in ``x.dtype``.
    """
    check_flow_interpolate(x, noise, t, return_velocity)
    tt = _per_sample(t, x)
    xf, nf = x.float(), noise.float()
    out = ((1.0 - tt) * xf + tt * nf).to(x.dtype)
    if return_velocity:
        return out, (nf - xf).to(x.dtype)
    return out


def posterior_flow_noise(moments: torch.Tensor, eps_post: torch.Tensor, eps_flow: torch.Tensor,
                         tau: torch.Tensor, gamma: float = 1.0):
    """The tokenizer's posterior sample, KL and flow noise from the encoder's moments.

    moments (B, L, 2C) = [mean | logvar]; eps_post, eps_flow (B, L, C) standard normal; tau (B,)
    noise level (tokenizer convention: tau = 1 is pure noise).
    Returns (z, z_tau, kl): z = mean + exp(0.5 * clamp(logvar)) * eps_post (fp32),
    z_tau = (1 - tau) * z + tau * gamma * eps_flow (fp32), kl (B,) = 0.5 * sum over (L, C) of
    mean^2 + var - 1 - logvar (fp32).
    """
    check_posterior_flow_noise(moments, eps_post, eps_flow, tau, gamma)
    c = moments.shape[-1] // 2
    m = moments.float()
    mean = m[..., :c]
    logvar = m[..., c:].clamp(LOGVAR_MIN, LOGVAR_MAX)
    std = torch.exp(0.5 * logvar)
    var = torch.exp(logvar)
    z = mean + std * eps_post.float()
    kl = 0.5 * (mean.pow(2) + var - 1.0 - logvar).sum(dim=(1, 2))
    z_tau = flow_interpolate(z, gamma * eps_flow.float(), tau)
    return z, z_tau, kl


def cosine_distill_loss(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """mean over rows of ``1 - cos(pred, target)`` along the last (channel) dim, fp32 scalar.

    Without ``ids``: pred, target (B, N, D), every token counts. With ``ids`` (B, M) int64/int32:
    pred (B, M, D) holds predictions for the target rows ``target[b, ids[b, m]]`` of target (B, N, D)
    only (the official 'reconstruction' target scores the masked tokens; the semantic decoder
    projects just those, see models/tokenizer.py). M = 0 gives a zero loss that stays connected to
    ``pred`` (the official code swaps in ``target + 0 * pred`` for the same reason).
    The target gets no gradient. Zero rows are normalized as F.normalize does (norm clamped at 1e-12).
    """
    check_cosine_distill_loss(pred, target, ids)
    target = target.detach()
    if ids is not None:
        if ids.shape[1] == 0:
            return (pred.float() * 0.0).sum()
        check_ids_range(ids, target.shape[1])
        idx = ids.long().unsqueeze(-1).expand(-1, -1, target.shape[-1])
        target = torch.gather(target, 1, idx)
    p = F.normalize(pred.float(), dim=-1, eps=COSINE_EPS)
    f = F.normalize(target.float(), dim=-1, eps=COSINE_EPS)
    return (1.0 - (p * f).sum(-1)).mean()


def _modulation(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, D) / (B, 1, D) / (B, N, D) (checked by the contract) -> broadcastable against x (B, N, D)."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def rms_norm_fp32(x: torch.Tensor, eps: float = ADALN_EPS) -> torch.Tensor:
    """The DiT's RMSNorm statistics: computed in fp32, cast back to x.dtype (models/layers.py)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = ADALN_EPS) -> torch.Tensor:
    """``RMSNorm(x) * weight * (1 + scale) + shift`` for x (B, N, D), result in x.dtype.

    The norm is computed in fp32 and cast back to x.dtype before the weight, as the official DiT
    does; the weight and modulation are applied in fp32. shift/scale are per sample (B, D) or
    (B, 1, D), or per token (B, N, D), and may be strided views (chunks of one adaLN output).
    """
    check_adaln_modulate(x, weight, shift, scale, eps)
    shift = _modulation(shift, x)
    scale = _modulation(scale, x)
    normed = rms_norm_fp32(x, eps).float() * weight.float()
    return (normed * (1.0 + scale.float()) + shift.float()).to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` for x, y (B, N, D); gate (B, D), (B, 1, D) or (B, N, D). Math in fp32, result in x.dtype."""
    check_gated_residual(x, gate, y)
    gate = _modulation(gate, x)
    return (x.float() + gate.float() * y.float()).to(x.dtype)
