"""Loader of the C++/CUDA AdaLN extension (``rectok_fast._C``, sources in csrc/).

Importing ``rectok_fast._C`` registers four dispatcher operators in C++ (``TORCH_LIBRARY``): schema,
CPU and CUDA kernels, Meta kernels (what torch.compile traces with) and the autograd formulas
(C++ autograd Functions)::

    torch.ops.rectok_fast.adaln_modulate_fwd(x, weight, shift, scale, eps) -> (out, rstd)
    torch.ops.rectok_fast.adaln_modulate_bwd(grad_out, x, weight, shift, scale, rstd) -> (dx, dweight, dshift, dscale)
    torch.ops.rectok_fast.gated_residual_fwd(x, gate, y) -> out
    torch.ops.rectok_fast.gated_residual_bwd(grad_out, gate, y) -> (dgate, dy)

so an eager call runs Python -> dispatcher -> C++ with no Python custom-op layer (and, through
:data:`adaln_modulate_eager` / :data:`gated_residual_eager`, without the torch.ops layer either), and
``torch.compile(fullgraph=True)`` traces them. Every input check (shapes, dtypes, devices, eps)
lives in C++ and raises ValueError / TypeError naming the problem.

The extension is loaded once, at import; :data:`LOAD_ERROR` and :data:`HAS_CUDA` are plain Python
values, so dispatch decisions never call into the extension (nothing for a trace to break on).
"""
from __future__ import annotations

import contextlib
import importlib

import torch

__all__ = ["adaln_modulate", "gated_residual", "adaln_modulate_eager", "gated_residual_eager",
           "adaln_modulate_fwd", "adaln_modulate_bwd", "gated_residual_fwd", "gated_residual_bwd",
           "LOAD_ERROR", "HAS_CUDA", "load_error", "has_cuda", "extension", "poison_outputs",
           "cuda_launch_config", "cuda_launch_plan", "opcheck_samples", "CUDA_KERNELS"]


def _import_extension():
    """(module, None) or (None, a sentence naming why rectok_fast._C cannot be used)."""
    try:
        return importlib.import_module("rectok_fast._C"), None
    except ModuleNotFoundError as exc:
        if exc.name in ("rectok_fast._C", "_C"):
            return None, ("the rectok_fast C++ extension (rectok_fast._C) is not built: install with "
                          "`CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .` "
                          "(and without RECTOK_FAST_SKIP_EXT=1)")
        return None, f"rectok_fast._C could not be imported: {exc}"
    except ImportError as exc:  # undefined symbol / wrong torch ABI / missing libc10_cuda ...
        return None, (f"rectok_fast._C is built but failed to load ({exc}); it was probably compiled against a "
                      f"different torch than the installed {torch.__version__}: rebuild it")
    except Exception as exc:  # pragma: no cover - anything else is also a load failure
        return None, f"rectok_fast._C failed to load: {exc!r}"


_EXT, LOAD_ERROR = _import_extension()
#: Whether the loaded extension contains its CUDA kernels (not whether a GPU is present).
HAS_CUDA: bool = bool(_EXT is not None and _EXT.has_cuda())

#: The CUDA kernel families and what each covers (the names ``cuda_launch_config`` takes).
CUDA_KERNELS = {
    "adaln_fwd": "adaln_fwd_kernel: modulated RMSNorm forward, one row per row group",
    "adaln_bwd": "adaln_bwd_kernel + finish_kernel: dx, per-token dscale, column sums (dweight, per-sample dshift/dscale)",
    "gated_fwd": "gated_fwd_kernel: x + gate * y, one row per row group",
    "gated_bwd_token": "gated_bwd_token_kernel: dy and dgate with a per-token gate (element-wise)",
    "gated_bwd_sample": "gated_bwd_sample_kernel + finish_kernel: dy and the per-sample dgate column sums",
}


def load_error() -> str | None:
    """None when the extension loaded, else a sentence naming the cause."""
    return LOAD_ERROR


def has_cuda() -> bool:
    """Whether the loaded extension contains its CUDA kernels (not whether a GPU is present)."""
    return HAS_CUDA


