"""The training loop, the same for all three stages (:mod:`rectok_fast.training.stages`).

Each optimizer step takes ``grad_accum`` micro batches from every data-parallel rank this process feeds
(one, or R with ``--emulate_ranks R``), hands them to ``stage.train_step`` and sets the LR of the
fractional epoch. Micro batch m of step k holds samples ``[k*G + m*B, k*G + (m+1)*B)`` of the epoch
order (:mod:`rectok_fast.data.plan`) and its randomness is counter-based on (seed, step, m)
(:func:`rectok_fast.training.stages.seed_step`), m being the GLOBAL micro-batch index: a resumed run
draws what the uninterrupted run drew, also on another world size (up to the gradient reduction order),
and one process emulating R ranks computes what R DeepSpeed processes compute -- the reference path of
the data-parallel check. Non-finite gradients skip the update on every rank (the engines compare the
global gradient norm, identical on all ranks) and are counted; ``--max_bad_steps`` in a row stop the run.
SIGTERM / SIGUSR1 stop every rank after the step in flight, with a complete checkpoint of it
(:mod:`rectok_fast.training.preemption`); ``--resume`` may run on another number of processes
(:func:`rectok_fast.training.checkpointer.plan_resume`).
"""
from __future__ import annotations

import math
import os
import random
import shutil
import sys
import threading
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from rectok_fast.data.plan import global_micro_index
from rectok_fast.training.checkpointer import Checkpointer, plan_resume
from rectok_fast.training.engine import all_reduce_, barrier
from rectok_fast.training.hooks import TrainHooks
from rectok_fast.training.logging import MetricLogger, plot_losses
from rectok_fast.training.preemption import EXIT_PREEMPTED, PreemptionHandler
from rectok_fast.training.resume import tag_for
from rectok_fast.training.schedule import lr_at
from rectok_fast.training.stages import RunContext, build_stage


PREEMPTED_MARKER = "PREEMPTED"   # <output_dir>/PREEMPTED: torchrun reports any failed worker as exit code 1


class TrainingDiverged(RuntimeError):
    pass


def loud(msg: str, rank: int = 0) -> None:
    if rank == 0:
        bar = "!" * 100
        print(f"\n{bar}\n!!! {msg}\n{bar}", file=sys.stderr, flush=True)


def pretrained_summary(stage) -> str:
    width = max((len(n) for n, _ in stage.pretrained), default=0)
    lines = [f"  {net:<{width}}  {src}" for net, src in stage.pretrained] or ["  (none)"]
    return "[rectok_fast] pretrained nets (file loaded, or RANDOM):\n" + "\n".join(lines)


def micro_batches(loaders, start: int, total: int, spe: int, accum: int, rank0: int, data_parallel: int = 1):
    """(step, chunks) for steps start..total-1: ``accum`` consecutive micro batches of each loader per
    step (a loader's leftover micro batches at the end of an epoch, fewer than ``accum``, are dropped).
    Data-parallel rank ``rank0 + r`` (of ``data_parallel``) at accumulation step a trains the step's micro
    batch m = a * data_parallel + rank0 + r (:func:`rectok_fast.data.plan.global_micro_index`): the
    loaders' plan gives it samples ``[m*B, (m+1)*B)`` of the step's global batch and the stage seeds its
    draws with m, so what micro batch m computes does not depend on the world size."""
    step = start
    while step < total:
        epoch = step // spe
        iters = [ld.epoch(epoch, start_step=(step % spe) * accum) for ld in loaders]
        for _ in range(step % spe, spe):
            if step >= total:
                return
            chunks = []
            for micro in range(accum):
                for r, it in enumerate(iters):
                    chunks.append(dict(next(it), rank=rank0 + r, micro=micro,
                                       m=global_micro_index(micro, rank0 + r, data_parallel)))
            yield step, chunks
            step += 1


