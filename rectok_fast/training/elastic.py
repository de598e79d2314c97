"""Resume an engine on a different number of processes, keeping the global batch.

A DeepSpeed checkpoint saved under ZeRO-1/2/3 (or the bf16 section, whose optimizer partitions the
fp32 master even at ZeRO-0) holds one optimizer shard per data-parallel rank; DeepSpeed itself refuses
to load it on another world size. The way across is DeepSpeed's *universal checkpoint*: rank 0 runs
``deepspeed.checkpoint.ds_to_universal`` once on the saved engine folder (one folder per parameter
holding its full fp32 value, Adam moments and step), and every rank of the new world loads its
partition of that with ``load_universal``. The conversion runs at resume time and only when the world
size changed, so periodic saves cost nothing extra.

Measured with DeepSpeed 0.19.8 on CPU/gloo (tests/test_elastic.py, our torch AdamW with two param
groups as the client optimizer), the universal path needs three corrections that this module applies:

* ZeRO-1/2 checkpoints lack ``universal_checkpoint_info`` (only Megatron-style clients set it):
  converted with ``inject_missing_state``.
* ZeRO-3 universal load copies the hyper-parameters of param group 0 onto EVERY group: the decayed
  group silently loses its weight decay (group 0 is the no-decay group). The engine's own groups
  (built from this run's flags) are restored after the load.
* ZeRO-3 universal load puts ONE ``step`` tensor object into the state of every sub-group; torch
  AdamW increments it in place once per sub-group per step, so Adam's bias correction runs ahead
  (step 9 instead of 6 after three steps with two groups). Each state gets its own copy.

Also worked around, not specific to resuming: DeepSpeed links the per-parameter views of the
optimizer state (``safe_get_full_optimizer_state``) after the FIRST param group's step, before torch
AdamW created the state of the later groups, so those views stay empty under ZeRO-1/2;
:func:`relink_optimizer_state` links them again.

Unpartitioned engines (ZeRO-0 with fp32 weights, and :class:`PlainEngine`) keep the whole optimizer
state on every rank: their checkpoints load on any world size as they are.
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shutil

import torch
import torch.distributed as dist

UNIVERSAL_SUFFIX = ".universal"      # <checkpoint>/<engine>.universal: the converted form, derived data
_OPTIM_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


class ElasticResumeError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- global batch ------------------------------------------------------------------------------------
def recompute_grad_accum(global_batch: int, micro_batch: int, world: int) -> int:
    """Accumulation steps that keep ``global_batch`` = micro batch x accumulation x world size.

    Raises a ValueError naming the flags to pass when ``global_batch`` is not a multiple of
    ``micro_batch * world``."""
    global_batch, micro_batch, world = int(global_batch), int(micro_batch), int(world)
    if min(global_batch, micro_batch, world) < 1:
        raise ValueError(f"global batch {global_batch}, --batch_size {micro_batch} and world size {world} "
                         f"must all be >= 1")
    per_step = micro_batch * world
    if global_batch % per_step == 0:
        return global_batch // per_step
    fits = [b for b in range(micro_batch, 0, -1) if global_batch % (b * world) == 0]
    hint = (f"pass --batch_size {fits[0]} (then --grad_accum {global_batch // (fits[0] * world)})"
            if fits else f"run on a number of processes that divides {global_batch}")
    raise ValueError(f"cannot keep the global batch {global_batch} on {world} processes with --batch_size "
                     f"{micro_batch}: {global_batch} is not a multiple of {micro_batch} x {world} = {per_step}; "
                     f"{hint}")


def resume_plan(saved: dict, micro_batch: int, world: int, grad_accum: int | None = None) -> dict:
    """How to continue a run saved with ``saved`` = ``{"global_batch", "samples_consumed", "world_size"}``
    (manifest keys) on ``world`` processes with micro batch ``micro_batch``.

    Returns ``{"grad_accum", "start_step", "message"}``: the accumulation that keeps the global batch,
    the optimizer step to continue from (samples consumed / global batch) and one line for the log.
    ``grad_accum`` (the user's explicit ``--grad_accum``, None when not given) must agree with it."""
    gb, consumed = int(saved["global_batch"]), int(saved["samples_consumed"])
    accum = recompute_grad_accum(gb, micro_batch, world)
    if grad_accum is not None and int(grad_accum) != accum:
        raise ValueError(f"--grad_accum {grad_accum} would change the global batch from {gb} to "
                         f"{micro_batch * int(grad_accum) * world}; the checkpoint needs --grad_accum {accum} "
                         f"with --batch_size {micro_batch} on {world} processes (or leave --grad_accum out)")
    if consumed % gb:
        raise ValueError(f"the checkpoint consumed {consumed} samples, not a whole number of global batches "
                         f"of {gb}: it was not written at a step boundary")
    saved_world = saved.get("world_size")
    msg = (f"resume: global batch {gb} kept on {world} processes x --batch_size {micro_batch} x "
           f"--grad_accum {accum}" + (f" (saved on {saved_world} processes)" if saved_world != world else "")
           + f"; continuing after {consumed} samples (step {consumed // gb})")
    return {"grad_accum": accum, "start_step": consumed // gb, "message": msg}


# ---- what a saved engine folder holds ----------------------------------------------------------------
def saved_world_size(folder: str, tag: str) -> int | None:
    """The data-parallel world size a DeepSpeed engine folder was written with (number of optimizer
    shards), or None when it holds no partitioned optimizer state (ZeRO-0 fp32, plain engines)."""
    ranks = []
    for path in glob.glob(os.path.join(folder, tag, "*_optim_states.pt")):
        m = _OPTIM_SHARD_RE.match(os.path.basename(path))
        if m:
            ranks.append(int(m.group(1)))
    if not ranks:
        return None
    if sorted(ranks) != list(range(len(ranks))):
        raise ElasticResumeError(f"{os.path.join(folder, tag)}: optimizer shards of ranks {sorted(ranks)}; expected "
                                 f"0..{len(ranks) - 1} (a shard is missing or comes from another run)")
    return len(ranks)


def is_partitioned(engine) -> bool:
    """Does the engine keep one optimizer shard per rank (so that a world-size change needs resharding)?
    ZeRO-1/2/3 do; ZeRO-0 keeps the whole state on every rank, the bf16 section included (DeepSpeed
    wraps the optimizer in its unpartitioned FP16_Optimizer there)."""
    return getattr(engine, "engine", None) is not None and engine.zero_stage > 0


# ---- world-size-independent form ---------------------------------------------------------------------
def universal_path(folder: str, tag: str) -> str:
    return os.path.join(folder, tag + UNIVERSAL_SUFFIX)


def ensure_universal(folder: str, tag: str) -> str:
    """Collective. The world-size-independent (universal) form of the engine folder ``folder/tag``,
    converted by rank 0 if it does not exist yet; returns its path.

    The conversion writes into a temporary folder and renames it when done, so a crash mid-way leaves
    nothing that looks finished; a leftover temporary folder is removed and redone."""
    out = universal_path(folder, tag)
    error = None
    if _rank() == 0 and not os.path.isfile(os.path.join(out, "zero", "optimizer_state.pt")):
        src = os.path.join(folder, tag)
        if not os.path.isdir(src):
            error = f"no engine folder {src}"
        else:
            tmp = out + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            try:
                _run_ds_to_universal(src, tmp)
                os.replace(tmp, out)
            except Exception as exc:      # reported on every rank below, not only rank 0
                error = f"converting {src} to a universal checkpoint failed: {type(exc).__name__}: {exc}"
            finally:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, "latest_universal"))   # written by ds_to_universal
    if _world() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ElasticResumeError(error)
    return out


