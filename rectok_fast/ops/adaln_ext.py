"""Python side of the C++/CUDA AdaLN extension (``rectok_fast._C``, sources in csrc/).

Two ops with the reference semantics of :mod:`rectok_fast.ops.reference`:

* :func:`adaln_modulate` -- ``RMSNorm(x) * weight * (1 + scale) + shift``
* :func:`gated_residual` -- ``x + gate * y``

Each is a ``torch.library.custom_op`` (``rectok_fast::adaln_modulate_fwd`` / ``_bwd``,
``rectok_fast::gated_residual_fwd`` / ``_bwd``) with a fake (meta) implementation and a registered
autograd formula, so ``torch.compile`` traces models that use them without graph breaks. The
extension is imported lazily on first use; :func:`load_error` says why it is unavailable.

Modulation tensors (shift / scale / gate) may be (B, D), (B, 1, D) or (B, N, D) and any strided
view (chunks of one adaLN output, stride-0 expanded views): the kernels read them through their
strides, without a copy. Gradients come back in the shape and dtype of each input.
All reductions run in a fixed, shape-determined order (two passes, no atomics): deterministic.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import torch

__all__ = ["adaln_modulate", "gated_residual", "load_error", "has_cuda", "extension", "poison_outputs",
           "cuda_launch_config"]

_EXT = None
_ERR: str | None = None
_TRIED = False


def _load():
    global _EXT, _ERR, _TRIED
    if _TRIED:
        return _EXT
    _TRIED = True
    try:
        _EXT = importlib.import_module("rectok_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name in ("rectok_fast._C", "_C"):
            _ERR = ("the rectok_fast C++ extension (rectok_fast._C) is not built: install with "
                    "`CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .` "
                    "(and without RECTOK_FAST_SKIP_EXT=1)")
        else:
            _ERR = f"rectok_fast._C could not be imported: {exc}"
    except ImportError as exc:  # undefined symbol / wrong torch ABI / missing libc10_cuda ...
        _ERR = (f"rectok_fast._C is built but failed to load ({exc}); it was probably compiled against a "
                f"different torch than the installed {torch.__version__}: rebuild it")
    except Exception as exc:  # pragma: no cover - anything else is also a load failure
        _ERR = f"rectok_fast._C failed to load: {exc!r}"
    return _EXT


def load_error() -> str | None:
    """None when the extension loaded, else a sentence naming the cause."""
    _load()
    return _ERR


def has_cuda() -> bool:
    """Whether the loaded extension contains its CUDA kernels (not whether a GPU is present)."""
    ext = _load()
    return bool(ext is not None and ext.has_cuda())


def extension():
    """The loaded ``rectok_fast._C`` module; raises with the load error when it is unavailable."""
    ext = _load()
    if ext is None:
        raise RuntimeError(_ERR)
    return ext


def cuda_launch_config(D: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """(threads per block, elements per thread, largest supported D) of the CUDA kernels for rows of
    width ``D``; raises a clear error when ``D`` is too wide for them. Host-only, works without a GPU."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, str(dtype))
    return tuple(extension().cuda_launch_config(int(D), name))


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Test hook: while active, the extension allocates every output and scratch buffer pre-filled
    with NaN, so an element that a kernel fails to write shows up as NaN in the results."""
    ext = extension()
    previous = ext.poison_outputs()
    ext.set_poison_outputs(bool(enabled))
    try:
        yield
    finally:
        ext.set_poison_outputs(previous)


# ------------------------------------------------------------------------------------------------
# Argument checks shared by the public functions and the fake implementations (clear errors before
# anything reaches C++; the binding repeats them as TORCH_CHECKs).
# ------------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16)


def _check_dtype(t: torch.Tensor, op: str, name: str) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or bfloat16, got {t.dtype}")


def _check_mod(m: torch.Tensor, x: torch.Tensor, op: str, name: str) -> None:
    b, n, d = x.shape
    ok = (m.dim() == 2 and tuple(m.shape) == (b, d)) or (
        m.dim() == 3 and m.shape[0] == b and m.shape[2] == d and m.shape[1] in (1, n))
    if not ok:
        raise ValueError(f"{op}: {name} must be (B, D), (B, 1, D) or (B, N, D) for x of shape {tuple(x.shape)}; "
                         f"got {tuple(m.shape)}")
    _check_dtype(m, op, name)


def _check_same_device(x: torch.Tensor, op: str, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; all inputs must be on "
                             "the same device")


def _check_adaln(x, weight, shift, scale) -> None:
    op = "adaln_modulate"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got {tuple(x.shape)}")
    _check_dtype(x, op, "x")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"{op}: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    _check_dtype(weight, op, "weight")
    _check_mod(shift, x, op, "shift")
    _check_mod(scale, x, op, "scale")
    _check_same_device(x, op, weight=weight, shift=shift, scale=scale)


def _check_gated(x, gate, y) -> None:
    op = "gated_residual"
    if x.dim() != 3 or y.shape != x.shape:
        raise ValueError(f"{op}: x {tuple(x.shape)} and y {tuple(y.shape)} must both be (B, N, D)")
    _check_dtype(x, op, "x")
    _check_dtype(y, op, "y")
    _check_mod(gate, x, op, "gate")
    _check_same_device(x, op, gate=gate, y=y)


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("rectok_fast::adaln_modulate_fwd", mutates_args=())
def _adaln_fwd(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, rstd = extension().adaln_fwd(x, weight, shift, scale, eps)
    return out, rstd


@_adaln_fwd.register_fake
def _adaln_fwd_fake(x, weight, shift, scale, eps):
    _check_adaln(x, weight, shift, scale)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape[:2], dtype=torch.float32, device=x.device))


@torch.library.custom_op("rectok_fast::adaln_modulate_bwd", mutates_args=())
def _adaln_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
               scale: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
    dx, dw, dshift, dscale = extension().adaln_bwd(dy, x, weight, shift, scale, rstd)
    return dx, dw, dshift, dscale


@_adaln_bwd.register_fake
def _adaln_bwd_fake(dy, x, weight, shift, scale, rstd):
    def like(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return like(x), like(weight), like(shift), like(scale)


def _adaln_setup(ctx, inputs, output):
    x, weight, shift, scale, _eps = inputs
    _out, rstd = output
    # shift is kept only for its shape/dtype (it is a view of the adaLN output that scale keeps alive).
    ctx.save_for_backward(x, weight, shift, scale, rstd)


def _adaln_backward(ctx, grad_out, _grad_rstd):
    x, weight, shift, scale, rstd = ctx.saved_tensors
    dx, dw, dshift, dscale = _adaln_bwd(grad_out, x, weight, shift, scale, rstd)
    return dx, dw, dshift, dscale, None


_adaln_fwd.register_autograd(_adaln_backward, setup_context=_adaln_setup)


@torch.library.custom_op("rectok_fast::gated_residual_fwd", mutates_args=())
def _gated_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return extension().gated_fwd(x, gate, y)


@_gated_fwd.register_fake
def _gated_fwd_fake(x, gate, y):
    _check_gated(x, gate, y)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("rectok_fast::gated_residual_bwd", mutates_args=())
def _gated_bwd(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dy = extension().gated_bwd(dout, gate, y)
    return dgate, dy


@_gated_bwd.register_fake
def _gated_bwd_fake(dout, gate, y):
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(y.shape, dtype=y.dtype, device=y.device))


def _gated_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gated_backward(ctx, grad_out):
    gate, y = ctx.saved_tensors
    dgate, dy = _gated_bwd(grad_out, gate, y)
    # d out / d x is the identity; out has x's dtype, so the incoming gradient already is dx.
    dx = grad_out if grad_out.dtype == ctx.x_dtype else grad_out.to(ctx.x_dtype)
    return dx, dgate, dy


_gated_fwd.register_autograd(_gated_backward, setup_context=_gated_setup)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """Fused ``RMSNorm(x) * weight * (1 + scale) + shift`` (see reference.adaln_modulate)."""
    _check_adaln(x, weight, shift, scale)
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"adaln_modulate: eps must be a finite number >= 0, got {eps}")
    out, _rstd = _adaln_fwd(x, weight, shift, scale, eps)
    return out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fused ``x + gate * y`` (see reference.gated_residual)."""
    _check_gated(x, gate, y)
    return _gated_fwd(x, gate, y)
