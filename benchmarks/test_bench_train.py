"""Training step of the generator: DiT^DH-XL with our ops vs the reference, eager and torch.compile'd.

    pytest benchmarks/test_bench_train.py --benchmark-only [-k compiled]

One step = flow-matching loss on latents (B, 128, 16, 16) (rectok_fast.flow.dit_training_loss, the
stage's loss) + backward + AdamW step, under bf16 autocast on CUDA. Modes:

* ``compiled_reference``: torch.compile(model) traced with the reference ops (the baseline of the goal);
* ``compiled_fused``: torch.compile(model) traced under the ``auto`` backend (our fused ops where they
  apply; goal: >= 1.1x compiled_reference);
* ``eager`` (reference ops) and ``fused`` (our ops, eager).

CUDA: DiT^DH-XL (1152 wide, 28 blocks, 2048-wide 2-block head) at batch 32, timed with CUDA events,
one step per round (no graph: the optimizer step is not capturable as written; a step is far larger
than L2). CPU: a 2-block DiT^DH on 4x4x8 latents, host clock, eager modes only unless
RECTOK_BENCH_COMPILE=1 (a CPU compile takes minutes). FLOPs are counted so the JSON quotes the MFU
against the bf16 matmul measured in the same run.
"""
from __future__ import annotations

import os

import pytest
import torch

import cases
from conftest import record
from rectok_fast import ops
from timing import measure

CUDA = torch.cuda.is_available()
MODES = ["compiled_reference", "compiled_fused", "eager", "fused"]
BATCH = 32 if CUDA else 4


def _model(dev):
    from rectok_fast.models.dit import build_dit
    if CUDA and not cases.TINY:
        model = build_dit("ditdh_xl")
    elif cases.TINY:
        model = build_dit("ditdh_tiny")
    else:
        model = build_dit("ditdh_s", input_size=4, in_channels=8, depth=2, head_hidden_size=64, head_num_heads=2,
                          num_classes=10)
    model = model.to(dev).train()
    with torch.no_grad():        # the official init zeroes the adaLN outputs: give every op real work
        for p in model.parameters():
            if p.dim() and not p.abs().sum():
                p.normal_(0, 0.02)
    return model


def _flops(model, batch: int) -> float:
    """fwd + bwd = 3 x fwd; fwd = 2 x params x tokens (matmuls) + attention 4 x T^2 x width per block."""
    cfg = model.config
    t = cfg.num_tokens
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    attn = 4 * t * t * (cfg.hidden_size * cfg.depth + cfg.head_hidden_size * cfg.head_depth)
    return 3 * batch * (2 * params * t + attn)


@pytest.mark.parametrize("mode", MODES)
def test_train_step_dit(benchmark, bench_device, mode):
    if mode.startswith("compiled") and not CUDA and not os.environ.get("RECTOK_BENCH_COMPILE"):
        pytest.skip("torch.compile of the DiT on CPU takes minutes; set RECTOK_BENCH_COMPILE=1")
    from rectok_fast.flow import dit_time_shift, dit_training_loss
    dev = bench_device
    backend = {"compiled_reference": "reference", "compiled_fused": "auto", "eager": "reference",
               "fused": "auto"}[mode]
    torch.manual_seed(0)
    model = _model(dev)
    cfg = model.config
    call = torch.compile(model) if mode.startswith("compiled") else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    x1 = torch.randn(BATCH, cfg.in_channels, cfg.input_size, cfg.input_size, device=dev)
    y = torch.randint(0, cfg.num_classes, (BATCH,), device=dev)
    shift = dit_time_shift(cfg.input_size, cfg.input_size, cfg.in_channels)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=CUDA):
            loss = dit_training_loss(call, x1, y, shift)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with ops.use_backend(backend):
        chosen = {op: ops.implementation_for(op, dev) for op in ("adaln_modulate", "gated_residual")}
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        benchmark.group = f"train step {'ditdh_xl' if CUDA and not cases.TINY else 'small DiT^DH'} b{BATCH}"
        record(benchmark, flops=_flops(model, BATCH), impl=mode, stage="dit", batch=BATCH, backend=backend,
               implementations=chosen)
        measure(benchmark, step, rounds=5 if CUDA else (2 if cases.TINY else 3), warmup=1 if cases.TINY else 2,
                graph=False, calls=1)
    if CUDA:
        benchmark.extra_info.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
                                    peak_memory_kind="cuda_max_allocated")
