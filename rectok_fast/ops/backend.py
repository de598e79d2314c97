"""The single backend switch for every fused op in rectok_fast.

Three settings, chosen with :func:`set_backend` or the ``RECTOK_FAST_IMPL`` environment variable:

* ``reference`` -- the plain-PyTorch definitions in :mod:`rectok_fast.ops.reference` everywhere.
* ``fused``     -- the fast implementations, and nothing else. A fused op that cannot run on the
  given tensors raises :class:`BackendUnavailable` naming the reason; it never falls back silently.
  Triton kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was exported
  before Python started (that is how the tests exercise them). The AdaLN ops run the C++/CUDA
  extension (its C++ path on CPU tensors).
* ``auto`` (default) -- the fast implementation where it can run (Triton on CUDA tensors; the
  extension wherever it is built), the reference elsewhere. It says once per op which it picked.

Two families of fast paths exist, and each op belongs to one:
``"triton"`` (kernels/ -> ``rectok_fast.kernels``) and ``"extension"`` (csrc/ -> ``rectok_fast._C``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch

BACKENDS = ("auto", "reference", "fused")
ENV_VAR = "RECTOK_FAST_IMPL"

logger = logging.getLogger("rectok_fast.ops")


class BackendUnavailable(RuntimeError):
    """An explicitly requested fused backend cannot run on these inputs."""


def _validate(name: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown rectok_fast backend {name!r}; choose one of {BACKENDS} "
                         f"(argument or the {ENV_VAR} environment variable)")
    return name


_backend = _validate(os.environ.get(ENV_VAR, "auto"))
_announced: set[tuple[str, str]] = set()


def set_backend(name: str) -> None:
    """Select the backend for the whole package: 'auto', 'reference' or 'fused'."""
    global _backend
    _backend = _validate(name)
    _announced.clear()


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily switch the backend (tests, benchmarks, the reference-path check)."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERROR: list = []   # computed once; a plain global keeps torch.compile from tracing a cache wrapper


def triton_import_error() -> str | None:
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_ERROR.append(None)
        except Exception as exc:  # pragma: no cover - depends on the install
            _TRITON_ERROR.append(f"triton could not be imported: {exc!r}")
    return _TRITON_ERROR[0]


def extension_import_error() -> str | None:
    """None when the C++/CUDA extension loaded, else the reason it did not."""
    from rectok_fast.ops import adaln_ext
    return adaln_ext.load_error()


def extension_has_cuda() -> bool:
    from rectok_fast.ops import adaln_ext
    return adaln_ext.has_cuda()


def _why_triton_cannot_run(device: torch.device) -> str | None:
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreter_enabled():
            return None
        return ("Triton kernels need CUDA tensors; on CPU tensors they only run in the Triton interpreter, "
                "which must be enabled by exporting TRITON_INTERPRET=1 before Python starts")
    return f"Triton kernels do not support tensors on device {device.type!r}"


def _why_extension_cannot_run(device: torch.device) -> str | None:
    err = extension_import_error()
    if err:
        return err
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if extension_has_cuda():
            return None
        return ("the rectok_fast C++ extension was built without CUDA kernels (CPU-only torch, nvcc missing, "
                "or RECTOK_FAST_SKIP_CUDA=1 at build time); rebuild it on a CUDA machine")
    return f"the rectok_fast extension does not support tensors on device {device.type!r}"


def _announce(op: str, choice: str, why: str) -> None:
    key = (op, choice)
    if key in _announced:
        return
    _announced.add(key)
    msg = f"[rectok_fast] {op}: using the {choice} implementation ({why})"
    logger.info(msg)
    if os.environ.get("RECTOK_FAST_QUIET", "0") in ("", "0"):
        print(msg, file=sys.stderr)


FUSED_DTYPES = (torch.float32, torch.bfloat16)


def choose(op: str, family: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return 'reference', 'triton' or 'extension' for ``op`` on tensors of ``dtype`` on ``device``."""
    fast = {"triton": "triton", "extension": "extension"}[family]
    why_not = _why_triton_cannot_run if family == "triton" else _why_extension_cannot_run
    if _backend == "reference":
        return "reference"
    reason = why_not(device)
    if reason is None and dtype is not None and dtype not in FUSED_DTYPES:
        reason = f"the fused kernels take float32 or bfloat16 activations, not {dtype}"
    if _backend == "fused":
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend 'fused' was requested but cannot run: {reason}. "
                                     f"Use set_backend('auto') or {ENV_VAR}=auto to fall back to the reference.")
        return fast
    # auto: Triton only on CUDA tensors (the interpreter is for tests, far too slow for real use).
    if reason is None and not (family == "triton" and device.type != "cuda"):
        _announce(op, fast, f"auto, {device.type} tensors")
        return fast
    _announce(op, "reference", f"auto, {reason or 'Triton kernels are used on CUDA tensors only'}")
    return "reference"
