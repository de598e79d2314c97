"""The op registry: the one place that lists rectok_fast's fusable ops.

Everything else reads from here: dispatch (:mod:`rectok_fast.ops`), the backend decision
(:mod:`rectok_fast.ops.backend`), ``python -m rectok_fast.env_report``, the test parametrization
(tests/test_opcheck.py, tests/test_backend_switch.py), the README's ops table
(:func:`render_ops_table`, checked by a test) and the kernels, which import their constants
(:data:`COSINE_EPS`, :data:`LOGVAR_MIN` ...) from this module.

Entry format (for whoever adds an op or owns a fused family; H5: the AdaLN entries below)
-----------------------------------------------------------------------------------------
``OpSpec(name, family, reference, fused, check, constants, custom_ops, opcheck_samples, summary)``

* ``family``: ``"triton"`` (kernels/ -> ``rectok_fast.kernels``) or ``"cuda-ext"`` (csrc/ ->
  ``rectok_fast._C``, Python side ``rectok_fast.ops.adaln_ext``). Both families are packaged the same
  way: a Python module exposing one public callable per op with the reference's signature.
* ``reference`` / ``fused``: ``"module:function"``; resolved once, when :mod:`rectok_fast.ops` is
  imported (never while torch.compile traces). The fused callable must run the input contract itself
  (or trust that the dispatcher did) and raise clear errors.
* ``check``: the input contract, ``check(*args, **kwargs) -> None`` raising ``ValueError`` /
  ``TypeError`` / ``IndexError`` naming the problem; both the reference and the fused callable call it.
* ``custom_ops``: every ``torch.library`` op the fused path registers (forward AND backward).
* ``opcheck_samples``: ``"module:function"``; ``function(device) -> list[(op_name, args)]`` giving one
  sample call per entry of ``custom_ops`` (forward and backward) with CPU/`device` tensors;
  tests/test_opcheck.py runs ``torch.library.opcheck`` on each.

Launch configs (for benchmarks/static_report.py): every Triton kernel module has
``production_configs() -> list[dict]`` with, per kernel launch at the goal shapes: ``kernel`` (name),
``fn`` (the triton.jit function), ``signature`` (name -> Triton type, for an ahead-of-time compile),
``constexprs``, ``num_warps``, ``grid`` and ``shape``; :func:`production_configs` collects them per op.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Mapping

import torch

# ------------------------------------------------------------------------------------------ constants
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0   # the posterior's logvar clamp (official models/gaussian.py)
COSINE_EPS = 1e-12                      # F.normalize default, as the official SemLoss uses
ADALN_EPS = 1e-6                        # DiT RMSNorm epsilon (DiTConfig.eps default)
FUSED_DTYPES = (torch.float32, torch.bfloat16)   # activations the fused paths take; others use the reference

FAMILIES = ("triton", "cuda-ext")


# ------------------------------------------------------------------------------------------ contracts
def _shape(t) -> tuple:
    return tuple(t.shape)


def _require_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all inputs must be on the same device")


def _per_sample_values(op: str, name: str, t, b: int) -> None:
    _require_tensor(op, name, t)
    if t.numel() != b:
        raise ValueError(f"{op}: {name} must hold one value per sample: expected {b} values, got shape {_shape(t)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be a real tensor, got {t.dtype}")


def check_flow_interpolate(x, noise, t, return_velocity: bool = False) -> None:
    op = "flow_interpolate"
    _require_tensor(op, "x", x)
    _require_tensor(op, "noise", noise)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a leading batch dimension, got a 0-d tensor")
    if x.shape != noise.shape:
        raise ValueError(f"{op}: x {_shape(x)} and noise {_shape(noise)} differ in shape")
    _per_sample_values(op, "t", t, x.shape[0])
    _same_device(op, "x", x, noise=noise, t=t)


def check_posterior_flow_noise(moments, eps_post, eps_flow, tau, gamma=1.0) -> None:
    op = "posterior_flow_noise"
    _require_tensor(op, "moments", moments)
    if moments.dim() != 3 or moments.shape[-1] % 2:
        raise ValueError(f"{op}: moments must be (B, L, 2C), got {_shape(moments)}")
    expected = (*moments.shape[:-1], moments.shape[-1] // 2)
    for name, e in (("eps_post", eps_post), ("eps_flow", eps_flow)):
        _require_tensor(op, name, e)
        if _shape(e) != expected:
            raise ValueError(f"{op}: {name} must be {expected}, got {_shape(e)}")
    _per_sample_values(op, "tau", tau, moments.shape[0])
    if isinstance(gamma, torch.Tensor):
        raise TypeError(f"{op}: gamma must be a Python number, got a tensor")
    _same_device(op, "moments", moments, eps_post=eps_post, eps_flow=eps_flow, tau=tau)


def check_cosine_distill_loss(pred, target, ids=None) -> None:
    """pred (B, M, D) predicts the target rows ``target[b, ids[b, m]]`` of target (B, N, D); without
    ids, pred and target are both (B, N, D). ids must be an integer tensor (B, M) with values in [0, N)
    (the range is checked on the host only where that costs no GPU sync, see :func:`check_ids_range`)."""
    op = "cosine_distill_loss"
    _require_tensor(op, "pred", pred)
    _require_tensor(op, "target", target)
    if pred.dim() != 3 or target.dim() != 3:
        raise ValueError(f"{op}: pred {_shape(pred)} and target {_shape(target)} must both be (B, N, D)")
    if ids is None:
        if pred.shape != target.shape:
            raise ValueError(f"{op}: pred {_shape(pred)} and target {_shape(target)} must have the same shape "
                             "(or pass ids picking the target rows that pred predicts)")
    else:
        _require_tensor(op, "ids", ids)
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{op}: ids must be an integer tensor (int64 or int32), got {ids.dtype}")
        if ids.dim() != 2 or ids.shape[0] != pred.shape[0] or ids.shape[1] != pred.shape[1]:
            raise ValueError(f"{op}: ids must be (B, M) = {(pred.shape[0], pred.shape[1])} (one target row per "
                             f"pred row), got {_shape(ids)}")
        if target.shape[0] != pred.shape[0] or target.shape[2] != pred.shape[2]:
            raise ValueError(f"{op}: target {_shape(target)} must be (B, N, D) with B, D of pred {_shape(pred)}")
        _same_device(op, "pred", pred, ids=ids)
    _same_device(op, "pred", pred, target=target)


# Devices whose ids are checked on the host. benchmarks/static_report.py empties it while it captures the
# launches of an op, so that CPU tensors take the device-side branch a CUDA call takes and its kernel
# launches are counted.
HOST_CHECKED_DEVICES = ("cpu",)


def check_ids_range(ids: torch.Tensor, n: int, op: str = "cosine_distill_loss") -> None:
    """Out-of-range ids give a clear error instead of a NaN loss.

    CPU tensors: an exact host check (free). CUDA tensors: a device-side assert (no host sync; the
    failure surfaces as a CUDA device-side assert carrying this message at the next sync). Skipped while
    torch.compile traces (the fused kernel still never reads out of bounds: it turns the loss into NaN).
    """
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if ids.device.type in HOST_CHECKED_DEVICES:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= n:
            raise IndexError(f"{op}: ids must lie in [0, {n}) (N target tokens), got values in [{lo}, {hi}]")
    else:
        lo_hi = torch.aminmax(ids)
        torch._assert_async((lo_hi.min >= 0) & (lo_hi.max < n),
                            f"{op}: ids out of range: every id must lie in [0, {n}) (N target tokens)")


def _check_modulation(op: str, name: str, m, x) -> None:
    _require_tensor(op, name, m)
    b, n, d = x.shape
    ok = (m.dim() == 2 and _shape(m) == (b, d)) or (
        m.dim() == 3 and m.shape[0] == b and m.shape[2] == d and m.shape[1] in (1, n))
    if not ok:
        raise ValueError(f"{op}: {name} must be (B, D), (B, 1, D) or (B, N, D) for x of shape {_shape(x)}; "
                         f"got {_shape(m)}")


def check_adaln_modulate(x, weight, shift, scale, eps: float = ADALN_EPS) -> None:
    op = "adaln_modulate"
    _require_tensor(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got {_shape(x)}")
    _require_tensor(op, "weight", weight)
    if _shape(weight) != (x.shape[-1],):
        raise ValueError(f"{op}: weight must be ({x.shape[-1]},), got {_shape(weight)}")
    _check_modulation(op, "shift", shift, x)
    _check_modulation(op, "scale", scale, x)
    _same_device(op, "x", x, weight=weight, shift=shift, scale=scale)


def check_gated_residual(x, gate, y) -> None:
    op = "gated_residual"
    _require_tensor(op, "x", x)
    _require_tensor(op, "y", y)
    if x.dim() != 3 or y.shape != x.shape:
        raise ValueError(f"{op}: x {_shape(x)} and y {_shape(y)} must both be (B, N, D)")
    _check_modulation(op, "gate", gate, x)
    _same_device(op, "x", x, gate=gate, y=y)


# ------------------------------------------------------------------------------------------ entries
@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    family: str
    reference: str
    fused: str
    check: Callable[..., None]
    constants: Mapping[str, float]
    custom_ops: tuple[str, ...]
    opcheck_samples: str
    summary: str

    def reference_fn(self) -> Callable:
        return resolve(self.reference)

    def fused_module(self) -> str:
        return self.fused.split(":")[0]


def resolve(target: str) -> Callable:
    """``"module:attr"`` -> the object (load time only; never called while compiling)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


