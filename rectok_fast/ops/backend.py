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

Each op belongs to one family (see :mod:`rectok_fast.ops.registry`): ``"triton"`` or ``"cuda-ext"``.

Whole graphs: what the installation can do (:class:`Capabilities`: Triton importable, interpreter on,
extension loaded, extension has CUDA kernels) is detected ONCE, when :mod:`rectok_fast.ops` is
imported, and kept as plain Python values. :func:`choose` only reads those values and the tensors'
device/dtype, so torch.compile traces it without graph breaks (no imports, no pybind calls, no
logging: the once-per-op announcement is skipped while compiling). Tests inject other capabilities
with :func:`use_capabilities` to exercise the CUDA-path decisions on a CPU machine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys

import torch

from rectok_fast.ops.registry import BY_NAME, FUSED_DTYPES

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
_decided: dict = {}    # eager-call memo: (op, device type, dtype) -> choice; cleared on every change
_listeners: list = []  # called after every change of backend or capabilities (rectok_fast.ops' eager cache)


def on_change(fn) -> None:
    """Call ``fn()`` after every :func:`set_backend` / :func:`set_capabilities` (caches of decisions)."""
    _listeners.append(fn)


def _changed() -> None:
    _announced.clear()
    _decided.clear()
    for fn in _listeners:
        fn()


def set_backend(name: str) -> None:
    """Select the backend for the whole package: 'auto', 'reference' or 'fused'."""
    global _backend
    _backend = _validate(name)
    _changed()


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


# --------------------------------------------------------------------------------------- capabilities
@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this installation can run, as plain values (read by :func:`choose` while compiling)."""
    triton_error: str | None       # None when triton imports
    triton_interpreter: bool       # TRITON_INTERPRET=1 at load time (Triton kernels on CPU tensors)
    ext_error: str | None          # None when rectok_fast._C loaded
    ext_has_cuda: bool             # the extension holds its CUDA kernels


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def detect_capabilities() -> Capabilities:
    """Probe the installation (imports triton and the extension); load time only."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        triton_error = None
    except Exception as exc:  # pragma: no cover - depends on the install
        triton_error = f"triton could not be imported: {exc!r}"
    from rectok_fast.ops import adaln_ext
    ext_error = adaln_ext.load_error()
    return Capabilities(triton_error=triton_error, triton_interpreter=_env_flag("TRITON_INTERPRET"),
                        ext_error=ext_error, ext_has_cuda=ext_error is None and bool(adaln_ext.has_cuda()))


_caps: Capabilities | None = None


def capabilities() -> Capabilities:
    global _caps
    if _caps is None:
        _caps = detect_capabilities()
    return _caps


def set_capabilities(caps: Capabilities | None) -> None:
    """Replace the detected capabilities (tests); None re-detects on next use."""
    global _caps
    _caps = caps
    _changed()


@contextlib.contextmanager
def use_capabilities(**changes):
    """Temporarily pretend the installation differs, e.g. ``use_capabilities(ext_has_cuda=True)``."""
    previous = capabilities()
    set_capabilities(dataclasses.replace(previous, **changes))
    try:
        yield
    finally:
        set_capabilities(previous)


# Kept for env_report and older callers: the same facts, read from the cached capabilities.
def triton_interpreter_enabled() -> bool:
    return capabilities().triton_interpreter


def triton_import_error() -> str | None:
    return capabilities().triton_error


def extension_import_error() -> str | None:
    return capabilities().ext_error


# ----------------------------------------------------------------------------------------- decision
_NEED_INTERPRETER = ("Triton kernels need CUDA tensors; on CPU tensors they only run in the Triton interpreter, "
                     "which must be enabled by exporting TRITON_INTERPRET=1 before Python starts")
_EXT_NO_CUDA = ("the rectok_fast C++ extension was built without CUDA kernels (CPU-only torch, nvcc missing, "
                "or RECTOK_FAST_SKIP_CUDA=1 at build time); rebuild it on a CUDA machine")
_AUTO_TRITON_CPU = "Triton kernels are used on CUDA tensors only"


def why_cannot_run(family: str, device_type: str, dtype: torch.dtype | None, caps: Capabilities) -> str | None:
    """None when ``family`` can run on tensors of ``dtype`` on ``device_type``, else the reason."""
    if family == "triton":
        if caps.triton_error is not None:
            return caps.triton_error
        if device_type == "cpu" and not caps.triton_interpreter:
            return _NEED_INTERPRETER
        if device_type not in ("cpu", "cuda"):
            return "Triton kernels do not support tensors on device " + device_type
    else:
        if caps.ext_error is not None:
            return caps.ext_error
        if device_type == "cuda" and not caps.ext_has_cuda:
            return _EXT_NO_CUDA
        if device_type not in ("cpu", "cuda"):
            return "the rectok_fast extension does not support tensors on device " + device_type
    if dtype is not None and dtype not in FUSED_DTYPES:
        return "the fused kernels take float32 or bfloat16 activations, not " + str(dtype)
    return None


def _announce(op: str, choice: str, why: str) -> None:
    key = (op, choice)
    if key in _announced:
        return
    _announced.add(key)
    msg = f"[rectok_fast] {op}: using the {choice} implementation ({why})"
    logger.info(msg)
    if not _env_flag("RECTOK_FAST_QUIET"):
        print(msg, file=sys.stderr)


def choose(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return 'reference' or the op's family ('triton' / 'cuda-ext') for tensors of ``dtype`` on ``device``.

    Pure over plain values while torch.compile traces (the announcement happens in eager calls only).
    Eager calls hit a memo first (a dict lookup instead of the decision, for the per-call overhead).
    """
    if torch.compiler.is_compiling():
        return _decide(op, device, dtype)
    key = (op, device.type, dtype)
    choice = _decided.get(key)
    if choice is None:
        choice = _decided[key] = _decide(op, device, dtype)
    return choice


def _decide(op: str, device: torch.device, dtype: torch.dtype | None) -> str:
    if _backend == "reference":
        return "reference"
    family = BY_NAME[op].family
    device_type = device.type
    reason = why_cannot_run(family, device_type, dtype, _caps if _caps is not None else capabilities())
    if _backend == "fused":
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend 'fused' was requested but cannot run: {reason}. "
                                     f"Use set_backend('auto') or {ENV_VAR}=auto to fall back to the reference.")
        return family
    # auto: Triton only on CUDA tensors (the interpreter is for tests, far too slow for real use).
    if reason is None and family == "triton" and device_type != "cuda":
        reason = _AUTO_TRITON_CPU
    choice = family if reason is None else "reference"
    if not torch.compiler.is_compiling():
        _announce(op, choice, f"auto, {device_type} tensors" if reason is None else f"auto, {reason}")
    return choice
