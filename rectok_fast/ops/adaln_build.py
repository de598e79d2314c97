"""Standalone sm_90 compilation of the AdaLN CUDA kernels and their ptxas resource usage.

No GPU is needed: nvcc compiles csrc/*.cu (which include no ATen, so each file takes seconds) with the
flags setup.py uses plus ``--resource-usage``, and :func:`ptxas_resources` parses what ptxas reports
per kernel: registers per thread, spill stores / loads, stack frame, static shared memory. Used by
tests/test_cuda_build.py (zero spills) and benchmarks/static_report.py.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ARCH = "90"
NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}",
              "-Xcompiler", "-fPIC", "-DRECTOK_FAST_WITH_CUDA=1", "--resource-usage"]


def cuda_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def nvcc_path() -> str | None:
    """nvcc of CUDA_HOME (as torch.utils.cpp_extension finds it), else the one on PATH."""
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def nvcc_command(src: str | os.PathLike, obj: str | os.PathLike) -> list[str]:
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME to a CUDA toolkit")
    return [nvcc, "-c", str(src), "-o", str(obj), f"-I{CSRC}", *NVCC_FLAGS]


_ENTRY = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes cumulative stack size)?"
                   r"(?:, (\d+) bytes smem)?")


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return names
    return [re.sub(r"rectok::cuda::(\(anonymous namespace\)::)?", "", n).split("(")[0].replace("void ", "", 1)
            for n in out]


def parse_resource_usage(text: str, file: str = "") -> list[dict]:
    """One dict per kernel from nvcc --resource-usage output."""
    rows, name, spill = [], None, (0, 0, 0)
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            name, spill = m.group(1), (0, 0, 0)
            continue
        m = _SPILL.search(line)
        if m and name:
            spill = tuple(int(v) for v in m.groups())
            continue
        m = _USED.search(line)
        if m and name:
            rows.append({"file": file, "mangled": name, "registers": int(m.group(1)),
                         "barriers": int(m.group(2) or 0), "stack_bytes": spill[0], "spill_stores": spill[1],
                         "spill_loads": spill[2], "smem_bytes": int(m.group(4) or 0)})
            name = None
    for row, pretty in zip(rows, _demangle([r["mangled"] for r in rows])):
        row["kernel"] = pretty
    return rows


def compile_source(src: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, list[dict]]:
    """Compile one .cu for sm_90; returns the object file and its per-kernel resources. Raises on errors."""
    obj = Path(out_dir) / (Path(src).name + ".o")
    res = subprocess.run(nvcc_command(src, obj), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src}:\n{res.stderr[-4000:]}")
    return obj, parse_resource_usage(res.stdout + res.stderr, Path(src).name)


def ptxas_resources(out_dir: str | os.PathLike) -> list[dict]:
    """Compile every csrc/*.cu into out_dir; the resources of every kernel instantiation."""
    rows = []
    for src in cuda_sources():
        rows += compile_source(src, out_dir)[1]
    return rows
