"""Shared checks for the Triton kernel tests (tests/test_kernels_*.py).

The tolerance rule (DESIGN.md, "Testing"): measured against an fp64 oracle, the fused result's max
error must be at most 2x the max error of the same-dtype reference (rectok_fast.ops.reference run on
the same inputs) plus a small atol relative to the oracle's magnitude. For fp32 the fused result must
also be allclose to the reference directly.
"""
from __future__ import annotations

import os

import pytest
import torch

from rectok_fast.kernels import _launch

ATOL_REL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-3, torch.float16: 2e-4}


def kernel_device(device: torch.device) -> torch.device:
    """The conftest ``device`` fixture, skipped where the kernels cannot run (CPU without the interpreter)."""
    if device.type == "cpu" and not _launch.interpreted():
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 exported before Python starts")
    return device


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a launcher allocates starts as NaN, so an unwritten element fails the comparison."""
    monkeypatch.setattr(_launch, "POISON", True)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check(name: str, fused, ref, oracle, dtype: torch.dtype, *, atol_rel: float | None = None):
    """Assert the tolerance rule for one output or gradient (None on all three sides is fine)."""
    if oracle is None:
        assert fused is None and ref is None, f"{name}: expected no gradient"
        return
    assert fused is not None, f"{name}: fused gave no result/gradient where the reference has one"
    assert fused.shape == ref.shape, f"{name}: shape {tuple(fused.shape)} != reference {tuple(ref.shape)}"
    assert fused.dtype == ref.dtype, f"{name}: dtype {fused.dtype} != reference {ref.dtype}"
    assert torch.isfinite(fused).all() == torch.isfinite(ref).all(), f"{name}: non-finite values (unwritten?)"
    scale = max(oracle.double().abs().max().item(), 1e-30) if oracle.numel() else 1.0
    atol = (atol_rel if atol_rel is not None else ATOL_REL[dtype]) * scale
    e_fused, e_ref = max_err(fused, oracle), max_err(ref, oracle)
    assert e_fused <= 2 * e_ref + atol, (f"{name}: fused error {e_fused:.3e} > 2 x reference error {e_ref:.3e} "
                                         f"+ atol {atol:.3e} (|oracle| max {scale:.3e}, dtype {dtype})")
    if dtype == torch.float32:
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def grads(outputs, inputs, seeds):
    """d(sum_i <outputs_i, seeds_i>) / d inputs, None for inputs that do not require grad."""
    want = [x for x in inputs if x.requires_grad]
    total = sum((o.double() * s.double()).sum() for o, s in zip(outputs, seeds) if s is not None)
    # an input that an output does not depend on counts as a zero gradient (fused ops return zeros)
    got = iter(torch.autograd.grad(total, want, allow_unused=True, materialize_grads=True))
    return [next(got) if x.requires_grad else None for x in inputs]


def leaf(x: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return x.detach().clone().requires_grad_(requires_grad)


def as64(xs):
    """fp64 copies of the (exactly representable) inputs, keeping requires_grad."""
    return [x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x for x in xs]


def compile_backend(device: torch.device) -> str:
    """inductor on GPU; on CPU 'aot_eager' unless RECTOK_TEST_INDUCTOR=1 (see test docstrings)."""
    if device.type == "cuda" or os.environ.get("RECTOK_TEST_INDUCTOR", "0") not in ("", "0"):
        return "inductor"
    return "aot_eager"


def via_custom_op(via: str, monkeypatch) -> str:
    """'customop' runs the torch.library custom-op path (what torch.compile traces) in eager mode."""
    if via == "customop":
        monkeypatch.setattr(_launch, "FORCE_CUSTOM_OP", True)
        return "direct"
    return via
