"""Standalone DeepSpeed worker for tests/test_elastic.py (launched by torchrun, gloo, CPU).

A small model with odd sizes, OUR engine (rectok_fast.training.engine.DeepSpeedEngine: torch AdamW
with the official two param groups as the client optimizer), a fixed data set, a fixed global batch:
step s consumes the global samples [s*G, (s+1)*G); rank r takes its micro batches from that range, so
the gradient of a step is the mean over the same G samples on any world size, and the accumulation
steps are recomputed from the world size (elastic.recompute_grad_accum).

--save_at 3,5   save <ckpt_root>/step_XXXXXXXX (engine folder "G" + manifest) after those steps
--preempt_step K --preempt_rank R
                rank R sends itself SIGTERM in the middle of step K (between micro steps); at the
                step boundary all ranks agree to stop, save a checkpoint and exit EXIT_PREEMPTED
--resume DIR    verify DIR's manifest, load it on this world size (elastic.load_any_world) and
                continue from the sample position it records (--load_mode universal: force the
                universal path; native: DeepSpeed's own load, to show what it refuses)
Rank 0 writes --out: per-step loss and sample ids, and the final full fp32 parameters, Adam moments,
optimizer step and group hyper-parameters (elastic.gather_full_state).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rectok_fast.training import elastic, manifest  # noqa: E402
from rectok_fast.training.engine import DeepSpeedEngine, init_distributed  # noqa: E402
from rectok_fast.training.preemption import EXIT_PREEMPTED, PreemptionHandler  # noqa: E402

N_SAMPLES, D_IN, D_OUT = 96, 7, 5


class Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.randn(D_IN) * 0.1)   # held by a container module
        self.fc1 = torch.nn.Linear(D_IN, 37)
        self.norm = torch.nn.LayerNorm(37)
        self.fc2 = torch.nn.Linear(37, 29)
        self.head = torch.nn.Linear(29, D_OUT)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x + self.pos_embed))
        return self.head(torch.nn.functional.gelu(self.fc2(self.norm(h))))


class Tiny(torch.nn.Module):
    """A frozen stem (like the DiT stage's frozen encoder: the engine hands DeepSpeed a TrainableView
    of the trainable part) and a trainable body with odd sizes and two param groups."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(D_IN, D_IN)
        self.stem.requires_grad_(False)
        self.body = Body()

    def forward(self, x):
        return self.body(self.stem(x))


def lr_at(step: int) -> float:
    return 3e-3 * (0.9 ** step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--global_batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save_at", default="")
    ap.add_argument("--ckpt_root", default="")
    ap.add_argument("--resume", default="")
    ap.add_argument("--load_mode", choices=["any", "universal", "native"], default="any")
    ap.add_argument("--preempt_step", type=int, default=0)
    ap.add_argument("--preempt_rank", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    init_distributed(True, torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    handler = PreemptionHandler().install()
    if args.resume:     # before the engine exists: the accumulation steps depend on what was saved
        found = manifest.verify_collective(args.resume, expect={"zero_stage": args.zero})
        plan = elastic.resume_plan(found, args.micro, world)
        grad_accum, start = plan["grad_accum"], plan["start_step"]
        if rank == 0:
            print(plan["message"], flush=True)
    else:
        grad_accum, start = elastic.recompute_grad_accum(args.global_batch, args.micro, world), 0

    torch.manual_seed(0)
    model = Tiny()
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(N_SAMPLES, D_IN, generator=g), torch.randn(N_SAMPLES, D_OUT, generator=g)

    bf16 = args.precision == "bf16"
    ds_cfg = {"zero_optimization": {"stage": args.zero}, "bf16": {"enabled": bf16}}
    engine = DeepSpeedEngine(model, lr=lr_at(0), weight_decay=0.05, clip=1.0, device=torch.device("cpu"),
                             ds_config=ds_cfg, bf16=bf16, micro_batch=args.micro, name="G", grad_accum=grad_accum)
    info = {}
    if args.resume:
        if args.load_mode == "any":
            info = elastic.load_any_world(engine, args.resume, "G")
        elif args.load_mode == "universal":
            info = {"universal": elastic.load_universal(engine, args.resume, "G")}
        else:
            engine.load(args.resume, "G")

    save_at = {int(s) for s in args.save_at.split(",") if s}
    losses, seen, stop = {}, {}, False
    for step in range(start, args.steps):
        engine.set_lr(lr_at(step))
        base = step * args.global_batch
        total, ids = torch.zeros(()), []
        for k in range(grad_accum):
            lo = base + (k * world + rank) * args.micro
            ids += range(lo, lo + args.micro)
            loss = torch.nn.functional.mse_loss(engine.call(xs[lo:lo + args.micro]).float(), ys[lo:lo + args.micro])
            engine.backward(loss / grad_accum)
            total += loss.detach() / grad_accum
            if step + 1 == args.preempt_step and rank == args.preempt_rank and k == 0:
                os.kill(os.getpid(), signal.SIGTERM)      # mid-step: the step must still complete
        engine.step()
        dist.all_reduce(total)
        losses[step + 1] = float(total) / world
        every = [None] * world
        dist.all_gather_object(every, ids)
        seen[step + 1] = sorted(i for part in every for i in part)
        stop = handler.should_stop()
        if step + 1 in save_at or stop:
            folder = os.path.join(args.ckpt_root, f"step_{step + 1:08d}")
            os.makedirs(folder, exist_ok=True)
            dist.barrier()
            engine.save(folder, "G")
            manifest.write_manifest(folder, step=step + 1, samples_consumed=(step + 1) * args.global_batch,
                                    zero_stage=args.zero, extra={"global_batch": args.global_batch})
        if stop:
            break

    state = elastic.gather_full_state(engine)
    with engine.full_parameters():        # the module's own (bf16 under the bf16 section) weights
        module_values = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    engine.reset_zero3_trace()
    if rank == 0:
        state["module_values"] = module_values
        torch.save({"losses": losses, "seen": seen, "info": info, **state, "world": world,
                    "grad_accum": grad_accum, "stopped_at": (step + 1) if stop else None}, args.out)
    dist.barrier()
    dist.destroy_process_group()
    if stop:
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