def run(cfg, hooks: TrainHooks | None = None) -> dict:
    """Train as configured by ``cfg`` (a :class:`rectok_fast.training.config.RunConfig`)."""
    hooks = hooks or TrainHooks()
    ctx = RunContext.start(cfg)
    if os.environ.get("RECTOK_FAST_DETECT_ANOMALY"):
        torch.autograd.set_detect_anomaly(True)
    rank, world, R_emu = ctx.rank, ctx.world, cfg.runtime.emulate_ranks
    from rectok_fast import ops
    zero = (ctx.ds_config.get("zero_optimization") or {}).get("stage", 0) if ctx.use_deepspeed else None
    ctx.say(f"[rectok_fast] stage={cfg.stage} preset={cfg.preset} model={cfg.model.variant} device={ctx.device.type} "
            f"world={world} precision={'bf16' if ctx.bf16 else 'fp32'} engine="
            f"{'deepspeed ZeRO-' + str(zero) if ctx.use_deepspeed else 'plain pytorch'} backend={ops.get_backend()} "
            f"output={cfg.output_dir}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    found = None
    if cfg.checkpoint.resume:   # before the engines: the accumulation that keeps the saved global batch
        cfg, found = plan_resume(cfg, ctx)
    stage = build_stage(cfg, ctx)
    ctx.say(pretrained_summary(stage))
    if stage.stand_ins:
        loud("RANDOM STAND-INS (no local weights given) -- results are a smoke test, not a model: "
             + "; ".join(stage.stand_ins), rank)
    loaders = stage.loaders([rank * R_emu + r for r in range(R_emu)], cfg.data_parallel)
    accum = cfg.optim.grad_accum
    spe = loaders[0].steps_per_epoch // accum
    if spe < 1:
        raise ValueError(f"one epoch has {loaders[0].steps_per_epoch} micro batches per rank, fewer than "
                         f"--grad_accum {accum}: lower --grad_accum or --batch_size")
    total = int(math.floor(cfg.schedule.epochs * spe))
    if cfg.schedule.max_steps:
        total = min(total, cfg.schedule.max_steps)

    compiled = None
    if cfg.runtime.compile:
        # RECTOK_FAST_COMPILE_BACKEND: a torch.compile backend other than inductor (the tests use aot_eager:
        # it traces the same graphs, custom ops included, without inductor's ~30 s CPU codegen)
        backend = os.environ.get("RECTOK_FAST_COMPILE_BACKEND", "inductor")
        from torch._dynamo.utils import counters as dynamo_counters
        graphs_before = int(dynamo_counters["stats"]["unique_graphs"])
        how = stage.compile(backend)
        ctx.say(f"[rectok_fast] torch.compile ({backend}) of the trained model's forward ({how})")

    from rectok_fast.training.evaluation import PeriodicEvaluator, describe
    evaluator = PeriodicEvaluator(cfg, ctx, spe, total)
    ckpt = Checkpointer(cfg, ctx, spe, total)
    start, bad_total = ckpt.resume(stage, loaders, found) if found is not None else (0, 0)
    logger = MetricLogger(cfg.output_dir, enabled=rank == 0, resume=cfg.checkpoint.resume, start_step=start)
    logger.print(f"[rectok_fast] logging to {logger.backend} + {logger.jsonl_path}; {spe} steps/epoch, {total} steps, "
                 f"global batch {cfg.optim.global_batch} ({cfg.data.batch_size} x {accum} micro steps x "
                 f"{cfg.data_parallel} ranks), peak lr {cfg.optim.lr:.3g}")

    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, disable=rank != 0 or not cfg.runtime.progress, desc=cfg.stage,
               unit="step", dynamic_ncols=True, file=sys.stdout)
    step, bad_run, last_logs, preempted, last_eval = start, 0, {}, None, None
    preempt = PreemptionHandler()     # SIGTERM / SIGUSR1 only set a flag; the loop checks it between steps
    if threading.current_thread() is threading.main_thread():
        preempt.install()
    if rank == 0 and os.path.exists(os.path.join(cfg.output_dir, PREEMPTED_MARKER)):
        os.remove(os.path.join(cfg.output_dir, PREEMPTED_MARKER))    # this run continues the preempted one
    try:
        for step_i, chunks in micro_batches(loaders, start, total, spe, accum, rank * R_emu, cfg.data_parallel):
            epoch_f = step_i / spe
            lr = lr_at(cfg.schedule, epoch_f)
            stage.set_lr(lr)
            t0 = time.time()
            out = stage.train_step(chunks, step_i, epoch_f, hooks=hooks)
            step = step_i + 1
            bar.update(1)
            if out.skipped:
                bad_run, bad_total = bad_run + 1, bad_total + 1
                ctx.say(f"[rectok_fast] step {step_i}: non-finite gradient norm ({' and '.join(out.skipped)}), "
                        f"update skipped ({bad_run} in a row, {bad_total} in total)")
                if bad_run >= cfg.runtime.max_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_run} consecutive steps had non-finite (NaN/inf) gradients (last at step {step_i}); "
                        f"stopping. Lower the learning rate, check the data, or resume from the last checkpoint "
                        f"in {ckpt.root} with changed settings.")
            else:
                bad_run = 0
            dt = time.time() - t0
            evaluated = evaluator.evaluate(stage) if evaluator.due(step) else None   # rank 0's numbers
            if evaluated is not None:
                last_eval = evaluated
                logger.print(f"[rectok_fast] step {step} eval: {describe(evaluated, evaluator.num_images)}")
            if step % cfg.runtime.log_every == 0 or step == total or evaluator.due(step):
                last_logs = _log(out.logs, lr, epoch_f, dt, cfg, world, logger, step, bar, evaluated)
            saved = ckpt.due(step)
            if saved:
                ckpt.save(step, stage, loaders, bad_total)
            hooks.after_step(step)
            # one 1-element all-reduce per step: every rank stops at the same step boundary
            if step < total and all_reduce_(torch.tensor([preempt.local_flag()]), op=dist.ReduceOp.MAX).item() > 0:
                if not saved:
                    ckpt.save(step, stage, loaders, bad_total)
                preempted = preempt.signal_name or "a stop signal"
                break
    finally:
        preempt.uninstall()
        bar.close()
    if preempted:
        folder = os.path.join(ckpt.root, tag_for(step))
        if rank == 0:
            with open(os.path.join(cfg.output_dir, PREEMPTED_MARKER), "w") as fh:
                fh.write(f"{tag_for(step)}\n")
            logger.print(f"[rectok_fast] {preempted}: stopped after step {step} with a complete checkpoint "
                         f"{folder}; continue with --resume (exit code {EXIT_PREEMPTED})")
        logger.close()
        barrier()
        return {"steps": step, "checkpoint": folder, "last_logs": last_logs, "preempted": preempted,
                "bad_steps": bad_total, "pretrained": list(stage.pretrained)}
    folder = ckpt.save(step, stage, loaders, bad_total)
    skipped = int(all_reduce_(torch.tensor([float(sum(ld.skipped for ld in loaders))])).item())
    result = {"steps": step, "checkpoint": folder, "last_logs": last_logs, "skipped_images": skipped,
              "bad_steps": bad_total, "pretrained": list(stage.pretrained), "eval": last_eval}
    if cfg.runtime.compile:
        result["compiled_graphs"] = int(dynamo_counters["stats"]["unique_graphs"]) - graphs_before
        ctx.say(f"[rectok_fast] torch.compile: {result['compiled_graphs']} graph(s) compiled")
    grid = os.path.join(cfg.output_dir, "samples_grid.png" if cfg.stage == "dit" else "recon_grid.png")
    img = stage.final_images(grid)
    if rank == 0:
        shutil.copyfile(os.path.join(folder, "official.pth"), os.path.join(cfg.output_dir, "final.pth"))
        plot = plot_losses(cfg.output_dir)
        logger.print(f"[rectok_fast] done: {step} steps; final official-format weights {cfg.output_dir}/final.pth; "
                     f"images {img}; loss plot {plot}; metrics {logger.jsonl_path}")
        if last_eval is not None:
            logger.print(f"[rectok_fast] final evaluation: {describe(last_eval, evaluator.num_images)}")
        _final_warnings(result, stage, rank)
    logger.close()
    barrier()
    return result


