"""What every stage shares: the run context (device, ranks, precision), counter-based seeding, the
stage interface and the collective helpers (full fp32 state for export).

Interface of a stage (``cfg`` is a :class:`rectok_fast.training.config.RunConfig`)::

    stage = TokenizerStage(cfg, ctx)      # or DecoderFTStage / DiTStage; see build_stage()
    stage.build()                         # models, frozen nets, losses, EMA; fills stage.pretrained
    stage.engines()                       # -> [Engine, ...]: the trained modules' engines
    out = stage.train_step(chunks, step, epoch)   # one optimizer step over micro batches -> StepOutcome
    stage.final_images(path)              # collective; rank 0 writes the PNG grid
    stage.export(path, **extra)           # collective; rank 0 writes the official-format .pth

``chunks`` is a list of micro batches ``{"images", "labels", "rank", "micro", "m"}`` (plus ``"moments"``
from the latent cache): all micro steps (``grad_accum``) of this process's data-parallel rank(s); ``m``
is the micro batch's global index in the step, the key of its random draws (:func:`seed_step`).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from rectok_fast.training.engine import barrier, dist_info, ds_wants_bf16, init_distributed

RANDOM = "RANDOM"


def seed_step(seed: int, step: int, m: int = 0) -> None:
    """Seed Python/NumPy/torch from (seed, optimizer step, GLOBAL micro-batch index m of the step; see
    :mod:`rectok_fast.data.plan`). m, unlike (rank, accumulation step), does not depend on how the global
    batch is split over processes, so a run resumed on another world size, and one process emulating R
    ranks, draw what the uninterrupted R-process run drew for the same samples. (The key of m = 0 is the
    former key of rank 0, micro step 0: single-micro-batch runs draw what they drew before.)"""
    key = [int(seed) & 0xFFFFFFFF, int(step), int(m), 0xC0FFEE]
    s = np.random.SeedSequence(key).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]) & 0xFFFFFFFF)
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))


def micro_index(chunk: dict, position: int) -> int:
    """The global micro-batch index of ``chunk``: ``chunk["m"]`` as the trainer sets it, else its position
    in the step's list (chunks handed in directly by one process: position a*R + r is m for R emulated
    ranks in the trainer's order)."""
    return int(chunk.get("m", position))


@dataclass
class RunContext:
    """Where and how a run executes; built once by :meth:`start` (launcher) or :meth:`local` (in-process)."""
    device: torch.device
    rank: int = 0
    world: int = 1
    ds_config: dict | None = None         # a mutable copy of ds.json (None: plain PyTorch engines)
    bf16: bool = False
    verbose: bool = True

    @property
    def use_deepspeed(self) -> bool:
        return self.ds_config is not None

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def say(self, *msg) -> None:
        if self.rank == 0 and self.verbose:
            print(*msg, flush=True)

    @staticmethod
    def barrier() -> None:
        barrier()

    @classmethod
    def start(cls, cfg) -> "RunContext":
        """Launcher environment -> device, process group, backend, precision."""
        from rectok_fast import ops
        rt = cfg.runtime
        use_ds = rt.ds_config is not None
        if use_ds:
            try:
                import deepspeed  # noqa: F401
            except Exception as exc:
                raise RuntimeError(f"--deepspeed_config given but deepspeed cannot be imported: {exc!r}") from None
        cuda = torch.cuda.is_available() and not rt.cpu
        rank, world, local = dist_info()
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        init_distributed(use_ds, device)
        if rt.backend:
            ops.set_backend(rt.backend)
        ctx = cls(device, rank, world, dict(rt.ds_config) if use_ds else None, resolve_bf16(cfg, cuda))
        if not cuda and rt.precision == "auto" and ds_wants_bf16(ctx.ds_config):
            ctx.say("[rectok_fast] CPU run: training in fp32 (the bf16 setting of ds.json is for GPUs; "
                    "pass --precision bf16 to keep it on CPU)")
        return ctx

    @classmethod
    def local(cls, cfg, device="cpu", verbose: bool = False) -> "RunContext":
        """One process, no process group, plain engines: build a stage in-process (tests, fixtures)."""
        device = torch.device(device)
        return cls(device, 0, 1, None, resolve_bf16(cfg, device.type == "cuda"), verbose)


def resolve_bf16(cfg, cuda: bool) -> bool:
    if cfg.runtime.precision == "auto":
        return cuda and ds_wants_bf16(cfg.runtime.ds_config)
    return cfg.runtime.precision == "bf16"


