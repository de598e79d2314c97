"""The AdaLN ops as C++ dispatcher operators: registration, opcheck, torch.compile without graph
breaks, the backward contract (per-token dshift is grad_out itself, no double backward).

CPU path by default (``RECTOK_TEST_DEVICE=cuda`` runs it on the GPU kernels).
``RECTOK_REQUIRE_EXT=1`` turns "extension not built" from a skip into a failure.
"""
from __future__ import annotations

import pytest
import torch

from conftest import adaln_extension_device
from rectok_fast.ops import adaln_ext, reference

DEVICE = adaln_extension_device()

OPS = ("adaln_modulate_fwd", "adaln_modulate_bwd", "gated_residual_fwd", "gated_residual_bwd")


def _mods(B, N, D, dtype, per_token, requires_grad=False):
    """shift, scale, gate as non-contiguous chunk views of one adaLN output (as the DiT makes them)."""
    g = torch.Generator().manual_seed(B * 100 + N + D + int(per_token))
    base = 0.5 * torch.randn((B, N, 6 * D) if per_token else (B, 6 * D), generator=g)
    base = base.to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
    return base, base.chunk(6, dim=-1)[:3]


def _x(B, N, D, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def test_ops_are_registered_in_cpp():
    """Every dispatch key of every op is a C++ registration from csrc/adaln.cpp (no Python custom op)."""
    for name in OPS:
        qual = f"rectok_fast::{name}"
        for key in ("CPU", "CUDA", "Meta", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, key), f"{qual}: no {key} kernel"
        dump = torch._C._dispatch_dump(qual)
        registrations = [line for line in dump.splitlines() if "registered at" in line]
        assert registrations and all("adaln.cpp" in line for line in registrations), dump
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.rectok_fast, name).default.tags
    # the public callables go straight to the dispatcher
    assert isinstance(adaln_ext.adaln_modulate_fwd, torch._ops.OpOverload)
    assert isinstance(adaln_ext.gated_residual_fwd, torch._ops.OpOverload)
    assert isinstance(adaln_ext.HAS_CUDA, bool) and adaln_ext.LOAD_ERROR is None


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(per_token, dtype):
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch with dynamic
    shapes) for the forward and backward ops."""
    B, N, D = 2, 5, 24
    x = _x(B, N, D, dtype, requires_grad=True)
    y = _x(B, N, D, dtype, seed=1, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D)).to(DEVICE).requires_grad_(True)
    _, (shift, scale, gate) = _mods(B, N, D, dtype, per_token)
    shift, scale, gate = (t.detach().requires_grad_(True) for t in (shift, scale, gate))
    ops = torch.ops.rectok_fast
    torch.library.opcheck(ops.adaln_modulate_fwd.default, (x, w, shift, scale, 1e-6))
    torch.library.opcheck(ops.gated_residual_fwd.default, (x, gate, y))
    out, rstd = ops.adaln_modulate_fwd(x.detach(), w.detach(), shift.detach(), scale.detach(), 1e-6)
    dy = torch.randn_like(out)
    torch.library.opcheck(ops.adaln_modulate_bwd.default,
                          (dy, x.detach(), w.detach(), shift.detach(), scale.detach(), rstd))
    torch.library.opcheck(ops.gated_residual_bwd.default, (dy, gate.detach(), y.detach()))


def test_meta_kernels_give_shapes_and_check_inputs():
    B, N, D = 3, 4, 16
    x = torch.empty(B, N, D, device="meta", dtype=torch.bfloat16)
    w = torch.empty(D, device="meta")
    m = torch.empty(B, N, 6 * D, device="meta")
    out, rstd = torch.ops.rectok_fast.adaln_modulate_fwd(x, w, m[..., :D], m[:, 0, D:2 * D], 1e-6)
    assert (out.shape, out.dtype, rstd.shape, rstd.dtype) == (x.shape, x.dtype, (B, N), torch.float32)
    dx, dw, dsh, dsc = torch.ops.rectok_fast.adaln_modulate_bwd(out, x, w, m[..., :D], m[:, 0, D:2 * D], rstd)
    assert dx.shape == x.shape and dw.shape == w.shape and dsh.shape == (0,) and dsc.shape == (B, D)
    with pytest.raises(ValueError, match=r"scale must be \(B, D\), \(B, 1, D\) or \(B, N, D\)"):
        torch.ops.rectok_fast.adaln_modulate_fwd(x, w, m[..., :D], m[:, :2, :D], 1e-6)


class _Block(torch.nn.Module):
    """The DiT block's AdaLN structure: adaLN linear -> chunk(6) -> modulate / gated residual."""

    def __init__(self, d: int):
        super().__init__()
        self.ada = torch.nn.Linear(d, 6 * d)
        self.norm1 = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.norm2 = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.mlp = torch.nn.Linear(d, d)

    def forward(self, x, c, fused: bool = True):
        modulate = adaln_ext.adaln_modulate if fused else reference.adaln_modulate
        gated = adaln_ext.gated_residual if fused else reference.gated_residual
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(torch.nn.functional.silu(c)).chunk(6, dim=-1)
        x = gated(x, g1, self.mlp(modulate(x, self.norm1, sh1, sc1)))
        return gated(x, g2, self.mlp(modulate(x, self.norm2, sh2, sc2)))


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_compile_fullgraph_without_graph_breaks(per_token):
    """torch.compile traces the ops in one graph (graph_break_count == 0), forward and backward
    compile with fullgraph=True, and match eager and the reference."""
    torch.manual_seed(0)
    B, N, D = 2, 6, 32
    block = _Block(D).to(DEVICE)
    x = torch.randn(B, N, D, device=DEVICE)
    c = torch.randn(B, N, D, device=DEVICE) if per_token else torch.randn(B, D, device=DEVICE)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, c)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    def run(fn, fused=True):
        block.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = fn(xx, c, fused)
        out.square().mean().backward()
        return [out.detach(), xx.grad] + [p.grad.clone() for p in block.parameters()]

    ref = run(block, fused=False)
    eager = run(block)
    torch._dynamo.reset()
    compiled = run(torch.compile(block, fullgraph=True, backend="aot_eager"))
    for r, e, k in zip(ref, eager, compiled):
        torch.testing.assert_close(e, r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(k, e, rtol=0, atol=0)  # the same kernels run: bitwise equal


def test_per_token_dshift_is_grad_out_itself():
    """The per-token shift gradient is the incoming gradient, returned without a copy."""
    B, N, D = 2, 5, 16
    x = _x(B, N, D, torch.float32, requires_grad=True)
    w = torch.ones(D, device=DEVICE, requires_grad=True)
    shift = torch.randn(B, N, D, device=DEVICE, requires_grad=True)
    scale = torch.randn(B, D, device=DEVICE, requires_grad=True)
    out = adaln_ext.adaln_modulate(x, w, shift, scale)
    dy = torch.randn_like(out)
    (dshift,) = torch.autograd.grad(out, (shift,), dy)
    assert dshift.data_ptr() == dy.data_ptr() and torch.equal(dshift, dy)
    # the gated residual's dx is grad_out itself too
    gate = torch.randn(B, D, device=DEVICE, requires_grad=True)
    out = adaln_ext.gated_residual(x, gate, x.detach())
    (dx,) = torch.autograd.grad(out, (x,), dy)
    assert dx.data_ptr() == dy.data_ptr()


def test_double_backward_is_refused():
    B, N, D = 2, 3, 8
    x = _x(B, N, D, torch.float32, requires_grad=True)
    w = torch.ones(D, device=DEVICE, requires_grad=True)
    m = torch.randn(B, 2 * D, device=DEVICE, requires_grad=True)
    out = adaln_ext.adaln_modulate(x, w, m[:, :D], m[:, D:])
    (gx,) = torch.autograd.grad(out.sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="(?i)not implemented|derivative"):
        gx.sum().backward()


@pytest.mark.parametrize("kernel", sorted(adaln_ext.CUDA_KERNELS))
def test_cuda_launch_config_is_consistent(kernel):
    """The launch configuration (csrc/adaln_launch.h) covers every row element and respects the limits."""
    for dtype, D in [(torch.bfloat16, 1152), (torch.float32, 1152), (torch.bfloat16, 37), (torch.bfloat16, 2048)]:
        cfg = adaln_ext.cuda_launch_config(D, dtype, kernel, B=64, N=256)
        assert cfg["threads_per_row"] % 32 == 0 and cfg["threads_per_block"] <= 512
        assert cfg["threads_per_row"] * cfg["chunks_per_thread"] * cfg["elems_per_chunk"] >= D
        assert cfg["elems_per_chunk"] * (2 if dtype == torch.bfloat16 else 4) == cfg["vector_bytes"] == 16
        assert D <= cfg["max_dim"]
        gx, gy = cfg["grid"]
        if "bwd" in kernel and kernel != "gated_bwd_token":
            assert gy == 64 and gx * cfg["rows_per_block"] >= 256 and cfg["partial_rows"] == 64 * gx
            assert cfg["rows_per_group"] * cfg["row_groups_per_block"] >= cfg["rows_per_block"]
        else:
            assert gy == 1 and gx * cfg["row_groups_per_block"] >= 64 * 256
    with pytest.raises(ValueError, match="is larger than the CUDA kernels support"):
        adaln_ext.cuda_launch_config(10 ** 6, torch.float32, "adaln_bwd")


def test_eager_fast_path_defers_what_it_does_not_take():
    """rectok_fast.ops calls the extension's C entries (adaln_ext.*_eager) directly in eager mode; they take
    plain tensors only and return None otherwise, so subclasses, TorchFunctionModes and unsupported dtypes
    still go through torch.ops (and the backend's fallback / errors)."""
    from torch.overrides import TorchFunctionMode

    from rectok_fast import ops

    B, N, D = 2, 3, 8
    x, y = _x(B, N, D, torch.float32), _x(B, N, D, torch.float32, seed=1)
    _, (shift, scale, gate) = _mods(B, N, D, torch.float32, per_token=False)
    w = torch.ones(D, device=DEVICE)
    out = adaln_ext.gated_residual_eager(x, gate, y)
    torch.testing.assert_close(out, reference.gated_residual(x, gate, y))
    torch.testing.assert_close(adaln_ext.adaln_modulate_eager(x, w, shift, scale, 1e-6),
                               reference.adaln_modulate(x, w, shift, scale, 1e-6), rtol=1e-5, atol=1e-5)
    assert adaln_ext.gated_residual_eager(x.double(), gate.double(), y.double()) is None

    class Sub(torch.Tensor):
        pass
    assert adaln_ext.gated_residual_eager(x.as_subclass(Sub), gate, y) is None

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    with ops.use_backend("fused"):
        ops.gated_residual(x, gate, y)            # installs the fast path
        with Record() as rec:
            assert adaln_ext.gated_residual_eager(x, gate, y) is None
            ops.gated_residual(x, gate, y)
            ops.adaln_modulate(x, w, shift, scale)
        names = {str(f) for f in rec.seen}
        assert "rectok_fast.gated_residual_fwd.default" in names and "rectok_fast.adaln_modulate_fwd.default" in names
    # the cached fast path follows the backend switch
    xg = x.detach().requires_grad_(True)
    with ops.use_backend("fused"):
        ops.gated_residual(xg, gate, y)
        assert ops.gated_residual(xg, gate, y).grad_fn.name() == "GatedResidualBackward"
        with ops.use_backend("reference"):
            assert ops.gated_residual(xg, gate, y).grad_fn.name() != "GatedResidualBackward"
        assert ops.gated_residual(xg, gate, y).grad_fn.name() == "GatedResidualBackward"
