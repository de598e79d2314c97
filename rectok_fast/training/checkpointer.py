"""Owns the run's checkpoints: when to save, what a checkpoint holds, resuming, milestones, pruning.

A checkpoint (``<output_dir>/checkpoints/step_XXXXXXXX``, layout in :mod:`rectok_fast.training.resume`)
holds every engine's state (optimizer included), the EMA, the trainer state (step, data layout,
counters) and an official-format, self-describing export. Milestones -- the checkpoints at every
multiple of ``--keep_every_epochs`` epochs -- are saved whether or not ``--ckpt_every`` hits them and
are never pruned. All methods are collective: every rank calls them in the same order.

Saving: every rank writes its own shards, then :func:`rectok_fast.training.manifest.write_manifest`
(each rank hashes its own files, rank 0 writes ``COMPLETE`` last), then ``latest`` and pruning.
Resuming (:func:`plan_resume`, before the engines exist): verify the manifest, keep the saved global
batch on this world size (accumulation recomputed), continue after the samples consumed; engines saved
on another world size are resharded through DeepSpeed's universal checkpoint
(:func:`rectok_fast.training.elastic.load_any_world`).
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch

from rectok_fast.training import manifest
from rectok_fast.training import resume as R
from rectok_fast.training.engine import all_reduce_, barrier


def engine_kind(ctx) -> tuple[int, str]:
    """(ZeRO stage, engine kind) recorded in, and expected from, a checkpoint's manifest."""
    if not ctx.use_deepspeed:
        return 0, "plain"
    return int((ctx.ds_config.get("zero_optimization") or {}).get("stage", 0)), "deepspeed"


@dataclasses.dataclass
class ResumePoint:
    folder: str
    manifest: dict
    plan: dict          # elastic.resume_plan: grad_accum, start_step, message


def plan_resume(cfg, ctx):
    """Collective; before the engines are built (their accumulation depends on it). Pick the newest
    complete checkpoint, verify its manifest (sizes, hashes, engine and ZeRO stage), and work out how
    to continue on this world size with the same global batch. Returns (cfg with the accumulation,
    global batch and lr of the saved run, :class:`ResumePoint`)."""
    from rectok_fast.training import elastic
    root = os.path.join(cfg.output_dir, "checkpoints")
    tag = R.find_resume_tag(root) if ctx.rank == 0 else None
    if ctx.world > 1:
        obj = [tag]
        torch.distributed.broadcast_object_list(obj, src=0)
        tag = obj[0]
    if tag is None:
        raise RuntimeError(f"--resume: no complete checkpoint in {root}")
    folder = os.path.join(root, tag)
    zero, kind = engine_kind(ctx)
    found = manifest.verify_collective(folder, expect={"zero_stage": zero, "engine": kind})
    ctx.say(f"[rectok_fast] resume: {folder}: {manifest.describe(found)}")
    dp = cfg.data_parallel
    plan = elastic.resume_plan(found, cfg.data.batch_size, dp,
                               grad_accum=cfg.optim.grad_accum if cfg.optim.grad_accum_explicit else None)
    ctx.say(f"[rectok_fast] {plan['message']}")
    gb = int(found["global_batch"])
    # the peak lr follows the global batch (blr x global batch / 256) unless --lr fixed it: keep the saved run's
    lr = cfg.optim.lr if cfg.optim.lr_explicit else cfg.optim.lr * gb / cfg.optim.global_batch
    optim = dataclasses.replace(cfg.optim, grad_accum=plan["grad_accum"], global_batch=gb, lr=lr)
    cfg = dataclasses.replace(cfg, optim=optim, schedule=dataclasses.replace(cfg.schedule, lr=lr))
    return cfg, ResumePoint(folder, found, plan)