_K = "rectok_fast.kernels"
_REF = "rectok_fast.ops.reference"
_EXT = "rectok_fast.ops.adaln_ext"

OPS: tuple[OpSpec, ...] = (
    OpSpec("flow_interpolate", "triton", f"{_REF}:flow_interpolate", f"{_K}.flow_interpolate:flow_interpolate",
           check_flow_interpolate, {},
           ("rectok_fast::flow_interpolate_fwd", "rectok_fast::flow_interpolate_bwd"),
           f"{_K}.flow_interpolate:opcheck_samples",
           "(1 - t) * x + t * noise (+ velocity noise - x)"),
    OpSpec("posterior_flow_noise", "triton", f"{_REF}:posterior_flow_noise",
           f"{_K}.posterior_flow:posterior_flow_noise", check_posterior_flow_noise,
           {"LOGVAR_MIN": LOGVAR_MIN, "LOGVAR_MAX": LOGVAR_MAX},
           ("rectok_fast::posterior_flow_fwd", "rectok_fast::posterior_flow_bwd"),
           f"{_K}.posterior_flow:opcheck_samples",
           "posterior sample + KL + tokenizer flow noise"),
    OpSpec("cosine_distill_loss", "triton", f"{_REF}:cosine_distill_loss",
           f"{_K}.cosine_distill:cosine_distill_loss", check_cosine_distill_loss, {"COSINE_EPS": COSINE_EPS},
           ("rectok_fast::cosine_distill_fwd", "rectok_fast::cosine_distill_bwd"),
           f"{_K}.cosine_distill:opcheck_samples",
           "mean 1 - cos(pred, target[ids]) (semantic distillation)"),
    OpSpec("adaln_modulate", "cuda-ext", f"{_REF}:adaln_modulate", f"{_EXT}:adaln_modulate",
           check_adaln_modulate, {"ADALN_EPS": ADALN_EPS},
           ("rectok_fast::adaln_modulate_fwd", "rectok_fast::adaln_modulate_bwd"),
           f"{_EXT}:opcheck_samples",
           "RMSNorm(x) * weight * (1 + scale) + shift"),
    OpSpec("gated_residual", "cuda-ext", f"{_REF}:gated_residual", f"{_EXT}:gated_residual",
           check_gated_residual, {},
           ("rectok_fast::gated_residual_fwd", "rectok_fast::gated_residual_bwd"),
           f"{_EXT}:opcheck_samples",
           "x + gate * y"),
)

BY_NAME: dict[str, OpSpec] = {spec.name: spec for spec in OPS}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def spec(name: str) -> OpSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown rectok_fast op {name!r}; registered ops: {', '.join(NAMES)}") from None


def production_configs() -> dict[str, list[dict]]:
    """op name -> the launch configs its Triton kernels use at the goal shapes (see the module docstring)."""
    out = {}
    for s in OPS:
        if s.family == "triton":
            out[s.name] = importlib.import_module(s.fused_module()).production_configs()
    return out


def render_ops_table() -> str:
    """The README's "Ops and backends" table (a test checks the README holds exactly this text)."""
    rows = [("op", "family", "fused implementation", "computes")]
    for s in OPS:
        rows.append((f"`{s.name}`", s.family, f"`{s.fused.replace(':', '.')}`", s.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows[1:]])
