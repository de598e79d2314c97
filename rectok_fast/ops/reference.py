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

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0   # models/gaussian.py clamp
COSINE_EPS = 1e-12                      # F.normalize default, as the official SemLoss uses


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
    if x.shape != noise.shape:
        raise ValueError(f"flow_interpolate: x {tuple(x.shape)} and noise {tuple(noise.shape)} differ in shape")
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
    if moments.dim() != 3 or moments.shape[-1] % 2:
        raise ValueError(f"moments must be (B, L, 2C), got {tuple(moments.shape)}")
    c = moments.shape[-1] // 2
    expected = (*moments.shape[:-1], c)
    for name, e in (("eps_post", eps_post), ("eps_flow", eps_flow)):
        if tuple(e.shape) != expected:
            raise ValueError(f"{name} must be {expected}, got {tuple(e.shape)}")
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
    """mean over tokens of ``1 - cos(pred, target)`` along the last (channel) dim, fp32 scalar.

    pred, target (B, N, D). With ``ids`` (B, M) long, only the rows ``[b, ids[b, m]]`` count
    (the official 'reconstruction' target gathers the masked tokens). M = 0 gives a zero loss that
    stays connected to ``pred`` (the official code swaps in ``target + 0 * pred`` for the same reason).
    The target gets no gradient. Zero rows are normalized as F.normalize does (norm clamped at 1e-12).
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"cosine_distill_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "must both be (B, N, D)")
    target = target.detach()
    if ids is not None:
        if ids.dim() != 2 or ids.shape[0] != pred.shape[0]:
            raise ValueError(f"ids must be (B, M) with B = {pred.shape[0]}, got {tuple(ids.shape)}")
        if ids.shape[1] == 0:
            return (pred.float() * 0.0).sum()
        idx = ids.long().unsqueeze(-1).expand(-1, -1, pred.shape[-1])
        pred = torch.gather(pred, 1, idx)
        target = torch.gather(target, 1, idx)
    p = F.normalize(pred.float(), dim=-1, eps=COSINE_EPS)
    f = F.normalize(target.float(), dim=-1, eps=COSINE_EPS)
    return (1.0 - (p * f).sum(-1)).mean()


def _modulation(m: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, D) / (B, 1, D) / (B, N, D) -> broadcastable against x (B, N, D)."""
    b, n, d = x.shape
    if m.dim() == 2 and tuple(m.shape) == (b, d):
        return m.unsqueeze(1)
    if m.dim() == 3 and m.shape[0] == b and m.shape[2] == d and m.shape[1] in (1, n):
        return m
    raise ValueError(f"{name} must be (B, D), (B, 1, D) or (B, N, D) for x of shape {tuple(x.shape)}; "
                     f"got {tuple(m.shape)}")


def rms_norm_fp32(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The DiT's RMSNorm statistics: computed in fp32, cast back to x.dtype (models/layers.py)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """``RMSNorm(x) * weight * (1 + scale) + shift`` for x (B, N, D), result in x.dtype.

    The norm is computed in fp32 and cast back to x.dtype before the weight, as the official DiT
    does; the weight and modulation are applied in fp32. shift/scale are per sample (B, D) or
    (B, 1, D), or per token (B, N, D), and may be strided views (chunks of one adaLN output).
    """
    if x.dim() != 3:
        raise ValueError(f"adaln_modulate: x must be (B, N, D), got {tuple(x.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"adaln_modulate: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    shift = _modulation(shift, x, "shift")
    scale = _modulation(scale, x, "scale")
    normed = rms_norm_fp32(x, eps).float() * weight.float()
    return (normed * (1.0 + scale.float()) + shift.float()).to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` for x, y (B, N, D); gate (B, D), (B, 1, D) or (B, N, D). Math in fp32, result in x.dtype."""
    if x.dim() != 3 or y.shape != x.shape:
        raise ValueError(f"gated_residual: x {tuple(x.shape)} and y {tuple(y.shape)} must both be (B, N, D)")
    gate = _modulation(gate, x, "gate")
    return (x.float() + gate.float() * y.float()).to(x.dtype)