class Checkpointer:
    def __init__(self, cfg, ctx, steps_per_epoch: int, total_steps: int):
        """``cfg``: the RunConfig; the data layout it records must match on resume."""
        self.cfg, self.ctx = cfg, ctx
        self.root = os.path.join(cfg.output_dir, "checkpoints")
        self.spe, self.total = int(steps_per_epoch), int(total_steps)
        self.every = cfg.checkpoint.ckpt_every
        self.milestones = self.milestone_steps(cfg.checkpoint.keep_every_epochs, self.spe, self.total)
        self.layout = {"world": ctx.world, "emulate_ranks": cfg.runtime.emulate_ranks,
                       "batch_size": cfg.data.batch_size, "grad_accum": cfg.optim.grad_accum}
        self.zero_stage, self.engine_kind = engine_kind(ctx)

    @staticmethod
    def milestone_steps(every_epochs: float, spe: int, total: int) -> set[int]:
        """The optimizer steps that end epoch k * every_epochs (k >= 1), before the last step."""
        if not every_epochs or spe <= 0:
            return set()
        out, k = set(), 1
        while True:
            s = int(math.floor(k * every_epochs * spe + 1e-9))
            if s >= total:
                return out
            if s > 0:
                out.add(s)
            k += 1

    def due(self, step: int) -> bool:
        """Save after ``step`` finished steps? (The final checkpoint is saved by the loop itself.)"""
        return step < self.total and ((self.every and step % self.every == 0) or step in self.milestones)

    # ---- resume -------------------------------------------------------------------------------------
    def resume(self, stage, loaders, found: "ResumePoint") -> tuple[int, int]:
        """Restore the checkpoint chosen by :func:`plan_resume` into the stage, whatever world size it
        was saved on; returns (step, bad steps so far)."""
        from rectok_fast.checkpoint import safe_torch_load
        from rectok_fast.training import elastic
        folder = found.folder
        state = safe_torch_load(os.path.join(folder, "trainer.pt"))
        start = int(found.plan["start_step"])
        if int(state["step"]) != start:
            raise RuntimeError(f"--resume: {folder}/trainer.pt says step {int(state['step'])}, its manifest "
                               f"{found.manifest.get('samples_consumed')} samples = step {start}: mixed checkpoint")
        saved_spe = found.manifest.get("steps_per_epoch")
        if saved_spe is not None and int(saved_spe) != self.spe:
            raise RuntimeError(f"--resume: {folder} was written with {saved_spe} steps per epoch, this run has "
                               f"{self.spe} (--no_drop_last pads the epoch per world size); the epoch position "
                               f"would not carry over. Resume on {found.manifest.get('world_size')} processes.")
        for e in stage.engine_list:
            how = elastic.load_any_world(e, folder, e.name)
            if how["how"] != "native":
                self.ctx.say(f"[rectok_fast] {e.name}: optimizer state resharded from {how['saved_world']} to "
                             f"{how['world']} processes (DeepSpeed universal checkpoint)")
        stage.ema.load(safe_torch_load(os.path.join(folder, "ema.pt")))
        if self.ctx.rank == 0:   # the saved count is the all-rank total; the end-of-run all-reduce sums again
            loaders[0].skipped = int(state.get("skipped", 0))
        self.ctx.say(f"[rectok_fast] resumed from {folder} at step {start}")
        return start, int(state.get("bad_steps_total", 0))

    # ---- save ---------------------------------------------------------------------------------------
    def save(self, step: int, stage, loaders, bad_steps_total: int) -> str:
        from rectok_fast.checkpoint import atomic_torch_save
        rank = self.ctx.rank
        tag = R.tag_for(step)
        folder = os.path.join(self.root, tag)
        os.makedirs(folder, exist_ok=True)
        barrier()
        for e in stage.engine_list:
            e.save(folder, e.name)
        skipped = int(all_reduce_(torch.tensor([float(sum(ld.skipped for ld in loaders))])).item())
        epoch = step / self.spe
        stage.export(os.path.join(folder, "official.pth"), epoch=int(step // self.spe), step=step,
                     args=dict(self.cfg.flags))
        if rank == 0:
            atomic_torch_save(stage.ema.state_dict(), os.path.join(folder, "ema.pt"))
            atomic_torch_save({"step": step, "epoch": epoch, **self.layout, "bad_steps_total": bad_steps_total,
                               "skipped": skipped}, os.path.join(folder, "trainer.pt"))
        # every rank hashes its own files; rank 0 writes the manifest (COMPLETE) last
        gb = self.cfg.optim.global_batch
        manifest.write_manifest(folder, step=step, samples_consumed=step * gb, zero_stage=self.zero_stage,
                                extra={"global_batch": gb, "engine": self.engine_kind,
                                       "steps_per_epoch": self.spe, "milestone": step in self.milestones})
        if rank == 0:
            R._atomic_write_text(os.path.join(self.root, R.LATEST), tag)
            R.prune(self.root, self.cfg.checkpoint.keep_last)
        barrier()
        return folder
