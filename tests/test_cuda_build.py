"""The extension's CUDA sources compile for sm_90 with this machine's nvcc (no GPU needed), every
kernel instantiation fits in registers (ptxas: zero spill stores/loads, no stack frame), and the
launch configurations stay inside what the kernels were compiled for.

csrc/*.cu include no ATen, so each compiles standalone in seconds (rectok_fast.ops.adaln_build runs
nvcc with setup.py's code-generation flags plus --resource-usage). The objects must embed sm_90
machine code (ELF) -- read from the fatbinary headers (magic 0xBA55ED50; each entry: kind 2 = ELF,
SM at byte 28), as the toolkit here has no cuobjdump. When setup.py built rectok_fast._C with its CUDA
kernels from the current sources, the .so is checked the same way. Skipped only when nvcc is absent.
"""
from __future__ import annotations

import os
import struct
import sys

import pytest

from rectok_fast.ops import adaln_build

KERNELS = ("adaln_fwd_kernel", "adaln_bwd_kernel", "gated_fwd_kernel", "gated_bwd_token_kernel",
           "gated_bwd_sample_kernel", "finish_kernel")

pytestmark = pytest.mark.skipif(adaln_build.nvcc_path() is None, reason="nvcc not found (set CUDA_HOME)")

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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_build")
    return [adaln_build.compile_source(src, out) for src in adaln_build.cuda_sources()]


def test_cuda_sources_compile_for_sm90(compiled):
    assert compiled, "no .cu sources in csrc/"
    elfs = []
    for obj, _ in compiled:
        assert obj.exists() and obj.stat().st_size > 0
        elfs += _sm90_code(str(obj))
    _check_kernels(elfs, "the compiled objects")


def test_no_register_spills(compiled):
    """ptxas -v of every kernel instantiation: zero spills, no local stack, within 128 registers
    (the kernels are launched with up to 512 threads)."""
    rows = [r for _, res in compiled for r in res]
    names = " ".join(r["kernel"] for r in rows)
    for k in KERNELS:
        assert k in names, f"ptxas reported no {k} (parsed: {names[:500]})"
    bad = [r for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack_bytes"] or r["registers"] > 128]
    assert not bad, "kernels that spill or use a stack frame:\n" + "\n".join(
        f"  {r['kernel']}: {r['registers']} regs, spill {r['spill_stores']}/{r['spill_loads']} B, "
        f"stack {r['stack_bytes']} B" for r in bad)


def test_fresh_extension_build_has_sm90_kernels():
    """When rectok_fast._C was built with CUDA from the current csrc/, its .so carries the kernels."""
    from rectok_fast.ops import adaln_ext
    if adaln_ext.load_error() is not None or not adaln_ext.has_cuda():
        pytest.skip("rectok_fast._C is not built with CUDA kernels")
    so = adaln_ext.extension().__file__
    newest_src = max(os.path.getmtime(p) for p in adaln_build.CSRC.iterdir())
    if os.path.getmtime(so) < newest_src:
        pytest.skip("rectok_fast._C is older than csrc/: rebuild it")
    _check_kernels(_sm90_code(so), so)


def test_parse_resource_usage():
    """The ptxas parser reads names, registers, spills, stack and shared memory."""
    text = ("ptxas info    : Function properties for _Z3fooPf\n"
            "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size, 64 bytes smem\n"
            "ptxas info    : Function properties for _Z3barv\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
            "ptxas info    : Used 12 registers, used 0 barriers\n")
    foo, bar = adaln_build.parse_resource_usage(text)
    assert (foo["registers"], foo["spill_stores"], foo["spill_loads"], foo["stack_bytes"], foo["smem_bytes"]) == \
        (40, 4, 12, 8, 64)
    assert (bar["registers"], bar["spill_stores"], bar["smem_bytes"]) == (12, 0, 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
