"""Launch helpers shared by the Triton kernels in this package (not a public API).

* :func:`alloc` is the single place where the launchers allocate what a kernel writes. Tests set
  :data:`POISON` to fill every such buffer with NaN (or -1 for integers) first, so an element a
  kernel forgot to write shows up instead of passing by luck.
* :func:`use_custom_op`: each op exists twice over the same launchers: a ``torch.library`` custom
  op (with fake kernel and registered autograd) that ``torch.compile`` traces, and a plain
  ``torch.autograd.Function`` for eager mode, whose dispatch costs a few microseconds instead of
  the ~20-30 us of a Python custom op per call (this matters for ops whose kernels take tens of
  microseconds on an H200).
* :func:`define_op` registers an op's launcher function: as a ``torch.library.triton_op`` where the
  kernels really compile (so inductor sees the Triton kernels inside, not an opaque call), as a
  ``custom_op`` with an explicit fake kernel in the Triton interpreter (where ``wrap_triton`` cannot
  trace an interpreted kernel). :func:`kernel` gives a launcher the kernel to call: wrapped by
  ``wrap_triton`` inside the op (traceable), the bare kernel in the eager twin (no HOP dispatch).
* :func:`check_tensor` gives the clear input errors the ops promise (device, dtype, rank).
* :func:`interpreted` tells a launcher that kernels run in the Triton interpreter (CPU tensors,
  ``TRITON_INTERPRET=1``); there fp32 -> bf16 casts truncate instead of rounding to nearest even,
  so kernels take a ``ROUND_BF16`` constexpr that rounds in integer arithmetic first (see
  :func:`round_to_bf16`). On a GPU the native cast already rounds to nearest even.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

POISON = False                     # tests flip this to catch unwritten outputs
FORCE_CUSTOM_OP = False            # tests flip this to run the torch.library path in eager mode too
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_custom_op() -> bool:
    return FORCE_CUSTOM_OP or torch.compiler.is_compiling()


# Decided once at import: the interpreter setting cannot change inside a process (triton.jit reads it).
TRITON_OPS = not interpreted()


def define_op(name: str, fake):
    """Decorator: register ``fn`` as op ``name`` (triton_op on real Triton, custom_op + ``fake`` in the interpreter)."""
    def register(fn):
        if TRITON_OPS:
            return torch.library.triton_op(name, fn, mutates_args=())
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return register


def kernel(jit_fn, traced: bool):
    """``jit_fn`` wrapped for tracing inside a triton_op (``traced``), or bare for eager launches."""
    return torch.library.wrap_triton(jit_fn) if (traced and TRITON_OPS) else jit_fn


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN / -1 filled when :data:`POISON` is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def check_tensor(op: str, name: str, t, *, dim: int | None = None, dtypes=FLOAT_DTYPES,
                 device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")


_TICKETS: dict = {}


def ticket_counter(device: torch.device, traced: bool = False) -> torch.Tensor:
    """A zero int32 counter for a kernel that finishes its reduction in its last program (see
    ``cosine_distill._cos_fwd_kernel``): each program adds 1 after writing its partial, the one that
    draws the last ticket sums all partials in a fixed order and sets the counter back to 0.

    Eager launches share one counter per device and stream, allocated once: the kernel leaves it at 0,
    so no per-call zero-fill launch is needed (also across CUDA-graph replays). Launches on one stream
    run in order, so they never share a counter concurrently. Traced launches (inside a triton_op) get a
    fresh zeroed counter per call: a hidden buffer must not leak into the graph."""
    if traced:
        return torch.zeros(1, dtype=torch.int32, device=device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index, torch.cuda.current_stream(index).stream_id)
    else:
        key = (device.type, device.index, 0)
    counter = _TICKETS.get(key)
    if counter is None:
        counter = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


FLOAT_SCALAR_ARGS = ("inv_rows", "gamma")


def signature(jit_fn, constexprs: dict, pointers: dict, default_ptr: str = "*fp32") -> dict:
    """Triton signature (name -> type) of ``jit_fn`` for an ahead-of-time compile (static report,
    sm_90 build test): pointers from ``pointers`` (else ``default_ptr``), float scalars fp32, ints i32,
    constexprs marked as such."""
    out = {}
    for name in jit_fn.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name.endswith("_ptr"):
            out[name] = pointers.get(name, default_ptr)
        else:
            out[name] = "fp32" if name in FLOAT_SCALAR_ARGS else "i32"
    return out


def needs_bf16_rounding(*dtypes: torch.dtype) -> bool:
    """True when the interpreter would truncate a cast to one of ``dtypes`` (bf16 only: numpy rounds fp16)."""
    return interpreted() and any(d == torch.bfloat16 for d in dtypes)


def num_warps_for(elements_per_program: int) -> int:
    if elements_per_program >= 8192:
        return 8
    if elements_per_program >= 2048:
        return 4
    return 2 if elements_per_program >= 512 else 1


@triton.jit
def round_to_bf16(v):
    """Round fp32 ``v`` to the nearest bf16 value (ties to even), still held in fp32.

    Used only in the interpreter (its casts truncate). NaN and inf stay NaN and inf; finite values
    near the bf16 maximum round to inf exactly as a real cast does.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def store_cast(ptr, v, mask, ROUND: tl.constexpr):
    """Store fp32 ``v`` into ``ptr``'s dtype (rounding to nearest even in the interpreter if ROUND)."""
    if ROUND:
        if ptr.dtype.element_ty == tl.bfloat16:
            v = round_to_bf16(v)
    tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)
