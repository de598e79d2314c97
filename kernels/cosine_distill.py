"""Fused cosine-alignment distillation loss: normalize, dot, 1 - cos, mean (target rows picked by ids).

Same function as :func:`rectok_fast.ops.reference.cosine_distill_loss`: pred (B, M, D); target
(B, N, D); optional ids (B, M) naming the target row ``target[b, ids[b, m]]`` that pred row (b, m)
predicts (without ids M = N and rows pair up); loss = mean over the B*M rows of
``1 - <p / max(|p|, eps), f / max(|f|, eps)>`` with eps = COSINE_EPS (F.normalize), an fp32 scalar;
the target gets no gradient.

Masked ('reconstruction') mode: the semantic decoder gathers its hidden states at the masked ids
BEFORE its output projection (models/tokenizer.py), so pred already holds only the picked rows and
the kernel reads the target rows through ids in place: no copy of either tensor, and dL/dpred is
dense (no zero rows for unpicked tokens, no zero-fill, no pick counts).

Forward: each program takes BLOCK_R rows, loads them along D (in one BLOCK_D chunk at every goal
shape: straight-line code, no loop; longer rows are streamed in chunks) accumulating |p|^2, |f|^2 and
<p, f> in fp32, writes three per-row scalars (1/max(|p|,eps), 1/max(|f|,eps), and the projection
coefficient) and one partial loss sum, already divided by the row count. The program that draws the
last ticket of a counter (_launch.ticket_counter) adds all partials in a fixed order and writes the
loss: one launch per forward, deterministic (the order depends on the shape only). Rows are addressed
with the (B, N) strides of the inputs, so a token slice of a bigger tensor (e.g. the teacher output
minus its CLS/register tokens) is read in place; only the channel dim must have stride 1. An
out-of-range id never touches memory: its row makes the loss and its gradient NaN. The range check
itself: on the host for CPU tensors (registry.check_ids_range); for CUDA tensors inside the forward
kernel (a device-side assert in eager launches, compiled in with Triton's debug option: ids are read
there anyway, so the check costs no launch of its own, where registry.check_ids_range's device branch
would add five).

Backward (exact gradient of the reference, F.normalize's clamp included), with g = dL / R and
p_hat = p / max(|p|, eps), f_hat likewise::

    dL/dp = -g * (f_hat - c * p_hat) / max(|p|, eps),   c = cos if |p| > eps else 0

(below eps, F.normalize divides by the constant eps and the projection term vanishes; torch's
clamp passes no gradient at equality either). It recomputes from the saved inputs and the per-row
scalars in one pass, reads the loss seed inside the kernel (no host sync), and writes every element
of dL/dpred exactly once.

Registered as ``rectok_fast::cosine_distill_fwd`` / ``_bwd`` (triton_op on a GPU, see _launch.define_op)
with autograd; eager calls take an autograd.Function over the same launchers (cheaper dispatch).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from rectok_fast.kernels._launch import (alloc, check_tensor, define_op, interpreted, kernel, needs_bf16_rounding,
                                        num_warps_for, signature, store_cast, ticket_counter, use_custom_op)
from rectok_fast.ops import registry
from rectok_fast.ops.registry import COSINE_EPS, check_cosine_distill_loss, check_ids_range

_OP = "cosine_distill_loss"
MAX_BLOCK_D = 4096          # longer rows are streamed in chunks (tests lower it to cover that path)
TILE = 4096                 # backward: elements per program and chunk (BLOCK_R * BLOCK_D)
FWD_TILE = 8192             # forward: twice the rows per program (8 warps, the same work per thread), so half
                            # the partials for the last program to add (<= 8 per thread at the goal shapes)
SUM_BLOCK_MAX = 4096        # partials the last program loads at once (tests lower it to cover the loop)


@triton.jit
def _rows(r, M, N, ids_ptr, s_ib, s_im, rmask, HAS_IDS: tl.constexpr):
    """Row r = b*M + m -> (b, m, n, valid): pred row (b, m) pairs with target row (b, n)."""
    b = r // M
    m = r - b * M
    if HAS_IDS:
        n = tl.load(ids_ptr + b.to(tl.int64) * s_ib + m.to(tl.int64) * s_im, mask=rmask, other=0).to(tl.int64)
        valid = rmask & (n >= 0) & (n < N)
    else:
        n = m.to(tl.int64)
        valid = rmask
    return b.to(tl.int64), m.to(tl.int64), n, valid


@triton.jit
def _cos_fwd_kernel(p_ptr, f_ptr, ids_ptr, stats_ptr, part_ptr, cnt_ptr, loss_ptr, R, M, N, D, inv_rows,
                    s_pb, s_pm, s_fb, s_fn, s_ib, s_im,
                    EPS: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                    ONE_CHUNK: tl.constexpr, SUM_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    b, m, n, valid = _rows(r, M, N, ids_ptr, s_ib, s_im, rmask, HAS_IDS)
    if HAS_IDS:     # compiled only with debug=True (eager CUDA launches, see cosine_fwd)
        tl.device_assert(valid | (r >= R), "cosine_distill_loss: ids out of range: every id must lie in [0, N)")
    p_row = (b * s_pb + m * s_pm)[:, None]
    f_row = (b * s_fb + n * s_fn)[:, None]
    if ONE_CHUNK:
        # D <= BLOCK_D (every goal shape): straight-line code, no chunk loop, so no load batch waits behind
        # the block-wide reduction of the previous one (ptxas interleaves the loads with the multiply-adds;
        # the 5-6 programs resident per SM keep enough bytes in flight between them).
        cols = tl.arange(0, BLOCK_D)
        msk = valid[:, None] & (cols < D)[None, :]
        p = tl.load(p_ptr + p_row + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + f_row + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        pp = tl.sum(p * p, axis=1)
        ff = tl.sum(f * f, axis=1)
        pf = tl.sum(p * f, axis=1)
    else:
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
    bad = float("nan")                            # an out-of-range id poisons its row's loss and gradient
    tl.store(stats_ptr + r, tl.where(valid, rp, bad), mask=rmask)
    tl.store(stats_ptr + R + r, tl.where(valid, rf, bad), mask=rmask)
    tl.store(stats_ptr + 2 * R + r, tl.where(valid, tl.where(p_norm > EPS, cos, 0.0), bad), mask=rmask)
    term = tl.where(valid, 1.0 - cos, bad)
    tl.store(part_ptr + pid, tl.sum(tl.where(rmask, term, 0.0), axis=0) * inv_rows)
    # The loss: the program that draws the last ticket adds every partial (no second launch). The
    # barrier orders this program's partial store before its ticket; the acq_rel ticket publishes it
    # to, and the last program's ticket acquires all of them. Fixed order (SUM_BLOCK lanes, then one
    # tree): the loss depends on the shape only, never on which program finishes last.
    tl.debug_barrier()
    nprog = tl.num_programs(0)
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if ticket == nprog - 1:
        acc = tl.zeros([SUM_BLOCK], dtype=tl.float32)
        for k in range(0, nprog, SUM_BLOCK):
            idx = k + tl.arange(0, SUM_BLOCK)
            acc += tl.load(part_ptr + idx, mask=idx < nprog, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(acc, axis=0))
        tl.atomic_xchg(cnt_ptr, 0)            # back to zero for the next launch on this stream


@triton.jit
def _cos_bwd_kernel(p_ptr, f_ptr, ids_ptr, stats_ptr, gl_ptr, gp_ptr, R, M, N, D, inv_rows,
                    s_pb, s_pm, s_fb, s_fn, s_ib, s_im,
                    HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROUND: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    b, m, n, valid = _rows(r, M, N, ids_ptr, s_ib, s_im, rmask, HAS_IDS)
    g = tl.load(gl_ptr).to(tl.float32) * inv_rows
    rp = tl.load(stats_ptr + r, mask=rmask, other=0.0)
    rf = tl.load(stats_ptr + R + r, mask=rmask, other=0.0)
    c = tl.load(stats_ptr + 2 * R + r, mask=rmask, other=0.0)
    a_f = (-g * rp * rf)[:, None]           # coefficient of f
    a_p = (g * c * rp * rp)[:, None]        # coefficient of p
    p_row = (b * s_pb + m * s_pm)[:, None]
    f_row = (b * s_fb + n * s_fn)[:, None]
    o_row = (r.to(tl.int64) * D)[:, None]
    for k in range(0, D, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        cm = (cols < D)[None, :]
        p = tl.load(p_ptr + p_row + cols[None, :], mask=valid[:, None] & cm, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + f_row + cols[None, :], mask=valid[:, None] & cm, other=0.0).to(tl.float32)
        store_cast(gp_ptr + o_row + cols[None, :], a_f * f + a_p * p, rmask[:, None] & cm, ROUND)


def _settings(D: int, rows: int, tile: int | None = None):
    block_d = min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)
    block_r = min(max(1, (tile or TILE) // block_d), triton.next_power_of_2(max(rows, 1)))
    return block_r, block_d, num_warps_for(block_r * block_d)


def _sum_block(nprog: int) -> int:
    """Lanes of the last program's sum of the partials: all of them in one load up to 4096 (one L2 round
    trip at every goal shape), 4096 at a time beyond."""
    return min(triton.next_power_of_2(max(nprog, 1)), SUM_BLOCK_MAX)


def production_configs() -> list[dict]:
    """The launch configs at the goal shapes (P1: B = 64, N = 256, D = 1024 / 768, bf16; masked M = 102),
    for benchmarks/static_report.py: kernel, constexprs, num_warps, grid, and the shape they serve."""
    out = []
    B, N = 64, 256
    for D in (1024, 768):
        for M in (N, int(0.4 * N)):
            rows = B * M
            has_ids = M != N
            shape = dict(B=B, N=N, M=M, D=D, dtype="bf16")
            ptrs = dict(p_ptr="*bf16", f_ptr="*bf16", gp_ptr="*bf16", ids_ptr="*i64", cnt_ptr="*i32")
            fr, fd, fw = _settings(D, rows, FWD_TILE)
            fgrid = (triton.cdiv(rows, fr),)
            br, bd, bw = _settings(D, rows)
            for fn, grid, warps, consts in (
                    (_cos_fwd_kernel, fgrid, fw, dict(EPS=COSINE_EPS, HAS_IDS=has_ids, BLOCK_R=fr, BLOCK_D=fd,
                                                      ONE_CHUNK=fd >= D, SUM_BLOCK=_sum_block(fgrid[0]))),
                    (_cos_bwd_kernel, (triton.cdiv(rows, br),), bw, dict(HAS_IDS=has_ids, BLOCK_R=br, BLOCK_D=bd,
                                                                          ROUND=False))):
                out.append(dict(kernel=fn.__name__, fn=fn, shape=shape, grid=grid, num_warps=warps,
                                constexprs=consts, signature=signature(fn, consts, ptrs)))
    return out


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------------- launchers
def cosine_fwd(pred: torch.Tensor, target: torch.Tensor, ids: Optional[torch.Tensor], traced: bool = False):
    """Returns (loss fp32 scalar, stats (3, B*M) fp32: 1/|p|, 1/|f|, projection coefficient); one launch."""
    pred, target = _inner_contiguous(pred), _inner_contiguous(target)
    B, M, D = pred.shape
    N = target.shape[1]
    dev = pred.device
    R = B * M
    stats = alloc((3, R), torch.float32, dev)
    block_r, block_d, warps = _settings(D, R, FWD_TILE)
    nprog = triton.cdiv(R, block_r)
    part = alloc((nprog,), torch.float32, dev)
    loss = alloc((), torch.float32, dev)
    ids_arg = ids if ids is not None else part
    s_ib, s_im = (ids.stride(0), ids.stride(1)) if ids is not None else (0, 0)
    # ids the host did not check (CUDA): the kernel asserts their range. debug=True compiles Triton's
    # device asserts in and nothing else here (no overflow checks: sanitize_overflow=False). Not inside a
    # traced op (torch.compile skips the range check altogether: out-of-range rows give a NaN loss) nor
    # in the interpreter (CPU ids are checked on the host).
    checks = dict(debug=True, sanitize_overflow=False) if (ids is not None and not traced and not interpreted()
                                                              and dev.type not in registry.HOST_CHECKED_DEVICES) else {}
    kernel(_cos_fwd_kernel, traced)[(nprog,)](
        pred, target, ids_arg, stats, part, ticket_counter(dev, traced), loss, R, M, N, D, 1.0 / R,
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1), s_ib, s_im,
        EPS=COSINE_EPS, HAS_IDS=ids is not None, BLOCK_R=block_r, BLOCK_D=block_d, ONE_CHUNK=block_d >= D,
        SUM_BLOCK=_sum_block(nprog), num_warps=warps, **checks)
    return loss, stats


def cosine_bwd(pred, target, ids: Optional[torch.Tensor], stats, g_loss, traced: bool = False):
    pred, target = _inner_contiguous(pred), _inner_contiguous(target)
    B, M, D = pred.shape
    N = target.shape[1]
    R = B * M
    gp = alloc((B, M, D), pred.dtype, pred.device)
    block_r, block_d, warps = _settings(D, R)
    ids_arg = ids if ids is not None else stats
    s_ib, s_im = (ids.stride(0), ids.stride(1)) if ids is not None else (0, 0)
    kernel(_cos_bwd_kernel, traced)[(triton.cdiv(R, block_r),)](
        pred, target, ids_arg, stats, g_loss.reshape(1), gp, R, M, N, D, 1.0 / R,
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1), s_ib, s_im,
        HAS_IDS=ids is not None, BLOCK_R=block_r, BLOCK_D=block_d, ROUND=needs_bf16_rounding(pred.dtype),
        num_warps=warps)
    return gp


# ------------------------------------------------------------------------------- custom ops + autograd
def _fwd_fake(pred, target, ids):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((3, pred.shape[0] * pred.shape[1]),
                                                                   dtype=torch.float32)


@define_op("rectok_fast::cosine_distill_fwd", _fwd_fake)
def _cos_fwd_op(pred: torch.Tensor, target: torch.Tensor,
                ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return cosine_fwd(pred, target, ids, traced=True)


def _bwd_fake(pred, target, ids, stats, g_loss):
    return pred.new_empty(pred.shape)


@define_op("rectok_fast::cosine_distill_bwd", _bwd_fake)
def _cos_bwd_op(pred: torch.Tensor, target: torch.Tensor, ids: Optional[torch.Tensor], stats: torch.Tensor,
                g_loss: torch.Tensor) -> torch.Tensor:
    return cosine_bwd(pred, target, ids, stats, g_loss, traced=True)


def _setup(ctx, inputs, output):
    pred, target, ids = inputs
    ctx.save_for_backward(pred, target, ids, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)     # the stats output's gradient is never used: no zero-fill launch


def _grads(ctx, g_loss, bwd):
    pred, target, ids, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or g_loss is None:
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
def cosine_distill_loss(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Fused :func:`rectok_fast.ops.reference.cosine_distill_loss` (fp32 scalar, no grad to target)."""
    check_cosine_distill_loss(pred, target, ids)
    check_tensor(_OP, "pred", pred)
    check_tensor(_OP, "target", target)
    if ids is not None:
        if ids.shape[1] == 0:
            return (pred.float() * 0.0).sum()      # the reference's zero loss, still connected to pred
        if ids.device.type in registry.HOST_CHECKED_DEVICES or use_custom_op():
            # CPU: the host check. CUDA: the forward kernel asserts the range in eager launches; the
            # custom op (no assert in traced kernels) keeps the registry's device-side check, which
            # torch.compile skips
            check_ids_range(ids, target.shape[1])
    if pred.numel() == 0:
        raise ValueError(f"{_OP}: pred {tuple(pred.shape)} is empty; the mean over no rows is undefined")
    if use_custom_op():
        loss, _ = torch.ops.rectok_fast.cosine_distill_fwd(pred, target.detach(), ids)
    else:
        loss, _ = _CosineDistill.apply(pred, target.detach(), ids)
    return loss


