"""Gradient accumulation check, shared by tests/test_train_structure.py: one optimizer step of the tiny
tokenizer stage as 2 micro steps x batch 2 and as 1 step x batch 4, on the same 4 images and the same
initial weights, must agree (losses, gradient norm, parameters). The tokenizer runs in eval mode and
without the GAN, so the step has no random draws and no per-batch statistics to tell the two apart.

In-process (plain engines): ``accumulation_diffs(out_dir)``. Under the DeepSpeed launcher (1 process,
ZeRO-2): ``deepspeed tests/_grad_accum_check.py OUT_DIR`` prints them as JSON after ``MARK``, with
the non-finite guard of the DeepSpeed engine (ZeRO-2, where DeepSpeed skips the step itself, and ZeRO-0
in fp32, where our engine checks the gradients before ``engine.step``).
"""
from __future__ import annotations

import dataclasses
import json
import sys

import torch

MARK = "GRAD_ACCUM_DIFFS "


def _stage(out_dir: str, accum: int, batch: int, ds_config: dict | None):
    from rectok_fast.training.config import parse_config
    from rectok_fast.training.stages import RunContext, build_stage
    cfg = parse_config(["--preset", "tiny", "--stage", "tokenizer", "--no_gan", "--batch_size", str(batch),
                        "--grad_accum", str(accum), "--lr", "1e-3", "--output_dir", out_dir])
    ctx = RunContext.local(cfg)
    if ds_config is not None:
        ctx = dataclasses.replace(ctx, ds_config=ds_config)
    torch.manual_seed(0)
    stage = build_stage(cfg, ctx)
    stage.model.eval()            # no masking / posterior sampling / flow noise: a deterministic step
    stage.set_lr(1e-3)
    return stage


def accumulation_diffs(out_dir: str, ds_config: dict | None = None) -> dict:
    from rectok_fast.data import PlanDataset, build_source, collate
    src = build_source()
    ds = PlanDataset(src, 32, range(4), 0, 0, flip="none")
    x = collate([ds[j] for j in range(4)])["images"]
    y = torch.zeros(4, dtype=torch.long)
    a = _stage(out_dir, 2, 2, ds_config)
    out_a = a.train_step([{"images": x[:2], "labels": y[:2], "rank": 0, "micro": 0},
                          {"images": x[2:], "labels": y[2:], "rank": 0, "micro": 1}], 0, 0.0)
    b = _stage(out_dir, 1, 4, ds_config)
    out_b = b.train_step([{"images": x, "labels": y, "rank": 0}], 0, 0.0)
    pa = {k: v.detach().float().clone() for k, v in a.model.named_parameters()}
    pb = {k: v.detach().float().clone() for k, v in b.model.named_parameters()}
    init = _stage(out_dir, 1, 4, None)
    p0 = {k: v.detach().float() for k, v in init.model.named_parameters()}
    return {
        "loss": [float(out_a.logs["loss"]), float(out_b.logs["loss"])],
        "grad_norm": [float(out_a.logs["grad_norm"]), float(out_b.logs["grad_norm"])],
        "param_max_diff": max((pa[k] - pb[k]).abs().max().item() for k in pa),
        "param_max_update": max((pb[k] - p0[k]).abs().max().item() for k in pb),
        "skipped": [list(out_a.skipped), list(out_b.skipped)],
    }


def nonfinite_skip(out_dir: str, ds_config: dict | None = None) -> dict:
    """A NaN generator loss: the engine must skip the update (parameters unchanged) and say so; the next
    finite step must update again."""
    from train_hooked import NonFiniteAt
    st = _stage(out_dir, 1, 2, ds_config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    chunks = [{"images": x, "labels": torch.zeros(2, dtype=torch.long), "rank": 0}]
    p0 = {k: v.detach().float().clone() for k, v in st.model.named_parameters()}
    bad = st.train_step(chunks, 0, 0.0, hooks=NonFiniteAt({0}))
    p1 = {k: v.detach().float().clone() for k, v in st.model.named_parameters()}
    good = st.train_step(chunks, 1, 0.0)
    p2 = {k: v.detach().float().clone() for k, v in st.model.named_parameters()}
    return {"skipped": [list(bad.skipped), list(good.skipped)],
            "unchanged_after_nan": all(torch.equal(p0[k], p1[k]) for k in p0),
            "finite_after_nan": all(bool(torch.isfinite(v).all()) for v in p1.values()),
            "updated_after": any(not torch.equal(p1[k], p2[k]) for k in p1)}


if __name__ == "__main__":
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 3.0,
           "bf16": {"enabled": False}, "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
    out = sys.argv[-1]      # the launcher puts --local_rank first
    res = {"accumulation": accumulation_diffs(out, cfg), "nonfinite_zero2": nonfinite_skip(out, cfg),
           "nonfinite_zero0": nonfinite_skip(out, {**cfg, "zero_optimization": {"stage": 0}})}
    print(MARK + json.dumps(res), flush=True)
    # leave the process group before exit (see _ds_precision_probe.py: a gloo thread alive at exit can abort)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