@dataclass
class StepOutcome:
    """One optimizer step: logs (tensors stay on device until logged) and the updates that were
    skipped because a gradient norm was not finite (empty when the step went through)."""
    logs: dict
    skipped: tuple = field(default_factory=tuple)


def mean_logs(logs_list: list[dict]) -> dict:
    """Mean over micro batches, in float64 as Python floats would be; tensors stay on their device."""
    def f64(v):
        return v.double() if torch.is_tensor(v) else float(v)
    return {k: sum(f64(l[k]) for l in logs_list) / len(logs_list) for k in logs_list[0]}


def is_finite(norm) -> bool:
    """The engine's global gradient norm (identical on all ranks) -> one host sync."""
    try:
        return math.isfinite(float(norm))
    except (TypeError, ValueError):
        return True     # an engine that cannot report a norm gives no evidence either way


def full_state(engine, module=None) -> dict | None:
    """Full (gathered) fp32 state dict of the engine's model on rank 0 (None elsewhere), parameters
    from the fp32 master. Collective: call on all ranks."""
    return engine.fp32_state_dict()


class StateShim:
    """Duck-typed 'model' for export_official_checkpoint: only ``state_dict()`` is used."""

    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


class Stage:
    """Base of the three stages; see the module doc for the interface."""
    name = "stage"

    def __init__(self, cfg, ctx: RunContext):
        self.cfg, self.ctx, self.device = cfg, ctx, ctx.device
        self.pretrained: list[tuple[str, str]] = []   # (net, the file it loaded or RANDOM)
        self.engine_list = []
        self.ema = None
        self.G = self.D = None

    # ---- the interface ----------------------------------------------------------------------
    def build(self) -> "Stage":
        raise NotImplementedError

    def engines(self):
        raise NotImplementedError

    def train_step(self, chunks, step: int, epoch: float, hooks=None) -> StepOutcome:
        raise NotImplementedError

    def final_images(self, path: str):
        raise NotImplementedError

    def export(self, path: str, **extra) -> None:
        """The official-format, self-describing .pth (rank 0 writes; collective)."""
        self._write_export(path, self.full_states(), **extra)

    def loaders(self, ranks: list[int], data_parallel: int):
        """One loader per data-parallel rank this process feeds (emulated ranks: several)."""
        from rectok_fast.data import build_loader
        return [build_loader(self.cfg.data, r, data_parallel, self.device) for r in ranks]

    def describe(self) -> dict:
        """The self-description stored in every checkpoint (rectok_fast.checkpoint.CONFIG_KEY)."""
        m = self.cfg.model
        return {"kind": "dit" if self.cfg.stage == "dit" else "tokenizer", "variant": m.variant,
                "overrides": dict(m.overrides), "img_size": self.cfg.data.img_size, "stage": self.cfg.stage}

    # ---- shared pieces ----------------------------------------------------------------------
    def note(self, net: str, path: str | None) -> None:
        self.pretrained.append((net, path or RANDOM))

    @property
    def stand_ins(self) -> list[str]:
        return [net for net, src in self.pretrained if src == RANDOM]

    def _engine(self, module, name: str, bf16: bool | None = None):
        from rectok_fast.training.engine import build_engine
        o = self.cfg.optim
        return build_engine(module, o.lr, o.weight_decay, o.clip_grad, self.device, self.ctx.ds_config,
                            self.ctx.bf16 if bf16 is None else bf16, self.cfg.data.batch_size, name,
                            grad_accum=o.grad_accum)

    def set_lr(self, lr: float) -> None:
        for e in self.engine_list:
            e.set_lr(lr)

    def compile(self, backend: str) -> str:
        """torch.compile the trained model's forward; returns how."""
        g = self.engine_list[0]
        if self.ctx.use_deepspeed:
            g.engine.compile(backend=backend)
            return "DeepSpeed engine.compile()"
        g.call = torch.compile(g.module, backend=backend)
        return "plain torch.compile"

    def full_states(self) -> list:
        """Gathered fp32 states of every engine's module (rank 0; None elsewhere). Collective."""
        states = [full_state(e, e.module) for e in self.engine_list]
        for e in self.engine_list:
            e.reset_zero3_trace()
        return states

    def _write_export(self, path: str, states: list, **extra) -> None:
        from rectok_fast.checkpoint import CONFIG_KEY, export_official_checkpoint
        if self.ctx.rank != 0:
            return
        if len(states) > 1 and states[1] is not None:
            extra["discriminator"] = states[1]
        extra[CONFIG_KEY] = self.describe()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        export_official_checkpoint(StateShim(states[0]), path, ema_model=self.ema.state_dict(), **extra)