def _run_ds_to_universal(src: str, dst: str) -> None:
    import argparse
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    args = argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal(args)
    except Exception as exc:
        raise RuntimeError(f"{exc}\n--- ds_to_universal output ---\n{log.getvalue()[-3000:]}") from exc


# ---- load on any world size --------------------------------------------------------------------------
def load_any_world(engine, folder: str, tag: str) -> dict:
    """Collective. Load the engine state saved in ``folder/tag`` (by ``engine.save(folder, tag)``) into
    ``engine``, whatever world size it was saved with. Returns what was done, for the resume report:
    ``{"saved_world", "world", "how"}`` with ``how`` one of "native", "universal"."""
    world = _world()
    if not is_partitioned(engine):
        engine.load(folder, tag)
        return {"saved_world": None, "world": world, "how": "native"}
    saved = saved_world_size(folder, tag)
    if saved is None:
        raise ElasticResumeError(f"{os.path.join(folder, tag)} holds no ZeRO optimizer shards, but this "
                                 f"{engine.name} engine partitions its optimizer (ZeRO-{engine.zero_stage}, "
                                 f"{engine.precision}); was it saved with another --deepspeed_config?")
    if saved == world:
        engine.load(folder, tag)
        return {"saved_world": saved, "world": world, "how": "native"}
    load_universal(engine, folder, tag)
    return {"saved_world": saved, "world": world, "how": "universal"}


