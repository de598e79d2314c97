"""One interface over DeepSpeed and a plain PyTorch loop: backward, clipped optimizer step, LR,
checkpoint save/load, full-parameter access (ZeRO-3) and the fp32 values the EMA and the export read.

* :class:`DeepSpeedEngine` -- ``deepspeed.initialize`` with OUR torch AdamW (official param groups);
  the ds.json supplies ZeRO stage / precision section / buckets; the trainer overrides micro batch,
  accumulation, clip and precision from its arguments. Only TRAINABLE parameters are handed to
  DeepSpeed: the teacher and the perceptual nets never reach an engine, and a module with frozen
  parts (stage 2: the encoder) is handed over as a view of its trainable submodules
  (:class:`TrainableView`), so the frozen part stays fp32 and unpartitioned under ZeRO-3.
* :class:`PlainEngine` -- torch AdamW; gradients averaged with ``all_reduce`` when several
  processes run without DeepSpeed (torchrun); the same global-norm clip.

bf16 (``precision_mode``): the official numerics are fp32 weights, bf16 autocast compute, fp32
gradients reduced in fp32, fp32 EMA. Under DeepSpeed that is the ``torch_autocast`` section with
``lower_precision_safe_modules: []`` (:data:`AUTOCAST`, the default; DeepSpeed's default list would
reduce Linear/Conv gradients in bf16). DeepSpeed's ``bf16`` section (:data:`BF16_PARAMS`) is kept as
an option: bf16 module weights and gradients, an fp32 master in the optimizer, reduction in
``communication_data_type`` (fp32 by default here); the EMA and the export then read the fp32
master (:meth:`Engine.master_named_parameters`), never the bf16 copies.

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


FP32 = "fp32"                # no mixed precision
AUTOCAST = "autocast"        # fp32 weights/grads/reduction, bf16 autocast compute (official numerics)
BF16_PARAMS = "bf16_params"  # DeepSpeed's bf16 section: bf16 weights/grads + fp32 master in the optimizer


def _section_enabled(cfg: dict | None, key: str) -> bool:
    sec = (cfg or {}).get(key)
    return isinstance(sec, dict) and bool(sec.get("enabled", False))


def ds_wants_bf16(ds_config: dict | None) -> bool:
    """Does the DeepSpeed config ask for bf16 (either section)? No config (plain engines): True, so
    that ``--precision auto`` means bf16 on CUDA."""
    if not ds_config:
        return True
    if _section_enabled(ds_config, "torch_autocast"):
        dtype = str(ds_config["torch_autocast"].get("dtype", "bfloat16")).lower()
        return dtype in ("bfloat16", "bf16", "torch.bfloat16")
    return _section_enabled(ds_config, "bf16")


def precision_mode(ds_config: dict | None, bf16: bool) -> str:
    """How a bf16 run keeps its numbers: :data:`FP32`, :data:`AUTOCAST` or :data:`BF16_PARAMS`.

    Plain engines and DeepSpeed configs without an enabled ``bf16`` section use :data:`AUTOCAST`;
    a config whose ``bf16`` section is enabled (and no ``torch_autocast``) asks for :data:`BF16_PARAMS`."""
    if not bf16:
        return FP32
    if ds_config is not None and _section_enabled(ds_config, "bf16") \
            and not _section_enabled(ds_config, "torch_autocast"):
        return BF16_PARAMS
    return AUTOCAST


def finalize_ds_config(cfg: dict, micro_batch: int, clip: float, bf16: bool, grad_accum: int = 1) -> dict:
    """The config the engine really uses: our micro batch and accumulation steps, our clip and precision;
    optimizer/scheduler sections dropped (the trainer owns AdamW groups and the per-step LR).

    Precision (see :func:`precision_mode`): AUTOCAST writes ``torch_autocast`` (bf16) with
    ``lower_precision_safe_modules`` [] unless the config names its own list; BF16_PARAMS keeps the
    ``bf16`` section and defaults ``communication_data_type`` to fp32; FP32 disables both."""
    mode = precision_mode(cfg, bf16)
    cfg = copy.deepcopy(cfg)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch)
    cfg["gradient_accumulation_steps"] = int(grad_accum)
    cfg["gradient_clipping"] = float(clip)
    if "fp16" in cfg and _section_enabled(cfg, "fp16"):
        raise ValueError("the fp16 section of the DeepSpeed config is not supported; use bf16 (torch_autocast)")
    cfg.pop("fp16", None)
    autocast = dict(cfg.get("torch_autocast") or {})
    if mode == AUTOCAST:
        if str(autocast.get("dtype", "bfloat16")).lower() not in ("bfloat16", "bf16", "torch.bfloat16"):
            raise ValueError(f"torch_autocast.dtype must be bfloat16, got {autocast['dtype']!r}")
        autocast.update(enabled=True, dtype="bfloat16")
        # [] = no parameter gets a bf16 communication dtype: every gradient is reduced in fp32
        autocast.setdefault("lower_precision_safe_modules", [])
        cfg["torch_autocast"] = autocast
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": False}
    elif mode == BF16_PARAMS:
        cfg.pop("torch_autocast", None)
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": True}
        cfg.setdefault("communication_data_type", "fp32")
    else:
        cfg.pop("torch_autocast", None)
        cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": False}
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.setdefault("zero_optimization", {"stage": 0})
    stage = int(cfg["zero_optimization"].get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0-3, got {stage}")
    return cfg


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class Engine:
    module: torch.nn.Module          # the whole trained model (frozen parts included), as the stage uses it
    optimizer: torch.optim.Optimizer
    zero_stage: int = 0
    precision: str = FP32            # FP32 / AUTOCAST / BF16_PARAMS (see precision_mode)

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

    @contextlib.contextmanager
    def master_named_parameters(self):
        """Yields ``[(name, value, trainable)]`` for every parameter of ``module``: the full fp32 value
        the optimizer updates (the fp32 master under BF16_PARAMS, the parameter itself otherwise).
        Collective (ZeRO-3 gathers); the values are only valid inside the context."""
        with self.full_parameters():
            yield [(n, p.detach() if p.dtype == torch.float32 else p.detach().float(), p.requires_grad)
                   for n, p in self.module.named_parameters()]

    def fp32_state_dict(self) -> dict | None:
        """The full state dict of ``module`` on the CPU, floating tensors in fp32, parameters from
        :meth:`master_named_parameters`; rank 0 only (None elsewhere). Collective: call on all ranks."""
        rank = _rank()
        with self.master_named_parameters() as params:
            if rank != 0:
                out = None
            else:
                values = {n: v for n, v, _ in params}
                out = {}
                for k, v in self.module.state_dict(keep_vars=True).items():
                    v = values.get(k, v).detach()
                    out[k] = v.to("cpu", torch.float32 if v.is_floating_point() else v.dtype, copy=True)
        self.reset_zero3_trace()
        return out

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
        if not torch.isfinite(norm):   # NaN/inf gradients: no update (the all-reduced norm is the same on all ranks)
            self.zero_grad()
            return norm.detach()
        self.optimizer.step()
        self.zero_grad()
        return norm.detach()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder, tag):
        if _rank() == 0:
            atomic_torch_save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                              os.path.join(folder, tag, "plain_state.pt"))

    def load(self, folder, tag):
        state = safe_torch_load(os.path.join(folder, tag, "plain_state.pt"),
                                map_location=next(self.module.parameters()).device)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


def trainable_submodules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The largest submodules of ``module`` whose parameters all train, as (dotted path, module);
    ``[("", module)]`` when everything trains. Raises when a trainable parameter is held directly by
    a module that also holds frozen ones (it could not be handed to DeepSpeed without them)."""
    def fully_trainable(m):
        ps = list(m.parameters())
        return bool(ps) and all(p.requires_grad for p in ps)

    picked, covered = [], set()

    def walk(prefix, m):
        if fully_trainable(m):
            picked.append((prefix, m))
            covered.update(id(p) for p in m.parameters())
            return
        for name, child in m.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", module)
    loose = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered]
    if loose:
        raise ValueError(f"{type(module).__name__}: trainable parameters {loose[:5]} sit in modules that also hold "
                         f"frozen parameters; freeze or train whole submodules")
    return picked