def extension():
    """The loaded ``rectok_fast._C`` module; raises with the load error when it is unavailable."""
    if _EXT is None:
        raise RuntimeError(LOAD_ERROR)
    return _EXT


# Dynamo folds is_dynamo_compiling() to True; eagerly it is one trivial call (is_compiling() is two).
_is_compiling = torch.compiler.is_dynamo_compiling

if _EXT is not None:
    adaln_modulate_fwd = torch.ops.rectok_fast.adaln_modulate_fwd.default
    adaln_modulate_bwd = torch.ops.rectok_fast.adaln_modulate_bwd.default
    gated_residual_fwd = torch.ops.rectok_fast.gated_residual_fwd.default
    gated_residual_bwd = torch.ops.rectok_fast.gated_residual_bwd.default
    #: Eager fast paths (C functions of the extension): one C call into the dispatcher, skipping the
    #: torch.ops layer (OpOverload.__call__, schema-driven argument parsing, the boxed call). They
    #: return None when they do not take the call (a tensor subclass or a TorchFunctionMode, x of an
    #: unsupported dtype or device), and the caller goes through the OpOverload, which handles those
    #: and raises the usual errors. Never called while torch.compile traces: the trace sees the OpOverload.
    adaln_modulate_eager = _EXT.adaln_modulate_eager
    gated_residual_eager = _EXT.gated_residual_eager

    def adaln_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
        """Fused ``RMSNorm(x) * weight * (1 + scale) + shift`` (see reference.adaln_modulate)."""
        if not _is_compiling():
            out = adaln_modulate_eager(x, weight, shift, scale, eps)
            if out is not None:
                return out
        return adaln_modulate_fwd(x, weight, shift, scale, eps)[0]

    def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fused ``x + gate * y`` (see reference.gated_residual)."""
        if not _is_compiling():
            out = gated_residual_eager(x, gate, y)
            if out is not None:
                return out
        return gated_residual_fwd(x, gate, y)
else:
    def _unavailable(*_args, **_kwargs):
        raise RuntimeError(LOAD_ERROR)

    adaln_modulate_fwd = adaln_modulate_bwd = gated_residual_fwd = gated_residual_bwd = _unavailable
    adaln_modulate = gated_residual = _unavailable
    adaln_modulate_eager = gated_residual_eager = None


def cuda_launch_config(D: int, dtype: torch.dtype = torch.bfloat16, kernel: str = "adaln_fwd", B: int = 64,
                       N: int = 256, per_token: bool = False) -> dict:
    """Launch configuration of a CUDA kernel (``CUDA_KERNELS``) for (B, N, D) rows of ``dtype`` (and a
    per-token or per-sample scale): threads per row and per block, row groups, 16-byte chunks per thread,
    rows per block and per group, rows prefetched, grid, partial-sum rows, __launch_bounds__, the widest
    supported D. Read from the C++ header the kernels are compiled with (csrc/adaln_launch.h); host-only,
    works without a GPU. Raises ValueError when D is too wide for the kernels."""
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, str(dtype))
    return dict(extension().cuda_launch_config(kernel, int(B), int(N), int(D), name, bool(per_token)))


_CXX_TYPE = {torch.float32: "float", torch.bfloat16: "__nv_bfloat16"}


def cuda_launch_plan(op: str, B: int, N: int, D: int, dtype: torch.dtype = torch.bfloat16,
                     per_token: bool = False) -> list[dict]:
    """The CUDA launches of one call of ``op`` ("adaln_modulate" or "gated_residual") on contiguous,
    16-byte-aligned (B, N, D) activations of ``dtype`` with modulation of the same dtype (chunk views of
    one adaLN output), per sample or per token: [{phase, kernel, grid, block, smem, bytes}], forward then
    backward. ``kernel`` is the demangled name nvcc gives the instantiation; ``bytes`` is the minimal
    DRAM traffic of that launch (each input read once, each output written once). Host-only."""
    s = torch.empty((), dtype=dtype).element_size()
    t = _CXX_TYPE[dtype]
    row = B * N * D * s                       # one (B, N, D) activation tensor
    mod = row if per_token else B * D * s     # one modulation tensor
    tok = "true" if per_token else "false"

    def launch(kernel, phase, cfg, nbytes):
        return dict(phase=phase, kernel=f"rectok::cuda::{kernel}", grid=(*cfg["grid"], 1),
                    block=(cfg["threads_per_block"], 1, 1), smem=0, bytes=nbytes)

    def finish(cfg, partial_bufs, out_bytes):
        part = cfg["partial_rows"] * D * 4
        return dict(phase="bwd", kernel=f"rectok::cuda::finish_kernel<{t}>", grid=(cfg["finish_grid"], 1, 1),
                    block=(cfg["finish_threads_per_block"], 1, 1), smem=0, bytes=partial_bufs * part + out_bytes)

    if op == "adaln_modulate":
        fwd = cuda_launch_config(D, dtype, "adaln_fwd", B, N)
        bwd = cuda_launch_config(D, dtype, "adaln_bwd", B, N, per_token)
        # per-token scale and shift: dscale written per token, dshift = grad_out (no traffic), one partial
        # buffer (dweight); per sample: two partial buffers (dweight / dscale and dshift)
        nbuf = 1 if per_token else 2
        part = bwd["partial_rows"] * D * 4
        return [launch(f"adaln_fwd_kernel<{t}, {t}, true>", "fwd", fwd, 2 * row + 2 * mod + 4 * D + 4 * B * N),
                launch(f"adaln_bwd_kernel<{t}, {t}, true, {tok}, {tok}>", "bwd", bwd,
                       3 * row + mod + 4 * B * N + 4 * D + (row if per_token else 0) + nbuf * part),
                finish(bwd, nbuf, 4 * D + (0 if per_token else 2 * B * D * s + B * D * s))]
    if op == "gated_residual":
        fwd = cuda_launch_config(D, dtype, "gated_fwd", B, N)
        plan = [launch(f"gated_fwd_kernel<{t}, {t}, {t}, true>", "fwd", fwd, 3 * row + mod)]
        if per_token:
            bwd = cuda_launch_config(D, dtype, "gated_bwd_token", B, N)
            return plan + [launch(f"gated_bwd_token_kernel<{t}, {t}, {t}, true>", "bwd", bwd, 4 * row + mod)]
        bwd = cuda_launch_config(D, dtype, "gated_bwd_sample", B, N)
        return plan + [launch(f"gated_bwd_sample_kernel<{t}, {t}, {t}, true>", "bwd", bwd,
                              3 * row + mod + bwd["partial_rows"] * D * 4),
                       finish(bwd, 1, B * D * s)]
    raise ValueError(f"cuda_launch_plan: op must be 'adaln_modulate' or 'gated_residual', got {op!r}")


def opcheck_samples(device) -> list:
    """One sample call per op, forward and backward, per-sample and per-token modulation (chunk views of
    one adaLN output), for tests/test_opcheck.py (the registry's hook)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)
    B, N, D = 2, 3, 8
    samples = []
    for ada in (rnd(B, 6 * D), rnd(B, N, 6 * D)):
        x, w, y = rnd(B, N, D).requires_grad_(True), rnd(D).requires_grad_(True), rnd(B, N, D).requires_grad_(True)
        shift, scale, gate = (t.detach().requires_grad_(True) for t in ada.chunk(6, dim=-1)[:3])
        _, rstd = adaln_modulate_fwd(x.detach(), w.detach(), shift.detach(), scale.detach(), 1e-6)
        dy = rnd(B, N, D)
        samples += [("rectok_fast::adaln_modulate_fwd", (x, w, shift, scale, 1e-6)),
                    ("rectok_fast::adaln_modulate_bwd", (dy, x.detach(), w.detach(), shift.detach(), scale.detach(),
                                                         rstd)),
                    ("rectok_fast::gated_residual_fwd", (x, gate, y)),
                    ("rectok_fast::gated_residual_bwd", (dy, gate.detach(), y.detach()))]
    return samples


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
