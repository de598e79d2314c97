"""benchmarks/static_report.py: runs on this CPU machine and reports every kernel the repository has.

The kernel lists are read from the sources independently of the report: every ``@triton.jit`` function
named ``*_kernel`` in kernels/*.py (device helpers carry other names) and every ``__global__`` function
in csrc/. The occupancy rules and the SASS reader are checked on hand-made inputs with known answers.
"""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import sass  # noqa: E402  (benchmarks/sass.py)


def _triton_kernels() -> set[str]:
    names = set()
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        src = open(path).read()
        names.update(n for n in re.findall(r"@triton\.jit(?:\([^)]*\))?\s*\ndef (\w+)\(", src) if n.endswith("_kernel"))
    return names


def _cuda_kernels() -> set[str]:
    names = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "*.cuh"))
                       + glob.glob(os.path.join(ROOT, "csrc", "*.h"))):
        src = open(path).read()
        names.update(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", src))
    return names


def _base(kernel: str) -> str:
    return kernel.split("<")[0].split("::")[-1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if sass.tool("nvcc") is None and _cuda_kernels():
        pytest.skip("nvcc not found: the static report needs it for csrc/*.cu")
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "static_report.py"), "--fast",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"static_report failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.load(open(out / "report.json"))
    return rep, (out / "report.md").read_text()


def test_every_triton_kernel_is_compiled_for_sm90(report):
    rep, md = report
    kernels = _triton_kernels()
    assert kernels, "no Triton kernels found in kernels/*.py"
    seen = {r["kernel"] for r in rep["launches"] if r["source"] == "triton"}
    assert kernels <= seen, f"kernels missing from the report: {sorted(kernels - seen)}"
    for r in rep["launches"]:
        if r["source"] == "triton":
            assert r["regs"] > 0 and r["threads"] % 32 == 0 and r["blocks_per_sm"] >= 1, r
            assert sum(r["loads"].values()) > 0 and sum(r["stores"].values()) > 0, r
            assert f"`{r['kernel']}`" in md


def test_every_cuda_kernel_is_reported(report):
    rep, md = report
    kernels = _cuda_kernels()
    reported = {_base(r["kernel"]) for r in rep["launches"] if r["source"] == "cuda"}
    reported |= {_base(o["kernel"]) for o in rep["other_cuda_instances"]}
    assert kernels <= reported, f"CUDA kernels missing from the report: {sorted(kernels - reported)}"
    launched = [r for r in rep["launches"] if r["source"] == "cuda"]
    assert launched, "no CUDA launch at the goal shapes"
    assert {r["op"] for r in launched} == {"adaln_modulate", "gated_residual"}


def test_predictions_are_fractions(report):
    rep, md = report
    assert rep["problems"] == []
    for r in rep["launches"]:
        assert 0.0 <= r["predicted_fraction_of_copy"] <= 1.0
        assert r["inflight_bytes_per_sm"] >= 0 and r["waves"] > 0
    assert rep["per_op"] and all(o["predicted_us"] > 0 for o in rep["per_op"])
    assert "Little's law" in md and "## Per op" in md


def test_triton_phases_are_single_launches(report):
    """Each Triton op phase at the goal shapes is one kernel launch: partial sums finish inside the kernel,
    autograd materializes no zero gradient, and the masked ids' range check is a device assert compiled
    into the forward kernel (not torch launches, which the report would list and charge)."""
    rep, md = report
    triton_ops = {r["op"] for r in rep["launches"] if r["source"] == "triton"}
    phases = [o for o in rep["per_op"] if o["op"] in triton_ops]
    assert phases
    for o in phases:
        assert o["torch_launches"] == [] and o["launches"] == 1, o
    masked = [r for r in rep["launches"] if r["kernel"] == "_cos_fwd_kernel" and "mask" in r["case"]]
    assert masked and all(r["device_asserts"] for r in masked), masked


def test_torch_launch_recorder_counts_kernels_not_views():
    import torch
    from torch_launches import TorchLaunches
    rec = TorchLaunches()
    x = torch.ones(4, 3)
    with rec.mode:
        x.view(12)
        x.t()
        torch.empty(5)
        x.sum()
        torch.zeros(2)
    assert [o["aten"] for o in rec.ops] == ["aten.sum.default", "aten.zeros.default"], rec.ops


@pytest.mark.parametrize("threads,regs,smem,blocks,limiter", [
    (128, 32, 0, 16, "threads"),           # 2048 threads / 128
    (256, 128, 0, 2, "regs"),              # 65536 / (128 * 256)
    (160, 93, 1152, 4, "regs"),            # 96 regs/thread after rounding: 65536 / 3072 per warp = 21 warps / 5
    (1024, 64, 0, 1, "regs"),
    (128, 32, 100 * 1024, 2, "smem"),      # 228 KB / (100 KB + 1 KB reserved)
    (32, 16, 0, 32, "blocks"),
])
def test_occupancy_rules(threads, regs, smem, blocks, limiter):
    assert sass.blocks_per_sm(threads, regs, smem) == (blocks, limiter)


def test_sass_reader_counts_widths_and_loads_in_flight():
    insns = [
        "LDC R1, c[0x0][0x28]",
        "@!P1 LDG.E.128 R4, desc[UR4][R2.64]",        # 16 B in flight
        "LDG.E.128 R8, desc[UR4][R2.64+0x800]",       # 32 B
        "LDG.E R12, desc[UR4][R6.64]",                # names R6 (the first load's vector): it retires; 20 B
        "FADD R13, R12, R12",                          # uses the third load: everything older retires
        "LDG.E.U16 R14, desc[UR4][R2.64]",
        "STG.E.128 desc[UR4][R2.64], R8",
        "STL [R1], R14",
        "EXIT",
    ]
    st = sass.sass_stats(insns)
    assert st.loads == {16: 2, 4: 1, 2: 1}
    assert st.stores == {16: 1}
    assert st.spill_insns == 1
    assert st.inflight_bytes_per_thread == 32     # the first two 16-byte loads, before anything used them


def test_littles_law_caps_at_copy_and_scales_with_bytes_in_flight():
    dm = sass.H200
    bdp_copy = dm["copy_bytes_per_s"] * dm["latency_s"] / dm["sms"]
    full = sass.littles_law(threads=256, grid_blocks=10_000, occ_blocks=8, inflight_per_thread=64)
    assert full["predicted_fraction_of_copy"] == 1.0
    half = sass.littles_law(threads=256, grid_blocks=10_000, occ_blocks=1, inflight_per_thread=int(bdp_copy / 512))
    assert 0.45 < half["predicted_fraction_of_copy"] < 0.55
    # a grid of a quarter wave keeps only a quarter of a block per SM on average
    small = sass.littles_law(threads=256, grid_blocks=33, occ_blocks=8, inflight_per_thread=64)
    assert small["resident_blocks_per_sm"] == pytest.approx(33 / 132)


def test_sass_reader_flags_a_barrier_inside_a_load_loop():
    loop = [(0x100, "LDG.E.128 R4, desc[UR4][R2.64]"), (0x110, "FADD R8, R4, R5"),
            (0x120, "BAR.SYNC.DEFER_BLOCKING 0x0"), (0x130, "@P0 BRA 0x100"), (0x140, "EXIT")]
    assert sass.sass_stats(loop).barrier_in_load_loop
    no_barrier = [x for x in loop if not x[1].startswith("BAR")]
    assert not sass.sass_stats(no_barrier).barrier_in_load_loop
    forward_only = loop[:3] + [(0x130, "@P0 BRA 0x140"), (0x140, "EXIT")]
    assert not sass.sass_stats(forward_only).barrier_in_load_loop
