"""Fused cosine-alignment distillation loss: normalize, dot, 1 - cos, mean (+ gather by ids).

Same function as :func:`rectok_fast.ops.reference.cosine_distill_loss`: pred, target (B, N, D),
optional ids (B, M) picking the rows ``[b, ids[b, m]]``; loss = mean over rows of
``1 - <p / max(|p|, eps), f / max(|f|, eps)>`` with eps = 1e-12 (F.normalize), an fp32 scalar;
the target gets no gradient.

Forward: each program takes BLOCK_R rows (gathered through ``ids`` in place, no copies), streams
them along D in BLOCK_D chunks accumulating |p|^2, |f|^2 and <p, f> in fp32, writes three per-row
scalars (1/max(|p|,eps), 1/max(|f|,eps), and the projection coefficient; with ids also how often
each token was picked) and one partial loss sum, already divided by the row count; the partials are
summed afterwards in a fixed order (deterministic). Rows are addressed with the
(B, N) strides of the inputs, so a token slice of a bigger tensor (e.g. the teacher output minus
its CLS/register tokens) is read in place; only the channel dim must have stride 1.

Backward (exact gradient of the reference, F.normalize's clamp included), with g = dL / R and
p_hat = p / max(|p|, eps), f_hat likewise::

    dL/dp = -g * (f_hat - c * p_hat) / max(|p|, eps),   c = cos if |p| > eps else 0

(below eps, F.normalize divides by the constant eps and the projection term vanishes; torch's
clamp passes no gradient at equality either). It recomputes from the saved inputs and the per-row
scalars in one pass, reads the loss seed inside the kernel (no host sync), and writes every
element of dL/dpred exactly once: with ids it walks all B*N rows and scales each by the number
of times the row was picked (zero rows for tokens not picked, duplicates accumulate as in gather).

Registered as ``rectok_fast::cosine_distill_fwd`` / ``_bwd`` custom ops (fake kernels + autograd) for
torch.compile; eager calls take an autograd.Function over the same launchers (cheaper dispatch).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from rectok_fast.kernels._launch import (alloc, check_tensor, needs_bf16_rounding, num_warps_for, store_cast,
                                        use_custom_op)

_OP = "cosine_distill_loss"
COSINE_EPS = 1e-12          # F.normalize default, as rectok_fast.ops.reference
MAX_BLOCK_D = 4096          # longer rows are streamed in chunks (tests lower it to cover that path)
TILE = 4096                 # elements per program and chunk (BLOCK_R * BLOCK_D)


@triton.jit
def _rows(r, M, N, ids_ptr, s_ib, s_im, mask, HAS_IDS: tl.constexpr):
    """Logical row r -> (b, n): r = b*M + m with n = ids[b, m], or r = b*N + n without ids."""
    if HAS_IDS:
        b = r // M
        m = r - b * M
        n = tl.load(ids_ptr + b.to(tl.int64) * s_ib + m.to(tl.int64) * s_im, mask=mask, other=0).to(tl.int64)
    else:
        b = r // N
        n = (r - b * N).to(tl.int64)
    return b.to(tl.int64), n


@triton.jit
def _cos_fwd_kernel(p_ptr, f_ptr, ids_ptr, stats_ptr, part_ptr, R, M, N, D, SN, inv_rows,
                    s_pb, s_pn, s_fb, s_fn, s_ib, s_im,
                    EPS: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    b, n = _rows(r, M, N, ids_ptr, s_ib, s_im, rmask, HAS_IDS)
    if HAS_IDS:        # an out-of-range id (unchecked on CUDA) never touches memory; it makes the loss NaN
        valid = rmask & (n >= 0) & (n < N)
    else:
        valid = rmask
    p_row = (b * s_pb + n * s_pn)[:, None]
    f_row = (b * s_fb + n * s_fn)[:, None]
    pp = tl.zeros([BLOCK_R], dtype=tl.float32)
    ff = tl.zeros([BLOCK_R], dtype=tl.float32)
    pf = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        msk = valid[:, None] & (cols < D)[None, :]
        p = tl.load(p_ptr + p_row + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + f_row + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        pp += tl.sum(p * p, axis=1)
        ff += tl.sum(f * f, axis=1)
        pf += tl.sum(p * f, axis=1)
    p_norm = tl.sqrt_rn(pp)                       # IEEE-rounded: once per row, costs nothing
    one = tl.full([BLOCK_R], 1.0, tl.float32)
    rp = tl.div_rn(one, tl.maximum(p_norm, EPS))
    rf = tl.div_rn(one, tl.maximum(tl.sqrt_rn(ff), EPS))
    cos = pf * rp * rf
    s = b * N + n                     # per-token statistics, indexed like pred's (B, N) rows
    tl.store(stats_ptr + s, rp, mask=valid)
    tl.store(stats_ptr + SN + s, rf, mask=valid)
    tl.store(stats_ptr + 2 * SN + s, tl.where(p_norm > EPS, cos, 0.0), mask=valid)
    if HAS_IDS:        # how often each token was picked (the gather's backward accumulates duplicates)
        tl.atomic_add(stats_ptr + 3 * SN + s, tl.full([BLOCK_R], 1.0, tl.float32), mask=valid)
    term = tl.where(valid, 1.0 - cos, float("nan"))
    tl.store(part_ptr + pid, tl.sum(tl.where(rmask, term, 0.0), axis=0) * inv_rows)


@triton.jit
def _cos_bwd_kernel(p_ptr, f_ptr, stats_ptr, gl_ptr, gp_ptr, SN, N, D, inv_rows,
                    s_pb, s_pn, s_fb, s_fn,
                    HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)           # every (b, n) row of pred
    rmask = r < SN
    b = (r // N).to(tl.int64)
    n = (r % N).to(tl.int64)
    g = tl.load(gl_ptr).to(tl.float32) * inv_rows
    if HAS_IDS:
        cnt = tl.load(stats_ptr + 3 * SN + r, mask=rmask, other=0.0)
        active = rmask & (cnt > 0)
        w = g * cnt
    else:
        active = rmask
        w = g + tl.zeros([BLOCK_R], dtype=tl.float32)
    rp = tl.load(stats_ptr + r, mask=active, other=0.0)
    rf = tl.load(stats_ptr + SN + r, mask=active, other=0.0)
    c = tl.load(stats_ptr + 2 * SN + r, mask=active, other=0.0)
    a_f = (-w * rp * rf)[:, None]           # coefficient of f
    a_p = (w * c * rp * rp)[:, None]        # coefficient of p
    p_row = (b * s_pb + n * s_pn)[:, None]
    f_row = (b * s_fb + n * s_fn)[:, None]
    o_row = (r.to(tl.int64) * D)[:, None]
    for k in range(0, D, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        cm = (cols < D)[None, :]
        p = tl.load(p_ptr + p_row + cols[None, :], mask=active[:, None] & cm, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + f_row + cols[None, :], mask=active[:, None] & cm, other=0.0).to(tl.float32)
        store_cast(gp_ptr + o_row + cols[None, :], a_f * f + a_p * p, rmask[:, None] & cm, ROUND)


def _settings(D: int, rows: int):
    block_d = min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)
    block_r = min(max(1, TILE // block_d), triton.next_power_of_2(max(rows, 1)))
    return block_r, block_d, num_warps_for(block_r * block_d)


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------- launchers
def cosine_fwd(pred: torch.Tensor, target: torch.Tensor, ids: Optional[torch.Tensor]):
    """Returns (loss fp32 scalar, stats (3 or 4 with ids, B*N) fp32: 1/|p|, 1/|f|, projection coef, count)."""
    pred, target = _inner_contiguous(pred), _inner_contiguous(target)
    B, N, D = pred.shape
    dev = pred.device
    M = ids.shape[1] if ids is not None else N
    R = B * M
    if ids is not None:         # tokens not picked keep defined (zero) statistics; counts start at 0
        stats = torch.zeros((4, B * N), dtype=torch.float32, device=dev)
    else:
        stats = alloc((3, B * N), torch.float32, dev)
    block_r, block_d, warps = _settings(D, R)
    nprog = triton.cdiv(R, block_r)
    part = alloc((nprog,), torch.float32, dev)
    ids_arg = ids if ids is not None else part
    s_ib, s_im = (ids.stride(0), ids.stride(1)) if ids is not None else (0, 0)
    _cos_fwd_kernel[(nprog,)](pred, target, ids_arg, stats, part, R, M, N, D, B * N, 1.0 / R,
                              pred.stride(0), pred.stride(1), target.stride(0), target.stride(1), s_ib, s_im,
                              EPS=COSINE_EPS, HAS_IDS=ids is not None, BLOCK_R=block_r, BLOCK_D=block_d,
                              num_warps=warps)
    return part.sum(), stats


def cosine_bwd(pred, target, ids: Optional[torch.Tensor], stats, g_loss):
    pred, target = _inner_contiguous(pred), _inner_contiguous(target)
    B, N, D = pred.shape
    dev = pred.device
    M = ids.shape[1] if ids is not None else N
    gp = alloc((B, N, D), pred.dtype, dev)
    block_r, block_d, warps = _settings(D, B * N)
    _cos_bwd_kernel[(triton.cdiv(B * N, block_r),)](
        pred, target, stats, g_loss.reshape(1), gp, B * N, N, D, 1.0 / (B * M),
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
        HAS_IDS=ids is not None, BLOCK_R=block_r, BLOCK_D=block_d, ROUND=needs_bf16_rounding(pred.dtype),
        num_warps=warps)
    return gp


# ------------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("rectok_fast::cosine_distill_fwd", mutates_args=())
def _cos_fwd_op(pred: torch.Tensor, target: torch.Tensor,
                ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return cosine_fwd(pred, target, ids)


@_cos_fwd_op.register_fake
def _(pred, target, ids):
    B, N, _ = pred.shape
    rows = 3 if ids is None else 4
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((rows, B * N), dtype=torch.float32)


@torch.library.custom_op("rectok_fast::cosine_distill_bwd", mutates_args=())
def _cos_bwd_op(pred: torch.Tensor, target: torch.Tensor, ids: Optional[torch.Tensor], stats: torch.Tensor,
                g_loss: torch.Tensor) -> torch.Tensor:
    return cosine_bwd(pred, target, ids, stats, g_loss)


@_cos_bwd_op.register_fake
def _(pred, target, ids, stats, g_loss):
    return pred.new_empty(pred.shape)


def _setup(ctx, inputs, output):
    pred, target, ids = inputs
    ctx.save_for_backward(pred, target, ids, output[1])
    ctx.mark_non_differentiable(output[1])


def _grads(ctx, g_loss, bwd):
    pred, target, ids, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return bwd(pred, target, ids, stats, g_loss), None, None


def _backward(ctx, g_loss, *_unused):
    return _grads(ctx, g_loss, torch.ops.rectok_fast.cosine_distill_bwd)


torch.library.register_autograd("rectok_fast::cosine_distill_fwd", _backward, setup_context=_setup)


class _CosineDistill(torch.autograd.Function):
    """Eager twin of the custom op (same launchers, cheaper dispatch); see kernels/_launch.py."""

    @staticmethod
    def forward(ctx, pred, target, ids):
        out = cosine_fwd(pred, target, ids)
        _setup(ctx, (pred, target, ids), out)
        return out

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        return _grads(ctx, g_loss, cosine_bwd)


# ------------------------------------------------------------------------------------------ public
def _check_ids(ids: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{_OP}: ids must be a tensor of token indices, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{_OP}: ids must be an integer tensor (int64 or int32), got {ids.dtype}")
    if ids.device != pred.device:
        raise ValueError(f"{_OP}: ids is on {ids.device} but pred is on {pred.device}")
    if ids.dim() != 2 or ids.shape[0] != pred.shape[0]:
        raise ValueError(f"ids must be (B, M) with B = {pred.shape[0]}, got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.long()
    # A range check needs the values on the host: cheap on CPU, a sync on CUDA (opt in with
    # RECTOK_FAST_CHECK_IDS=1; unchecked, the kernel skips an out-of-range id and returns a NaN loss
    # instead of touching memory out of bounds). Skipped while torch.compile traces (graph break).
    if ids.numel() and not torch.compiler.is_compiling() and (ids.device.type == "cpu" or _check_ids_on_gpu()):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= pred.shape[1]:
            raise IndexError(f"{_OP}: ids must lie in [0, {pred.shape[1]}) (N tokens), got values in [{lo}, {hi}]")
    return ids


def _check_ids_on_gpu() -> bool:
    return os.environ.get("RECTOK_FAST_CHECK_IDS", "0") not in ("", "0")


def cosine_distill_loss(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`rectok_fast.ops.reference.cosine_distill_loss` (fp32 scalar, no grad to target)."""
    check_tensor(_OP, "pred", pred)
    check_tensor(_OP, "target", target, device=pred.device)
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"cosine_distill_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "must both be (B, N, D)")
    if ids is not None:
        ids = _check_ids(ids, pred)
        if ids.shape[1] == 0:
            return (pred.float() * 0.0).sum()      # the reference's zero loss, still connected to pred
    if pred.numel() == 0:
        raise ValueError(f"{_OP}: pred {tuple(pred.shape)} is empty; the mean over no rows is undefined")
    if use_custom_op():
        loss, _ = torch.ops.rectok_fast.cosine_distill_fwd(pred, target.detach(), ids)
    else:
        loss, _ = _CosineDistill.apply(pred, target.detach(), ids)
    return loss
