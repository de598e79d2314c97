"""``python -m rectok_fast.env_report``: what this installation can run.

Prints the torch / Triton / CUDA versions, whether the C++/CUDA extension is built (and with which
parts), why it failed to load if it did, whether Triton can run (and in interpreter mode), which
implementation each op would use under each backend, and whether the optional training
dependencies (DeepSpeed, DALI, timm) are present.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

OPTIONAL = (("deepspeed", "deepspeed"), ("nvidia.dali", "nvidia-dali-cuda130"), ("timm", "timm"),
            ("torchvision", "torchvision"))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvcc_version() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    nvcc = shutil.which("nvcc") or (os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None)
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:  # pragma: no cover
        return None
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return f"{lines[-1].strip()} ({nvcc})" if lines else nvcc


def report() -> str:
    import torch

    from rectok_fast import ops
    from rectok_fast.ops import adaln_ext, backend, registry

    rows: list[tuple[str, str]] = []
    add = lambda k, v: rows.append((k, str(v)))  # noqa: E731
    add("python", f"{platform.python_version()} ({sys.executable})")
    add("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    add("CUDA available", f"{torch.cuda.is_available()}" + (
        f", {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    add("nvcc", _nvcc_version() or "not found")
    add("CUDA_HOME / TORCH_CUDA_ARCH_LIST", f"{os.environ.get('CUDA_HOME', '-')} / "
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '-')}")
    caps = backend.capabilities()          # detected once, when rectok_fast.ops was imported
    add("triton", caps.triton_error or _version("triton") or "importable (version unknown)")
    add("triton interpreter", "on (TRITON_INTERPRET=1)" if caps.triton_interpreter else "off")

    err = caps.ext_error
    if err is None:
        ext = adaln_ext.extension()
        add("extension rectok_fast._C", f"built ({getattr(ext, '__file__', '?')})")
        add("  CPU path", "yes")
        add("  CUDA kernels", "yes (compiled for TORCH_CUDA_ARCH_LIST at build time)" if caps.ext_has_cuda
            else "no (built with RECTOK_FAST_SKIP_CUDA=1, without nvcc, or with a CPU-only torch)")
        try:
            cfg = adaln_ext.cuda_launch_config(1152, torch.bfloat16, "adaln_bwd")
            add("  CUDA row limit", f"D <= {cfg['max_dim']} (one row group of threads per row)")
        except Exception as exc:  # pragma: no cover
            add("  CUDA row limit", f"? ({exc})")
    else:
        add("extension rectok_fast._C", "NOT available")
        add("  load error", err)

    add("backend (RECTOK_FAST_IMPL)", backend.get_backend())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    previous = backend.get_backend()
    quiet = os.environ.get("RECTOK_FAST_QUIET")
    os.environ["RECTOK_FAST_QUIET"] = "1"  # choose() announces its picks; not wanted in a report
    try:
        for name in ("auto", "reference", "fused"):
            backend.set_backend(name)
            for dev in devices:
                picks = []
                for spec in registry.OPS:
                    op = spec.name
                    try:
                        picks.append(f"{op} [{spec.family}]={ops.implementation_for(op, dev)}")
                    except backend.BackendUnavailable as exc:
                        picks.append(f"{op}=UNAVAILABLE ({str(exc).split(': ', 2)[-1].split('. Use')[0]})")
                add(f"ops under '{name}' on {dev}", "\n    ".join([""] + picks))
    finally:
        backend.set_backend(previous)
        if quiet is None:
            os.environ.pop("RECTOK_FAST_QUIET", None)
        else:
            os.environ["RECTOK_FAST_QUIET"] = quiet

    for mod, dist in OPTIONAL:
        ver = _version(dist)
        if ver is None:
            try:
                ver = "present (version unknown)" if importlib.util.find_spec(mod) else None
            except ModuleNotFoundError:
                ver = None
        add(mod, ver or "not installed")
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)} : {v}" for k, v in rows)


def main(argv=None) -> int:
    print("rectok_fast environment report")
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
