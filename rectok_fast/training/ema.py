"""Exponential moving average of a model's named parameters (official models/ema.py semantics).

Every optimizer step: ``ema = d * ema + (1 - d) * p`` for parameters that train, and ``ema = p`` for
frozen ones (copied, not averaged). This gives the official stage-2 quirk for free: with the encoder
frozen, the EMA encoder becomes the loaded stage-1 *model* encoder after one step, while the EMA decoder
keeps averaging from the stage-1 EMA decoder it was initialised with.

The EMA lives in fp32 on the model's device, as a plain ``{name: tensor}`` dict (the official
'model_ema' layout), and it averages fp32 values only: late in training an update is far smaller than
one bf16 step, so an average of bf16 copies would stop moving. In training it is updated with
:meth:`EMA.update_from` (the engine's fp32 master values, gathered under ZeRO-3); :meth:`EMA.update`
takes a plain module whose trainable parameters are fp32.
"""
from __future__ import annotations

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One step from a module's own (full, fp32) parameters; under ZeRO-3 the caller gathers them."""
        self._update([(n, p.detach(), p.requires_grad) for n, p in module.named_parameters()])

    @torch.no_grad()
    def update_from(self, engine) -> None:
        """One step from an engine's fp32 master values (:meth:`Engine.master_named_parameters`).
        Collective: every rank calls it."""
        with engine.master_named_parameters() as params:
            self._update(params)

    def _update(self, params) -> None:
        trained, t_ema = [], []
        for n, v, trainable in params:
            e = self.shadow.get(n)
            if e is None:
                raise KeyError(f"the EMA has no entry for parameter {n!r} (built from another model?)")
            if trainable:
                if v.dtype != torch.float32:
                    raise TypeError(f"EMA update from a {v.dtype} copy of {n!r}: the EMA averages fp32 values "
                                    f"(use update_from(engine), which reads the fp32 master)")
                trained.append(v)
                t_ema.append(e)
            else:
                e.copy_(v)
        if trained:
            torch._foreach_lerp_(t_ema, trained, 1.0 - self.decay)

    def load(self, state: dict, strict: bool = True) -> None:
        missing = [k for k in self.shadow if k not in state]
        if strict and missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:5]}")
        for k, v in state.items():
            if k in self.shadow:
                self.shadow[k].copy_(v.to(self.shadow[k].device, torch.float32))

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.shadow.items()}

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the EMA weights into ``module`` (e.g. a copy for sampling or the reconstruction grid)."""
        for n, p in module.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))