class TrainableView(torch.nn.Module):
    """What DeepSpeed is given for a model with frozen parts (stage 2) or under BF16_PARAMS: the
    model's largest fully-trainable submodules as children (the same module objects), and a forward
    that runs the WHOLE model. The frozen parts are outside this module tree, so DeepSpeed never casts,
    partitions or broadcasts them: they stay fp32 and whole.

    ``autocast_dtype``: the forward runs under autocast. DeepSpeed switches an outer CUDA autocast OFF
    inside the forward of an engine without a ``torch_autocast`` section (the bf16 section), which
    would run the bf16 module without autocast: this restores the official autocast compute there."""

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        object.__setattr__(self, "model", model)          # a plain attribute: not a submodule
        self.parts = torch.nn.ModuleDict({(path or "model").replace(".", "__"): m
                                          for path, m in trainable_submodules(model)})
        self.autocast_dtype = autocast_dtype

    def forward(self, *args, **kwargs):
        if self.autocast_dtype is None:
            return self.model(*args, **kwargs)
        device = next(self.parts.parameters()).device.type
        with torch.autocast(device, dtype=self.autocast_dtype):
            return self.model(*args, **kwargs)


class DeepSpeedEngine(Engine):
    def __init__(self, module, lr, weight_decay, clip, device, ds_config: dict, bf16: bool, micro_batch: int,
                 name="model", grad_accum: int = 1):
        import deepspeed
        self.name = name
        self.precision = precision_mode(ds_config, bf16)
        cfg = finalize_ds_config(ds_config, micro_batch, clip, bf16, grad_accum)
        self.config = cfg
        self.zero_stage = int(cfg["zero_optimization"].get("stage", 0))
        # ZeRO-0 with fp32 weights (FP32, AUTOCAST) hands the step to the plain torch optimizer: DeepSpeed
        # neither reports the gradient norm nor skips a non-finite one there, so step() checks it itself
        self._own_norm = self.zero_stage == 0 and self.precision != BF16_PARAMS
        opt = build_adamw(module, lr, weight_decay, device)     # names of the whole model: official groups
        trainable = [p for p in module.parameters() if p.requires_grad]
        frozen = len(trainable) != sum(1 for _ in module.parameters())
        given = module
        if frozen or self.precision == BF16_PARAMS:
            given = TrainableView(module, torch.bfloat16 if self.precision == BF16_PARAMS else None)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=given, optimizer=opt,
                                                                 model_parameters=trainable, config=cfg)
        if self.zero_stage == 3:
            _register_external_params(self.engine.module)
        self.module = module
        self.call = self.engine       # forward through the engine (ZeRO-3 per-step fetch/trace bookkeeping)
        self._base_opt = opt

    def _optimizers(self):
        opts = [self.optimizer]
        if self._base_opt is not self.optimizer:
            opts.append(self._base_opt)
        return opts

    def backward(self, loss):
        # the caller divides the loss by its micro steps (as for PlainEngine): DeepSpeed only counts them
        if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
            # what engine.forward does first: ZeRO-3 advances its micro-step counter there (copy the first
            # micro step's gradient, add the later ones). A module called raw, outside the engine (the
            # discriminator, see TokenizerStage), never passes through engine.forward, so without this
            # every micro step's gradient would overwrite the previous one under ZeRO-3 with
            # --grad_accum > 1. A second call after engine.forward changes nothing.
            self.engine.optimizer.clear_backward_seen_flag()
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()     # a micro step: DeepSpeed advances its accumulation counter, no update

    def step(self):
        """At the accumulation boundary: clip + update, skipped (grads dropped) when the global gradient
        norm is not finite -- ZeRO-1/2/3 and the bf16 optimizer do this themselves."""
        if self._own_norm:
            params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
            if torch.isfinite(norm):
                self.engine.step()
            else:
                # skip the update, but let DeepSpeed run its step (its counters, clipping and zero_grad
                # must stay in phase): zeroed gradients and a no-op optimizer.step for this one call
                for p in params:
                    p.grad.zero_()
                opt = self._base_opt
                opt.step = lambda *a, **k: None
                try:
                    self.engine.step()
                finally:
                    del opt.step
            return norm.detach()
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
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def master_named_parameters(self):
        if self.precision != BF16_PARAMS:
            with super().master_named_parameters() as out:
                yield out
            return
        # the module holds bf16 copies: read the optimizer's fp32 master (ZeRO-1/2: one all-reduce per
        # parameter, ZeRO-3: one gather per parameter; ZeRO-0: the fp32 flat groups of DeepSpeed's
        # bf16 wrapper). Frozen parameters were never handed to DeepSpeed: fp32 as they are.
        from deepspeed.utils import safe_get_full_fp32_param
        zero0 = self._zero0_master() if self.zero_stage == 0 else {}
        out = []
        for n, p in self.module.named_parameters():
            if p.requires_grad:
                v = zero0.get(id(p)) if self.zero_stage == 0 else safe_get_full_fp32_param(p)
                if v is None:
                    raise RuntimeError(f"{self.name}: DeepSpeed holds no fp32 master for trainable parameter {n!r}")
            else:
                v = p.detach().float()
            out.append((n, v.detach(), p.requires_grad))
        yield out

    def _zero0_master(self) -> dict:
        """id(bf16 param) -> its fp32 master in DeepSpeed's ZeRO-0 bf16 wrappers (FP16_Optimizer keeps
        flat fp32 groups, FP16_UnfusedOptimizer per-parameter fp32 copies)."""
        opt = self.engine.optimizer
        groups = getattr(opt, "fp16_groups", None)
        if groups is not None and getattr(opt, "fp32_groups_flat", None) is not None:
            return {id(p): v for params, flat in zip(groups, opt.fp32_groups_flat)
                    for p, v in zip(params, torch._utils._unflatten_dense_tensors(flat, params))}
        if groups is not None and getattr(opt, "fp32_groups", None) is not None:
            return {id(p): v for params, masters in zip(groups, opt.fp32_groups) for p, v in zip(params, masters)}
        raise RuntimeError(f"{self.name}: unknown DeepSpeed bf16 optimizer {type(opt).__name__}: no fp32 master")

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
                 name="model", grad_accum: int = 1) -> Engine:
    """``grad_accum``: micro steps per optimizer step; the caller divides each micro loss by it, calls
    ``backward`` per micro batch and ``step`` once."""
    if ds_config is not None:
        return DeepSpeedEngine(module, lr, weight_decay, clip, device, ds_config, bf16, micro_batch, name, grad_accum)
    eng = PlainEngine(module, lr, weight_decay, clip, device, name)
    eng.precision = precision_mode(None, bf16)      # fp32 weights either way; the caller autocasts
    return eng


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
