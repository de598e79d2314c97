"""One interface over DeepSpeed and a plain PyTorch loop: backward, clipped optimizer step, LR,
checkpoint save/load, and full-parameter access (ZeRO-3).

* :class:`DeepSpeedEngine` -- ``deepspeed.initialize`` with OUR torch AdamW (official param groups);
  the ds.json supplies ZeRO stage / bf16 / buckets; the trainer overrides micro batch, clip and
  precision from its arguments (printed at start). Only the trainable module is handed to DeepSpeed:
  frozen teacher / perceptual nets stay outside (the tokenizer keeps its teacher out of its module
  tree; the loss module's perceptual nets are never given to an engine).
* :class:`PlainEngine` -- torch AdamW; gradients averaged with ``all_reduce`` when several
  processes run without DeepSpeed (torchrun); the same global-norm clip.

All ranks must call the same methods in the same order (collectives).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os

import torch
import torch.distributed as dist

from rectok_fast.checkpoint import atomic_torch_save, safe_torch_load
from rectok_fast.training.optim import build_adamw


def dist_info() -> tuple[int, int, int]:
    """(global rank, world size, local rank) from the launcher's environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(use_deepspeed: bool, device: torch.device) -> None:
    _, world, _ = dist_info()
    if use_deepspeed:
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    elif world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place sum (or ``op``) over all ranks. NCCL reduces only CUDA tensors, so a CPU tensor
    (counters, log values) makes a round trip through the current GPU under it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        op = op or dist.ReduceOp.SUM
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            buf = t.cuda()
            dist.all_reduce(buf, op=op)
            t.copy_(buf)
        else:
            dist.all_reduce(t, op=op)
    return t


def load_ds_config(path: str | None) -> dict:
    if not path:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--deepspeed_config {path!r} does not exist")
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--deepspeed_config {path!r} is not valid JSON: {exc}") from None


def finalize_ds_config(cfg: dict, micro_batch: int, clip: float, bf16: bool) -> dict:
    """The config the engine really uses: our micro batch, no accumulation, our clip and precision;
    optimizer/scheduler sections dropped (the trainer owns AdamW groups and the per-step LR)."""
    cfg = copy.deepcopy(cfg)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    cfg["gradient_accumulation_steps"] = 1
    cfg["gradient_clipping"] = float(clip)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": bool(bf16)}
    cfg.pop("fp16", None)
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.setdefault("zero_optimization", {"stage": 0})
    stage = int(cfg["zero_optimization"].get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0-3, got {stage}")
    return cfg


class Engine:
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    zero_stage: int = 0

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self):
        """Clip + optimizer step + zero grads. Returns the global grad norm before clipping: a float or a
        0-dim tensor (nan if unknown); a tensor is left unread so that the step does not wait for the GPU."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        for opt in self._optimizers():
            for g in opt.param_groups:
                g["lr"] = lr

    def _optimizers(self):
        return [self.optimizer]

    def full_parameters(self):
        """Context in which every parameter of ``module`` holds its full value (ZeRO-3 gathers)."""
        return contextlib.nullcontext()

    def reset_zero3_trace(self):
        pass

    def save(self, folder: str, tag: str) -> None:
        raise NotImplementedError

    def load(self, folder: str, tag: str) -> None:
        raise NotImplementedError


class PlainEngine(Engine):
    def __init__(self, module, lr, weight_decay, clip, device, name="model"):
        self.module, self.clip, self.name = module, float(clip), name
        self.call = module
        self.optimizer = build_adamw(module, lr, weight_decay, device)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= self.world
            for p, g in zip(self.params, torch._utils._unflatten_dense_tensors(flat, grads)):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip if self.clip > 0 else float("inf"))
        self.optimizer.step()
        self.zero_grad()
        return norm.detach()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder, tag):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            atomic_torch_save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                              os.path.join(folder, tag, "plain_state.pt"))

    def load(self, folder, tag):
        state = safe_torch_load(os.path.join(folder, tag, "plain_state.pt"),
                                map_location=next(self.module.parameters()).device)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedEngine(Engine):
    def __init__(self, module, lr, weight_decay, clip, device, ds_config: dict, bf16: bool, micro_batch: int,
                 name="model"):
        import deepspeed
        self.name = name
        cfg = finalize_ds_config(ds_config, micro_batch, clip, bf16)
        self.config = cfg
        self.zero_stage = int(cfg["zero_optimization"].get("stage", 0))
        opt = build_adamw(module, lr, weight_decay, device)
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt,
                                                                 model_parameters=trainable, config=cfg)
        if self.zero_stage == 3:
            _register_external_params(self.engine.module)
        self.module = self.engine.module
        self.call = self.engine       # forward through the engine (ZeRO-3 per-step fetch/trace bookkeeping)
        self._base_opt = opt

    def _optimizers(self):
        opts = [self.optimizer]
        if self._base_opt is not self.optimizer:
            opts.append(self._base_opt)
        return opts

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        try:
            return float(norm) if norm is not None else float("nan")
        except (TypeError, ValueError):
            return float("nan")

    def zero_grad(self):
        self.engine.zero_grad()

    def full_parameters(self):
        if self.zero_stage == 3:
            import deepspeed
            return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def save(self, folder, tag):
        self.engine.save_checkpoint(folder, tag=tag, save_latest=False)

    def load(self, folder, tag):
        path, _ = self.engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}/{tag}")
        self.reset_zero3_trace()

    def reset_zero3_trace(self):
        """ZeRO-3 records the order in which submodules fetch parameters and prefetches by it; gathers
        outside a training step (checkpoint load, export, EMA) leave that record stale ("tracing error
        at step N"). Invalidate it: the next step re-records."""
        if self.zero_stage != 3:
            return
        offload = getattr(self.engine.optimizer, "parameter_offload", None)
        if offload is not None:
            coord = offload.get_param_coordinator()
            if coord.is_complete_trace():
                coord._invalidate_trace()
            coord.reset_step()


def build_engine(module, lr, weight_decay, clip, device, ds_config: dict | None, bf16: bool, micro_batch: int,
                 name="model") -> Engine:
    if ds_config is not None:
        return DeepSpeedEngine(module, lr, weight_decay, clip, device, ds_config, bf16, micro_batch, name)
    return PlainEngine(module, lr, weight_decay, clip, device, name)


def _register_external_params(root: torch.nn.Module) -> None:
    """ZeRO-3 gathers a parameter around its OWNING module's forward/backward. Parameters held
    directly by container modules (position embeddings, mask/null tokens, ...) are often read by code
    outside that window (passed to children, used after the forward returns), where a partitioned
    parameter looks empty (DeepSpeed issue #876). Register them with the root module: they are
    gathered for the whole forward/backward. They are small; the big Linear/Conv weights stay
    partitioned per layer."""
    import deepspeed
    register_external_parameter = deepspeed.zero.register_external_parameter
    for m in root.modules():
        if m is root or not any(True for _ in m.children()):
            continue
        for p in m.parameters(recurse=False):
            register_external_parameter(root, p)
    for p in root.parameters(recurse=False):
        register_external_parameter(root, p)
