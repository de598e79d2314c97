"""Public ops of rectok_fast. Every model and loss calls these, never a backend directly.

Each op dispatches through the one backend switch (:mod:`rectok_fast.ops.backend`) to either its
plain-PyTorch reference (:mod:`rectok_fast.ops.reference`) or a fused implementation:

=========================  ==========  ==============================================
op                         family      fused implementation
=========================  ==========  ==============================================
flow_interpolate           triton      rectok_fast.kernels.flow_interpolate
posterior_flow_noise       triton      rectok_fast.kernels.posterior_flow
cosine_distill_loss        triton      rectok_fast.kernels.cosine_distill
adaln_modulate             extension   rectok_fast.ops.adaln_ext (csrc/)
gated_residual             extension   rectok_fast.ops.adaln_ext (csrc/)
=========================  ==========  ==============================================
"""
from __future__ import annotations

import torch

from rectok_fast.ops import reference
from rectok_fast.ops.backend import (BACKENDS, BackendUnavailable, choose, get_backend, set_backend,
                                     use_backend)

__all__ = ["BACKENDS", "BackendUnavailable", "set_backend", "get_backend", "use_backend", "reference",
           "flow_interpolate", "posterior_flow_noise", "cosine_distill_loss", "adaln_modulate",
           "gated_residual", "implementation_for"]


def implementation_for(op: str, device: torch.device | str = "cpu") -> str:
    """Which implementation ``op`` would use on ``device`` under the current backend."""
    family = "extension" if op in ("adaln_modulate", "gated_residual") else "triton"
    return choose(op, family, torch.device(device))


def flow_interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, return_velocity: bool = False):
    if choose("flow_interpolate", "triton", x.device, x.dtype) == "reference":
        return reference.flow_interpolate(x, noise, t, return_velocity=return_velocity)
    from rectok_fast.kernels.flow_interpolate import flow_interpolate as fused
    return fused(x, noise, t, return_velocity=return_velocity)
flow_interpolate.__doc__ = reference.flow_interpolate.__doc__


def posterior_flow_noise(moments: torch.Tensor, eps_post: torch.Tensor, eps_flow: torch.Tensor,
                         tau: torch.Tensor, gamma: float = 1.0):
    if choose("posterior_flow_noise", "triton", moments.device, moments.dtype) == "reference":
        return reference.posterior_flow_noise(moments, eps_post, eps_flow, tau, gamma)
    from rectok_fast.kernels.posterior_flow import posterior_flow_noise as fused
    return fused(moments, eps_post, eps_flow, tau, gamma)
posterior_flow_noise.__doc__ = reference.posterior_flow_noise.__doc__


def cosine_distill_loss(pred: torch.Tensor, target: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    if choose("cosine_distill_loss", "triton", pred.device, pred.dtype) == "reference":
        return reference.cosine_distill_loss(pred, target, ids)
    from rectok_fast.kernels.cosine_distill import cosine_distill_loss as fused
    return fused(pred, target, ids)
cosine_distill_loss.__doc__ = reference.cosine_distill_loss.__doc__


def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    if choose("adaln_modulate", "extension", x.device, x.dtype) == "reference":
        return reference.adaln_modulate(x, weight, shift, scale, eps)
    from rectok_fast.ops import adaln_ext
    return adaln_ext.adaln_modulate(x, weight, shift, scale, eps)
adaln_modulate.__doc__ = reference.adaln_modulate.__doc__


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if choose("gated_residual", "extension", x.device, x.dtype) == "reference":
        return reference.gated_residual(x, gate, y)
    from rectok_fast.ops import adaln_ext
    return adaln_ext.gated_residual(x, gate, y)
gated_residual.__doc__ = reference.gated_residual.__doc__
