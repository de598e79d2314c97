"""Public ops of rectok_fast. Every model and loss calls these, never a backend directly.

Each op dispatches through the one backend switch (:mod:`rectok_fast.ops.backend`) to either its
plain-PyTorch reference (:mod:`rectok_fast.ops.reference`) or its fused implementation; which ops
exist, their family and their fused module are listed once, in :mod:`rectok_fast.ops.registry`
(``python -c "from rectok_fast.ops.registry import render_ops_table; print(render_ops_table())"``).

Everything the dispatch needs (capabilities, the reference and fused callables) is resolved here, at
import time, so the calls below contain nothing that breaks a torch.compile graph.
"""
from __future__ import annotations

import torch

from rectok_fast.ops import backend, reference, registry
from rectok_fast.ops.backend import (BACKENDS, BackendUnavailable, choose, get_backend, set_backend,
                                     use_backend)

__all__ = ["BACKENDS", "BackendUnavailable", "set_backend", "get_backend", "use_backend", "reference", "registry",
           "flow_interpolate", "posterior_flow_noise", "cosine_distill_loss", "adaln_modulate",
           "gated_residual", "implementation_for", "fused_callable"]


def _load_fused() -> dict:
    """op name -> fused callable, for every op whose family is usable in this installation."""
    caps = backend.capabilities()
    table = {}
    for spec in registry.OPS:
        if spec.family == "triton" and caps.triton_error is not None:
            continue
        table[spec.name] = registry.resolve(spec.fused)
    return table


_FUSED = _load_fused()


def fused_callable(op: str):
    """The fused implementation of ``op`` (raises BackendUnavailable naming why it cannot load)."""
    registry.spec(op)
    if op not in _FUSED:
        raise BackendUnavailable(f"{op}: its fused implementation is unavailable: "
                                 f"{backend.capabilities().triton_error}")
    return _FUSED[op]


def implementation_for(op: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> str:
    """Which implementation ``op`` would use on ``device`` under the current backend:
    'reference', 'triton' or 'cuda-ext'."""
    registry.spec(op)
    return choose(op, torch.device(device), dtype)


def flow_interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, return_velocity: bool = False):
    if choose("flow_interpolate", x.device, x.dtype) == "reference":
        return reference.flow_interpolate(x, noise, t, return_velocity=return_velocity)
    return _FUSED["flow_interpolate"](x, noise, t, return_velocity=return_velocity)


def posterior_flow_noise(moments: torch.Tensor, eps_post: torch.Tensor, eps_flow: torch.Tensor,
                         tau: torch.Tensor, gamma: float = 1.0):
    if choose("posterior_flow_noise", moments.device, moments.dtype) == "reference":
        return reference.posterior_flow_noise(moments, eps_post, eps_flow, tau, gamma)
    return _FUSED["posterior_flow_noise"](moments, eps_post, eps_flow, tau, gamma)


def cosine_distill_loss(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    if choose("cosine_distill_loss", pred.device, pred.dtype) == "reference":
        return reference.cosine_distill_loss(pred, target, ids)
    return _FUSED["cosine_distill_loss"](pred, target, ids)


def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = registry.ADALN_EPS) -> torch.Tensor:
    if choose("adaln_modulate", x.device, x.dtype) == "reference":
        return reference.adaln_modulate(x, weight, shift, scale, eps)
    return _FUSED["adaln_modulate"](x, weight, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if choose("gated_residual", x.device, x.dtype) == "reference":
        return reference.gated_residual(x, gate, y)
    return _FUSED["gated_residual"](x, gate, y)


for _name in registry.NAMES:          # one docstring per op: the reference's
    globals()[_name].__doc__ = getattr(reference, _name).__doc__
del _name