def _stats_in_torch(pred, target, ids):
    """The forward's per-row statistics computed with torch ops (samples that must not launch a kernel)."""
    if ids is not None:
        target = torch.gather(target, 1, ids.long()[..., None].expand(-1, -1, target.shape[-1]))
    p_norm, f_norm = pred.float().norm(dim=-1).flatten(), target.float().norm(dim=-1).flatten()
    rp, rf = 1.0 / p_norm.clamp_min(COSINE_EPS), 1.0 / f_norm.clamp_min(COSINE_EPS)
    cos = (pred.float() * target.float()).sum(-1).flatten() * rp * rf
    return torch.stack([rp, rf, torch.where(p_norm > COSINE_EPS, cos, 0.0)])


def opcheck_samples(device) -> list:
    """One sample call per registered op (forward and backward) for torch.library.opcheck."""
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 5, generator=g).to(device).requires_grad_(True)
    target = torch.randn(2, 4, 5, generator=g).to(device)
    ids = torch.tensor([[0, 3, 3], [2, 1, 0]], device=device)
    full = torch.randn(2, 3, 5, generator=g).to(device)
    out = []
    for t, i in ((target, ids), (full, None)):
        stats = _stats_in_torch(pred.detach(), t, i)
        out.append(("rectok_fast::cosine_distill_fwd", (pred, t, i)))
        out.append(("rectok_fast::cosine_distill_bwd", (pred.detach(), t, i, stats, torch.tensor(1.5, device=device))))
    return out
