"""The goal shapes, in one place: the kernel benchmarks, the AdaLN benchmarks and the static report
(benchmarks/static_report.py) all build their inputs here.

Goal shapes (issue 10; spec section 9): 256 tokens, widths 768 / 1152 / 2048, latent channels 128,
teacher dim 1024, batch 64. ``RECTOK_BENCH_TINY=1`` (the CPU dry run of gpu_suite.sh) shrinks every
case to a few kilobytes while keeping its structure (masking, per-token modulation, velocity output).

Each case's ``make(device)`` returns a :class:`Case`: the call, the tensors that get gradients, the
output seeds, and the op's minimal traffic (each input read once, each output written once), which is
the same figure for every implementation, so "fraction of copy" compares like with like.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

TINY = os.environ.get("RECTOK_BENCH_TINY", "0") not in ("", "0")
B = 2 if TINY else 64          # batch (the goal's 32-64: the upper end fills an H200)
N = 16 if TINY else 256        # tokens
MASK_RATIO = 0.4               # fraction of tokens the cosine loss picks in masked mode


def _w(width: int) -> int:
    """A goal width, or a small multiple of 16 in tiny mode (keeps vector paths aligned)."""
    return max(16, width // 32) if TINY else width


@dataclass
class Case:
    call: Callable                 # fn -> tuple of outputs
    grad_inputs: list              # tensors the backward differentiates
    seeds: list                    # one gradient per differentiated output (None: output unused)
    bytes_fwd: int
    bytes_bwd: int
    info: dict = field(default_factory=dict)

    def outputs_with_seeds(self, outs):
        """(outputs, seeds) restricted to the outputs that get a gradient (training leaves e.g. z unused)."""
        pairs = [(o, s) for o, s in zip(outs, self.seeds) if s is not None]
        return [o for o, _ in pairs], [s for _, s in pairs]


def _gen(device):
    dev = torch.device(device)
    return torch.Generator(device=dev).manual_seed(0), dev


# ------------------------------------------------------------------------------------------- P1: cosine
def cosine(D: int, masked: bool):
    """All tokens, or the masked mode: pred (B, M, D) predicts the target rows picked by ids (B, M)."""
    def make(device):
        g, dev = _gen(device)
        d, dt = _w(D), torch.bfloat16
        m = max(1, int(MASK_RATIO * N)) if masked else N
        pred = torch.randn(B, m, d, generator=g, device=dev).to(dev, dt).requires_grad_(True)
        target = torch.randn(B, N, d, generator=g, device=dev).to(dev, dt)
        ids = torch.rand(B, N, generator=g, device=dev).argsort(dim=1)[:, :m].to(dev) if masked else None
        rows, s = B * m, pred.element_size()
        ids_bytes = ids.numel() * ids.element_size() if masked else 0
        fwd = 2 * rows * d * s + ids_bytes             # read pred and the picked target rows
        bwd = 3 * rows * d * s + ids_bytes             # read both again, write dL/dpred
        return Case(lambda fn: (fn(pred, target, ids),), [pred], [torch.ones((), device=dev)], fwd, bwd,
                    dict(shape=[B, N, d], rows=m, dtype="bfloat16", masked=masked))
    return make


# --------------------------------------------------------------------------------------- P2: flow
def flow(shape, velocity: bool):
    def make(device):
        g, dev = _gen(device)
        shp = (B, *((min(s, 8) for s in shape) if TINY else shape))
        x = torch.randn(shp, generator=g, device=dev).to(dev).requires_grad_(True)
        noise = torch.randn(shp, generator=g, device=dev).to(dev).requires_grad_(True)
        t = torch.rand(shp[0], generator=g, device=dev).to(dev)
        n_out = 2 if velocity else 1
        nb = x.numel() * x.element_size()
        seeds = [torch.randn(shp, generator=g, device=dev).to(dev) for _ in range(n_out)]

        def call(fn):
            r = fn(x, noise, t, return_velocity=velocity)
            return tuple(r) if velocity else (r,)
        return Case(call, [x, noise], seeds, (2 + n_out) * nb, (n_out + 2) * nb,
                    dict(shape=list(shp), dtype="float32", velocity=velocity))
    return make


# ---------------------------------------------------------------------------------- P2: posterior
def posterior(C: int):
    def make(device):
        g, dev = _gen(device)
        c = _w(C)
        moments = torch.randn(B, N, 2 * c, generator=g, device=dev).to(dev, torch.bfloat16).requires_grad_(True)
        e1 = torch.randn(B, N, c, generator=g, device=dev).to(dev)
        e2 = torch.randn(B, N, c, generator=g, device=dev).to(dev)
        tau = torch.rand(B, generator=g, device=dev).to(dev)
        sm, se, n = moments.element_size(), e1.element_size(), B * N * c
        # Training uses z_tau and the KL; z itself gets no gradient (seed None).
        fwd = n * (2 * sm + 2 * se + 2 * 4) + B * 4        # moments, eps x2 -> z, z_tau (fp32), kl
        bwd = n * (2 * sm + se + 4 + 2 * sm) + B * 4       # moments, eps_post, g_z_tau -> g_moments
        seeds = [None, torch.randn(B, N, c, generator=g, device=dev).to(dev), torch.full((B,), 1.0 / B, device=dev)]
        return Case(lambda fn: tuple(fn(moments, e1, e2, tau, 1.0)), [moments], seeds, fwd, bwd,
                    dict(shape=[B, N, 2 * c], dtype="bfloat16"))
    return make


# op -> (public name in rectok_fast.ops, {case name: builder})
KERNEL_CASES = {
    "cosine": ("cosine_distill_loss", {
        "cosine_D1024_all": cosine(1024, False),
        "cosine_D1024_mask40": cosine(1024, True),
        "cosine_D768_all": cosine(768, False),
        "cosine_D768_mask40": cosine(768, True),
    }),
    "flow": ("flow_interpolate", {
        "flow_64x256x128": flow((N, 128), False),
        "flow_64x128x16x16_vel": flow((128, 16, 16), True),
    }),
    "posterior": ("posterior_flow_noise", {
        "posterior_64x256x256": posterior(128),
    }),
}


# One case per code path (masking, velocity): what `static_report.py --fast` compiles. The D = 768 cases
# take the same paths as D = 1024 with other block sizes.
FAST_CASES = ("cosine_D1024_all", "cosine_D1024_mask40", "flow_64x256x128", "flow_64x128x16x16_vel",
              "posterior_64x256x256")


# ------------------------------------------------------------------------------------- P3: AdaLN
@dataclass
class AdalnCase:
    args: tuple                    # op arguments
    op_grad_inputs: tuple          # the op's own inputs (shift/scale/gate are chunk views)
    ada: torch.Tensor              # the (B, [N,] 6D) adaLN output the chunks come from
    chunks: tuple                  # the chunk views the op reads
    dy: torch.Tensor
    bytes: dict                    # fwd / bwd / full minimal traffic of the op itself
    chunk_grad_bytes: int          # assembling the (B, [N,] 6D) gradient from the chunk gradients


ADALN_SHAPES = {                   # name -> (D, modulation): per-sample in the DiT blocks, per-token P3
    "D1152_sample": (1152, "sample"),
    "D1152_token": (1152, "token"),
    "D2048_sample": (2048, "sample"),
}


def adaln(op: str, D: int, mod: str, device, dtype=torch.bfloat16, batch: int | None = None) -> AdalnCase:
    """One AdaLN op call at width D with per-sample or per-token modulation (``batch`` overrides B: the
    CPU benchmarks use a smaller batch)."""
    g, dev = _gen(device)
    d = _w(D)
    B = batch or globals()["B"]
    x = torch.randn(B, N, d, generator=g, device=dev).to(dev, dtype).requires_grad_(True)
    ada = 0.5 * (torch.randn(B, N, 6 * d, generator=g, device=dev) if mod == "token" else torch.randn(B, 6 * d, generator=g, device=dev))
    ada = ada.to(dev, dtype).requires_grad_(True)
    shift, scale, gate = ada.chunk(6, dim=-1)[:3]
    dy = torch.randn(B, N, d, generator=g, device=dev).to(dev, dtype)
    if op == "adaln_modulate":
        w = (1 + 0.1 * torch.randn(d, generator=g, device=dev)).to(dev).requires_grad_(True)
        args, own, chunks = (x, w, shift, scale), (x, w, shift, scale), (shift, scale)
    else:
        y = torch.randn(B, N, d, generator=g, device=dev).to(dev, dtype).requires_grad_(True)
        args, own, chunks = (x, gate, y), (x, gate, y), (gate,)
    nbytes, chunk_grad = adaln_bytes(op, d, mod, x.element_size(), batch=B)
    return AdalnCase(args, own, ada, chunks, dy, nbytes, chunk_grad)


def adaln_bytes(op: str, d: int, mod: str, s: int, batch: int | None = None) -> tuple[dict, int]:
    """Minimal traffic of one AdaLN op call (fwd / bwd / full) and of the chunk gradient, element size s."""
    B = batch or globals()["B"]
    xe = B * N * d
    me = B * d * (N if mod == "token" else 1)          # elements of one modulation chunk
    if op == "adaln_modulate":
        # fwd: read x, shift, scale, w; write out (+ the fp32 rstd per row the backward reuses)
        fwd = 2 * xe * s + 2 * me * s + 4 * d + 4 * B * N
        # bwd: read dy, x, scale, rstd; write dx, dscale, dw; per token, dshift is dy itself (no bytes);
        # per sample it is a (B, D) reduction
        bwd = 3 * xe * s + 2 * me * s + 4 * B * N + 4 * d + (0 if mod == "token" else B * d * s)
        n_chunks = 2
    else:
        fwd = 3 * xe * s + me * s                       # read x, y, gate; write out
        bwd = 3 * xe * s + 2 * me * s                   # read dout, y, gate; write dy, dgate (dx is dout)
        n_chunks = 1
    chunk_grad = 6 * me * s + n_chunks * me * s         # read the chunk gradients, write (B, [N,] 6D)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}, chunk_grad
