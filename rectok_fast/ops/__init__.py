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

from rectok_fast.ops import adaln_ext, backend, reference, registry
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


# Eager per-call overhead of the extension's ops (issue 10: at most 1.5x a plain torch op on tiny
# tensors). The first eager call of an op decides through choose() (which announces the choice under
# 'auto'); once it picked the extension, later eager calls go straight to the extension's C entry
# (adaln_ext.*_eager: one C call into the dispatcher), which returns None for inputs it does not take
# (e.g. float64, where choose() then falls back or raises). Every set_backend / set_capabilities clears
# the entries, so the next call decides again. torch.compile never reads them: it traces choose() and
# the OpOverload.
# Dynamo folds is_dynamo_compiling() to True; eagerly it is one trivial call (is_compiling() is two).
_is_compiling = torch.compiler.is_dynamo_compiling
_adaln_eager = None
_gated_eager = None


def _clear_eager() -> None:
    global _adaln_eager, _gated_eager
    _adaln_eager = _gated_eager = None


backend.on_change(_clear_eager)


def _eager_entry(name: str):
    """The extension's C entry for ``name`` when the installation is what the capabilities say, else None."""
    caps = backend.capabilities()
    if caps.ext_error is not None or caps.ext_has_cuda != adaln_ext.HAS_CUDA:
        return None                    # injected capabilities (tests): keep deciding per call
    return getattr(adaln_ext, name + "_eager")


def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = registry.ADALN_EPS) -> torch.Tensor:
    global _adaln_eager
    if not _is_compiling():
        fast = _adaln_eager
        if fast is not None:
            out = fast(x, weight, shift, scale, eps)
            if out is not None:
                return out
    if choose("adaln_modulate", x.device, x.dtype) == "reference":
        return reference.adaln_modulate(x, weight, shift, scale, eps)
    if not _is_compiling():
        _adaln_eager = _eager_entry("adaln_modulate")
    return _FUSED["adaln_modulate"](x, weight, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    global _gated_eager
    if not _is_compiling():
        fast = _gated_eager
        if fast is not None:
            out = fast(x, gate, y)
            if out is not None:
                return out
    if choose("gated_residual", x.device, x.dtype) == "reference":
        return reference.gated_residual(x, gate, y)
    if not _is_compiling():
        _gated_eager = _eager_entry("gated_residual")
    return _FUSED["gated_residual"](x, gate, y)


for _name in registry.NAMES:          # one docstring per op: the reference's
    globals()[_name].__doc__ = getattr(reference, _name).__doc__
del _name
