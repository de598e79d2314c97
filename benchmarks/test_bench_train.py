"""Training step time: tokenizer stage-1 step and DiT step, reference vs fused ops (and
torch.compile where it is cheap to build), with peak memory in extra_info.

CPU: the tiny presets (rectok_tiny 32 px, 2-layer DiT). CUDA: the real shapes -- rectok_BB at 256 px
with batch 64 (random stand-in teacher/perceptual nets) and DiT^DH-XL with batch 64 on 16x16x128
latents, whose FLOPs are counted so record() reports the MFU against the measured bf16 matmul rate.
"""
from __future__ import annotations

import contextlib
import os
import resource

import pytest
import torch

from conftest import record, sync_wrap
from rectok_fast import ops

CUDA = torch.cuda.is_available()


def _task(stage, device):
    from rectok_fast.training.config import parse_args
    from rectok_fast.training.trainer import DiTTask, TokenizerTask
    from rectok_fast.training.ema import EMA
    argv = ["--stage", stage, "--output_dir", "/tmp/rectok_bench", "--no_progress"]
    if CUDA:
        argv += ["--preset", "official", "--batch_size", "64", "--lr", "1e-4", "--stats_images", "64",
                 "--data_path", os.environ.get("RECTOK_BENCH_DATA", "")] if os.environ.get("RECTOK_BENCH_DATA") \
            else ["--preset", "official", "--batch_size", "64", "--lr", "1e-4", "--stats_images", "64"]
    else:
        argv += ["--preset", "tiny", "--batch_size", "4"]
    args = parse_args(argv)
    args.disc_start_epoch = 0
    task = (DiTTask(args, device, 0, 1, lambda: None) if stage == "dit" else TokenizerTask(args, device, 0))
    ema = EMA(task.model, args.ema_decay)
    task.engines(args, args.lr or 1e-4, None, CUDA)
    return args, task, ema


def _flops_dit(task, batch):
    """fwd+bwd = 3 x fwd; fwd = 2 x params x tokens (matmuls) + attention 4 x T^2 x width per layer."""
    m, cfg = task.model, task.model.config
    t = cfg.num_tokens
    params = sum(p.numel() for n, p in m.named_parameters() if "embedder" not in n)
    attn = 4 * t * t * (cfg.hidden_size * cfg.depth + cfg.head_hidden_size * cfg.head_depth)
    return 3 * batch * (2 * params * t + attn)


@pytest.mark.parametrize("stage", ["tokenizer", "dit"])
@pytest.mark.parametrize("mode", ["reference", "fused", "compile"])
def test_train_step(benchmark, stage, mode, bench_device):
    if mode == "compile" and not (CUDA or os.environ.get("RECTOK_BENCH_COMPILE")):
        pytest.skip("torch.compile on CPU takes minutes to build; set RECTOK_BENCH_COMPILE=1")
    backend = "reference" if mode == "reference" else ("fused" if mode == "fused" else "auto")
    if mode == "fused":
        try:
            with ops.use_backend("fused"):
                ops.cosine_distill_loss(torch.randn(2, 3, 4, device=bench_device), torch.randn(2, 3, 4, device=bench_device))
        except Exception as exc:
            pytest.skip(f"fused backend unavailable: {exc}")
    with ops.use_backend(backend):
        args, task, ema = _task(stage, bench_device)
        if mode == "compile":
            task.G.call = torch.compile(task.G.module)
        from rectok_fast.data import build_source, TrainLoader
        ld = TrainLoader(build_source(), args.img_size, args.batch_size, seed=0, num_workers=0)
        batch = next(ld.epoch(0))
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if CUDA else contextlib.nullcontext
        chunk = [dict(batch, rank=0)]
        state = {"step": 0}

        def step():
            task.train_step(chunk, state["step"], 1.0, autocast, ema, lambda losses: True)
            state["step"] += 1
        step()
        step()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        benchmark.group = f"train step {stage}"
        benchmark.extra_info["impl"] = {"reference": "eager", "fused": "fused", "compile": "compiled"}[mode]
        benchmark.pedantic(sync_wrap(step), rounds=5 if not CUDA else 10, iterations=1)
    peak = (torch.cuda.max_memory_allocated() if CUDA
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    flops = _flops_dit(task, args.batch_size) if stage == "dit" else None
    record(benchmark, flops=flops, stage=stage, mode=mode, batch=args.batch_size, model=args.model,
           peak_memory_bytes=int(peak), peak_memory_kind="cuda_max_allocated" if CUDA else "process_max_rss")