def load_universal(engine, folder: str, tag: str) -> str:
    """Collective. Convert ``folder/tag`` if needed and load it through DeepSpeed's universal checkpoint
    path, with the corrections listed in the module docstring. Returns the universal folder."""
    path = ensure_universal(folder, tag)
    ds = engine.engine
    base = ds.optimizer.optimizer
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    ds._config.load_universal_checkpoint = True     # read at load time only; off again for later saves
    try:
        loaded, _ = ds.load_checkpoint(folder, tag=tag + UNIVERSAL_SUFFIX, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=True)
    finally:
        ds._config.load_universal_checkpoint = False
    if loaded is None:
        raise ElasticResumeError(f"DeepSpeed could not load the universal checkpoint {path}")
    if len(groups_before) != len(base.param_groups):
        raise ElasticResumeError(f"{engine.name}: {len(base.param_groups)} optimizer param groups after loading "
                                 f"{path}, {len(groups_before)} before")
    for group, hyper in zip(base.param_groups, groups_before):
        group.update(hyper)
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    relink_optimizer_state(engine)
    engine.reset_zero3_trace()
    return path


def relink_optimizer_state(engine) -> None:
    """Point every parameter's view of the ZeRO-1/2 optimizer state at the state that exists now (see
    the module docstring); a no-op for other engines."""
    opt = getattr(getattr(engine, "engine", None), "optimizer", None)
    if engine.zero_stage not in (1, 2) or not hasattr(opt, "bit16_groups"):
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state
    for i in range(len(opt.optimizer.param_groups)):
        if opt.optimizer.state.get(opt.single_partition_of_fp32_groups[i]):
            lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], opt.single_partition_of_fp32_groups[i],
                                                opt.optimizer.state)


# ---- full state, for checks --------------------------------------------------------------------------
def gather_full_state(engine) -> dict | None:
    """Collective. The full fp32 value and AdamW moments of every trainable parameter, the optimizer
    step count and the group hyper-parameters, on the CPU of rank 0 (None elsewhere). World-size
    independent: what an elastic resume must reproduce."""
    from rectok_fast.training.engine import BF16_PARAMS
    names = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    out = {"params": {}, "exp_avg": {}, "exp_avg_sq": {}}
    base = engine._base_opt if hasattr(engine, "_base_opt") else engine.optimizer
    if not is_partitioned(engine):
        # the optimizer's own tensors: the parameters themselves, or DeepSpeed's flat fp32 masters (bf16)
        holders = {id(p): (p, base.state.get(p, {})) for _, p in names}
        if engine.precision == BF16_PARAMS:
            opt = engine.engine.optimizer
            if getattr(opt, "fp32_groups_flat", None) is not None:      # FP16_Optimizer: one flat master
                for lps, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                    st = base.state.get(flat, {})
                    views = {k: torch._utils._unflatten_dense_tensors(st[k], lps)
                             for k in ("exp_avg", "exp_avg_sq") if k in st}
                    for i, (lp, hp) in enumerate(zip(lps, torch._utils._unflatten_dense_tensors(flat, lps))):
                        holders[id(lp)] = (hp, {k: v[i] for k, v in views.items()})
            else:                                                       # FP16_UnfusedOptimizer: one per param
                for lps, hps in zip(opt.fp16_groups, opt.fp32_groups):
                    for lp, hp in zip(lps, hps):
                        holders[id(lp)] = (hp, base.state.get(hp, {}))
        for n, p in names:
            value, st = holders[id(p)]
            out["params"][n] = value.detach().float().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[key][n] = st[key].detach().float().cpu().clone() if key in st else None
    else:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        relink_optimizer_state(engine)
        for n, p in names:
            out["params"][n] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[key][n] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
        engine.reset_zero3_trace()
    steps = [float(s["step"]) for s in base.state.values() if "step" in s]
    step = torch.tensor([max(steps) if steps else 0.0])
    if _world() > 1:
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
    out["optimizer_step"] = float(step)
    out["groups"] = [{k: v for k, v in g.items() if k not in ("params", "names")} for g in base.param_groups]
    return out if _rank() == 0 else None