def _log(logs, lr, epoch_f, dt, cfg, world, logger, step, bar, evaluated=None) -> dict:
    logs = {k: float(v) for k, v in logs.items()}   # the GPU sync: only on logged steps
    logs.update(lr=lr, epoch=epoch_f, step_time=dt, images_per_s=cfg.optim.global_batch / max(dt, 1e-9))
    if world > 1:   # mean over data-parallel ranks (same steps on every rank)
        keys = sorted(logs)
        vals = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
        all_reduce_(vals)
        logs = {k: float(v) / world for k, v in zip(keys, vals.tolist())}
    if evaluated:       # rank 0's evaluation (only rank 0 logs), after the mean over ranks
        logs.update(evaluated)
    logger.log(step, logs)
    postfix = dict(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
    if "val_psnr" in logs:
        postfix["val_psnr"] = f"{logs['val_psnr']:.2f}"
    bar.set_postfix(**postfix)
    return logs


def _final_warnings(result, stage, rank) -> None:
    if result["skipped_images"]:
        warnings.warn(f"{result['skipped_images']} unreadable images were skipped during training "
                      f"(set RECTOK_FAST_DATA_VERBOSE=1 to list them)")
        print(f"[rectok_fast] WARNING: {result['skipped_images']} unreadable images were skipped", flush=True)
    if result["bad_steps"]:
        print(f"[rectok_fast] WARNING: {result['bad_steps']} steps were skipped for non-finite gradients", flush=True)
    if stage.stand_ins:
        loud("REMINDER: these nets were RANDOM stand-ins: " + "; ".join(stage.stand_ins), rank)
