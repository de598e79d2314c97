"""The extension's CUDA sources compile for sm_90 with this machine's nvcc (no GPU needed).

Fast path (CI): when setup.py already built ``rectok_fast._C`` with its CUDA kernels and the .so is
newer than every csrc/ source, inspect the .so instead of recompiling: it must embed a fatbinary with
sm_90 machine code (ELF) that contains every kernel. The toolkit here has no cuobjdump, so the
fatbinary headers are read directly (magic 0xBA55ED50; each entry: kind 2 = ELF, SM at byte 28). Otherwise (built with RECTOK_FAST_SKIP_CUDA=1, not built, or stale sources)
compile each csrc/*.cu with nvcc for sm_90 into a temporary directory (slow: about a minute per
file on two cores). Skipped only when nvcc is absent.
"""
from __future__ import annotations

import glob
import os
import struct
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
KERNELS = ("adaln_fwd_kernel", "adaln_bwd_kernel", "gated_fwd_kernel", "gated_bwd_kernel", "sum_partials_kernel")


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def _nvcc() -> str | None:
    home = _cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")


pytestmark = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (set CUDA_HOME)")


def _sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CSRC, "*.cu")))


def _fresh_cuda_build() -> str | None:
    """The built extension .so when it has CUDA kernels and is newer than all of csrc/, else None."""
    from rectok_fast.ops import adaln_ext
    if adaln_ext.load_error() is not None or not adaln_ext.has_cuda():
        return None
    so = adaln_ext.extension().__file__
    newest_src = max(os.path.getmtime(p) for p in glob.glob(os.path.join(CSRC, "*")))
    return so if os.path.getmtime(so) >= newest_src else None


_FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


def _fatbin_entries(blob: bytes):
    """(kind, sm, payload) of every entry of every fatbinary embedded in ``blob``."""
    out = []
    i = blob.find(_FATBIN_MAGIC)
    while i != -1:
        _magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", blob, i)
        p, end = i + hsize, i + hsize + fsize
        while p + 32 <= end:
            kind, _u, ehs, size = struct.unpack_from("<HHIQ", blob, p)
            sm = struct.unpack_from("<I", blob, p + 28)[0]
            out.append((kind, sm, blob[p + ehs:p + ehs + size]))
            if ehs == 0 or size == 0:
                break
            p += ehs + size
        i = blob.find(_FATBIN_MAGIC, max(i + 4, end))
    return out


def _sm90_code(path: str) -> list[bytes]:
    """The sm_90 ELF images embedded in a .so / .o; fails when there are none."""
    with open(path, "rb") as f:
        entries = _fatbin_entries(f.read())
    elfs = [payload for kind, sm, payload in entries if kind == 2 and sm == 90]
    assert elfs, f"no sm_90 machine code in {path}: entries (kind, sm) = {[(k, s) for k, s, _ in entries]}"
    return elfs


def _check_kernels(elfs: list[bytes], where: str) -> None:
    if all(e.startswith(b"\x7fELF") for e in elfs):  # uncompressed cubins: the kernel names are readable
        missing = [k for k in KERNELS if not any(k.encode() in e for e in elfs)]
        assert not missing, f"kernels missing from the sm_90 code of {where}: {missing}"


def test_cuda_sources_compile_for_sm90(tmp_path):
    assert _sources(), "no .cu sources in csrc/"
    so = _fresh_cuda_build()
    if so is not None:
        _check_kernels(_sm90_code(so), so)
        return
    # No (fresh) CUDA build to inspect: compile the sources, as setup.py would, for sm_90.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    inc = [os.path.join(os.path.dirname(torch.__file__), "include"),
           os.path.join(os.path.dirname(torch.__file__), "include", "torch", "csrc", "api", "include"),
           sysconfig.get_paths()["include"], CSRC]
    inc += [p for p in glob.glob(os.path.join(site, "nvidia", "cu1*", "include")) if os.path.isdir(p)]
    elfs = []
    for src in _sources():
        obj = tmp_path / (os.path.basename(src) + ".o")
        cmd = [_nvcc(), "-c", src, "-o", str(obj), "-std=c++20", "-O3", "--use_fast_math",
               "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC", "-DRECTOK_FAST_WITH_CUDA=1",
               "-DTORCH_EXTENSION_NAME=_C"] + [f"-I{p}" for p in inc]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"nvcc failed for {src}:\n{res.stderr[-4000:]}"
        assert obj.exists() and obj.stat().st_size > 0
        elfs += _sm90_code(str(obj))
    _check_kernels(elfs, "the compiled objects")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
