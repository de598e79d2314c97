"""The fused AdaLN extension (rectok_fast._C) against the reference ops.

Runs the C++ CPU path by default; ``RECTOK_TEST_DEVICE=cuda`` runs the same tests on the GPU kernels.
Every fused call runs with the extension's poison hook on (all outputs and scratch buffers start as
NaN), so an element a kernel fails to write is caught. Tolerance (fp32 and bf16): the fused error
against an fp64 reference is at most 2x the error of the same-dtype reference, plus a small atol.
``RECTOK_REQUIRE_EXT=1`` turns "extension not built" from a skip into a failure.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rectok_fast import ops
from conftest import adaln_extension_device
from rectok_fast.ops import adaln_ext, reference

DEVICE = adaln_extension_device()

SHAPES = [(2, 7, 37), (3, 70, 1152), (2, 600, 256)]  # odd D / N; (2, 600, 256): several rows per CUDA row group (prefetch ring)
KINDS = ["chunk2d", "chunk3d", "token", "expand_token", "contig", "batch_bcast", "inner_strided", "misaligned",
         "shift_sample_scale_token", "shift_token_scale_sample"]


def _mod_views(kind: str, base: torch.Tensor, B: int, N: int, D: int):
    """shift, scale, gate as the views a DiT produces (or odd layouts), derived from one leaf ``base``."""
    if kind in ("chunk2d", "chunk3d", "token", "batch_bcast"):
        src = base.expand(B, 6 * D) if kind == "batch_bcast" else base
        return src.chunk(6, dim=-1)[:3]                          # non-contiguous (B, D) / (B, 1, D) / (B, N, D)
    if kind == "expand_token":
        return tuple(v.unsqueeze(1).expand(B, N, D) for v in base.chunk(6, dim=-1)[:3])  # token stride 0
    if kind == "contig":
        return base[0], base[1], base[2]
    if kind == "inner_strided":
        return base.t().chunk(6, dim=-1)[:3]                     # inner stride B
    if kind == "misaligned":
        return base[:, 1:].chunk(6, dim=-1)[:3]                  # rows start one element off 16-byte alignment
    if kind == "shift_sample_scale_token":                       # (B, D) shift with (B, N, D) scale and gate
        return base[:, 0, :D], base[..., D:2 * D], base[..., 2 * D:3 * D]
    if kind == "shift_token_scale_sample":                       # (B, N, D) shift with (B, 1, D) scale and gate
        return base[..., :D], base[:, :1, D:2 * D], base[:, 0, 2 * D:3 * D]
    raise ValueError(kind)


def _mod_base(kind: str, B: int, N: int, D: int, dtype, gen) -> torch.Tensor:
    shape = {"chunk2d": (B, 6 * D), "chunk3d": (B, 1, 6 * D), "token": (B, N, 6 * D),
             "expand_token": (B, 6 * D), "contig": (3, B, D), "batch_bcast": (1, 6 * D),
             "inner_strided": (6 * D, B), "misaligned": (B, 6 * D + 1), "shift_sample_scale_token": (B, N, 6 * D),
             "shift_token_scale_sample": (B, N, 6 * D)}[kind]
    t = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float32)
    return t.to(dtype).to(DEVICE)


def _inputs(B, N, D, dtype, kind, mod_dtype=None, w_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, N, D, generator=gen) * 2.0 + 0.3).to(dtype).to(DEVICE)
    y = torch.randn(B, N, D, generator=gen).to(dtype).to(DEVICE)
    w = (1.0 + 0.3 * torch.randn(D, generator=gen)).to(w_dtype).to(DEVICE)
    base = _mod_base(kind, B, N, D, mod_dtype or dtype, gen)
    dy = torch.randn(B, N, D, generator=gen).to(dtype).to(DEVICE)
    return x, y, w, base, dy


def _leaves(*ts, dtype=None):
    return [t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def _run_adaln(impl, x, w, base, dy, kind, dtype=None):
    x, w, base = _leaves(x, w, base, dtype=dtype)
    B, N, D = x.shape
    shift, scale, _ = _mod_views(kind, base, B, N, D)
    out = impl(x, w, shift, scale, 1e-6)
    grads = torch.autograd.grad(out, (x, w, base), dy.to(out.dtype))
    return (out, *grads)


def _run_gated(impl, x, y, base, dy, kind, dtype=None):
    x, y, base = _leaves(x, y, base, dtype=dtype)
    B, N, D = x.shape
    _, _, gate = _mod_views(kind, base, B, N, D)
    out = impl(x, gate, y)
    grads = torch.autograd.grad(out, (x, y, base), dy.to(out.dtype))
    return (out, *grads)


def _adaln64(x, w, shift, scale, eps):
    """The fp64 oracle: the same formula as reference.adaln_modulate, every step in x's (fp64) dtype."""
    b, n, d = x.shape
    shift, scale = (m.unsqueeze(1) if m.dim() == 2 else m for m in (shift, scale))
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * w * (1 + scale) + shift


def _gated64(x, gate, y):
    return x + (gate.unsqueeze(1) if gate.dim() == 2 else gate) * y


def _fused_adaln(*args):
    with adaln_ext.poison_outputs():
        return adaln_ext.adaln_modulate(*args)


def _fused_gated(*args):
    with adaln_ext.poison_outputs():
        return adaln_ext.gated_residual(*args)


def _check(name, fused, ref_same, ref64):
    """fused error vs fp64 <= 2 x (same-dtype reference error vs fp64) + atol; dtype and shape must match."""
    assert fused.dtype == ref_same.dtype, f"{name}: dtype {fused.dtype} != reference {ref_same.dtype}"
    assert fused.shape == ref_same.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref_same.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values (an output element was never written?)"
    r64 = ref64.double().cpu()
    err_f = (fused.double().cpu() - r64).abs().max().item()
    err_r = (ref_same.double().cpu() - r64).abs().max().item()
    scale = r64.abs().max().item()
    atol = (1e-3 if fused.dtype == torch.bfloat16 else 1e-6) * max(scale, 1e-3)
    assert err_f <= 2 * err_r + atol, (f"{name}: fused error {err_f:.3e} > 2 x reference error {err_r:.3e} "
                                       f"+ atol {atol:.1e} (max |ref| {scale:.3e})")


ADALN_NAMES = ("out", "dx", "dweight", "dmod")
GATED_NAMES = ("out", "dx", "dy", "dgate")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adaln_modulate_matches_reference(shape, kind, dtype):
    B, N, D = shape
    x, _, w, base, dy = _inputs(B, N, D, dtype, kind)
    fused = _run_adaln(_fused_adaln, x, w, base, dy, kind)
    ref = _run_adaln(reference.adaln_modulate, x, w, base, dy, kind)
    ref64 = _run_adaln(_adaln64, x, w, base, dy, kind, dtype=torch.float64)
    for name, f, r, r64 in zip(ADALN_NAMES, fused, ref, ref64):
        _check(f"adaln[{kind}] {name}", f, r, r64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_residual_matches_reference(shape, kind, dtype):
    B, N, D = shape
    x, y, _, base, dy = _inputs(B, N, D, dtype, kind, seed=1)
    fused = _run_gated(_fused_gated, x, y, base, dy, kind)
    ref = _run_gated(reference.gated_residual, x, y, base, dy, kind)
    ref64 = _run_gated(_gated64, x, y, base, dy, kind, dtype=torch.float64)
    for name, f, r, r64 in zip(GATED_NAMES, fused, ref, ref64):
        _check(f"gated[{kind}] {name}", f, r, r64)


@pytest.mark.parametrize("kind", ["token", "chunk2d", "misaligned", "expand_token"])
def test_gated_residual_large_fp32_streaming_path(kind):
    """fp32 outputs of at least 4 MiB take the CPU path's streaming-store loops (csrc/adaln_cpu.cpp,
    kStreamBytes; per-token gates prefetched a row ahead). Odd D: rows start off 16-byte alignment, so the
    alignment peel and the tail run too."""
    B, N, D = 2, 520, 1031
    assert B * N * D * 4 >= 4 << 20
    x, y, _, base, dy = _inputs(B, N, D, torch.float32, kind, seed=5)
    fused = _run_gated(_fused_gated, x, y, base, dy, kind)
    ref = _run_gated(reference.gated_residual, x, y, base, dy, kind)
    ref64 = _run_gated(_gated64, x, y, base, dy, kind, dtype=torch.float64)
    for name, f, r, r64 in zip(GATED_NAMES, fused, ref, ref64):
        _check(f"large gated[{kind}] {name}", f, r, r64)


def test_per_sample_rows_are_distinct():
    """Guard of the tests themselves: batch rows differ, so a wrong batch index cannot pass."""
    x, _, w, base, _ = _inputs(3, 7, 37, torch.float32, "chunk2d")
    shift, scale, _ = _mod_views("chunk2d", base, 3, 7, 37)
    assert not torch.equal(shift[0], shift[1]) and not torch.equal(scale[1], scale[2])
    out = adaln_ext.adaln_modulate(x, w, shift, scale)
    # the same x row under two samples' modulation must differ
    x2 = x[:1].expand(3, -1, -1).contiguous()
    out2 = adaln_ext.adaln_modulate(x2, w, shift, scale)
    assert not torch.allclose(out2[0], out2[1]) and out.shape == x.shape


@pytest.mark.parametrize("mods_per_token", [False, True])
def test_fp32_modulation_not_rounded_to_bf16(mods_per_token):
    """Modulation values that bf16 cannot represent: any silent downcast shows up at fp32 tolerance,
    and with bf16 activations the fp32 modulation gradients stay fp32."""
    B, N, D = 2, 9, 64
    kind = "token" if mods_per_token else "chunk2d"
    x, y, w, base, dy = _inputs(B, N, D, torch.float32, kind, seed=3)
    base = (base + 2.0 ** -12).contiguous()   # off the bf16 grid
    assert (base.to(torch.bfloat16).float() != base).float().mean() > 0.99
    fused = _run_adaln(_fused_adaln, x, w, base, dy, kind)
    ref = _run_adaln(reference.adaln_modulate, x, w, base, dy, kind)
    for name, f, r in zip(ADALN_NAMES, fused, ref):
        torch.testing.assert_close(f, r, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")
    # mixed: bf16 activations, fp32 modulation and weight (as under autocast with an fp32 adaLN linear)
    xb, yb, dyb = x.bfloat16(), y.bfloat16(), dy.bfloat16()
    fused = _run_adaln(_fused_adaln, xb, w, base, dyb, kind)
    ref = _run_adaln(reference.adaln_modulate, xb, w, base, dyb, kind)
    ref64 = _run_adaln(_adaln64, xb, w, base, dyb, kind, dtype=torch.float64)
    assert [t.dtype for t in fused] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for name, f, r, r64 in zip(ADALN_NAMES, fused, ref, ref64):
        _check(f"mixed adaln {name}", f, r, r64)
    fused = _run_gated(_fused_gated, xb, yb, base, dyb, kind)
    ref = _run_gated(reference.gated_residual, xb, yb, base, dyb, kind)
    ref64 = _run_gated(_gated64, xb, yb, base, dyb, kind, dtype=torch.float64)
    for name, f, r, r64 in zip(GATED_NAMES, fused, ref, ref64):
        _check(f"mixed gated {name}", f, r, r64)


@pytest.mark.parametrize("combo", ["x32_y16_g16", "x16_y32_g32", "x32_mod16_w16"])
def test_mixed_dtypes(combo):
    """Residual stream fp32 with a bf16 branch and gate (autocast DiT), and the other mixes."""
    B, N, D = 2, 5, 40
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(B, N, D, generator=gen).to(DEVICE)
    y = torch.randn(B, N, D, generator=gen).to(DEVICE)
    base = torch.randn(B, 6 * D, generator=gen).to(DEVICE)
    dy = torch.randn(B, N, D, generator=gen).to(DEVICE)
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(DEVICE)
    if combo == "x32_y16_g16":
        args = dict(x=x, y=y.bfloat16(), base=base.bfloat16())
    elif combo == "x16_y32_g32":
        args = dict(x=x.bfloat16(), y=y, base=base)
    else:
        args = dict(x=x, y=y, base=base.bfloat16())
        w = w.bfloat16()
    if combo != "x32_mod16_w16":
        fused = _run_gated(_fused_gated, args["x"], args["y"], args["base"], dy, "chunk2d")
        ref = _run_gated(reference.gated_residual, args["x"], args["y"], args["base"], dy, "chunk2d")
        ref64 = _run_gated(_gated64, args["x"], args["y"], args["base"], dy, "chunk2d", dtype=torch.float64)
        for name, f, r, r64 in zip(GATED_NAMES, fused, ref, ref64):
            _check(f"gated {combo} {name}", f, r, r64)
    fused = _run_adaln(_fused_adaln, args["x"], w, args["base"], dy, "chunk2d")
    ref = _run_adaln(reference.adaln_modulate, args["x"], w, args["base"], dy, "chunk2d")
    ref64 = _run_adaln(_adaln64, args["x"], w, args["base"], dy, "chunk2d", dtype=torch.float64)
    for name, f, r, r64 in zip(ADALN_NAMES, fused, ref, ref64):
        _check(f"adaln {combo} {name}", f, r, r64)


def test_backward_op_returns_input_shapes_and_dtypes():
    """The raw backward ops (before autograd's own shape/dtype fix-ups) return each gradient in the
    shape and dtype of its input view -- except a per-token dshift, which is grad_out itself: the op
    returns an empty tensor for it and the autograd formula passes grad_out through."""
    B, N, D = 2, 6, 24
    x = torch.randn(B, N, D, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(D, device=DEVICE)
    ada = torch.randn(B, N, 6 * D, device=DEVICE)
    for shift, scale in [(ada[:, 0, :D], ada[:, :1, D:2 * D]), (ada[..., :D], ada[:, 0, D:2 * D]),
                         (ada[:, 0, :D].unsqueeze(1).expand(B, N, D), ada[..., D:2 * D])]:
        out, rstd = torch.ops.rectok_fast.adaln_modulate_fwd(x, w, shift, scale, 1e-6)
        assert rstd.shape == (B, N) and rstd.dtype == torch.float32
        dx, dw, dsh, dsc = torch.ops.rectok_fast.adaln_modulate_bwd(torch.randn_like(out), x, w, shift, scale, rstd)
        assert (dx.shape, dx.dtype) == (x.shape, x.dtype)
        assert (dw.shape, dw.dtype) == (w.shape, w.dtype)
        if shift.shape == x.shape:
            assert (dsh.shape, dsh.dtype) == ((0,), shift.dtype)
        else:
            assert (dsh.shape, dsh.dtype) == (shift.shape, shift.dtype)
        assert (dsc.shape, dsc.dtype) == (scale.shape, scale.dtype)
    gate = ada[:, 0, 2 * D:3 * D].bfloat16()
    dgate, dyy = torch.ops.rectok_fast.gated_residual_bwd(torch.randn_like(x), gate, x)
    assert (dgate.shape, dgate.dtype) == (gate.shape, gate.dtype) and dyy.shape == x.shape


@pytest.mark.parametrize("kind", ["chunk2d", "token"])
def test_backward_is_deterministic(kind):
    """Two-pass reductions in a shape-determined order: bitwise equal across runs and thread counts
    (1 vs 3 threads; the shape spans several row blocks per sample so the work really splits)."""
    x, y, w, base, dy = _inputs(3, 70, 96, torch.float32, kind, seed=5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3, 3):
            torch.set_num_threads(n)
            results.append(_run_adaln(_fused_adaln, x, w, base, dy, kind) +
                           _run_gated(_fused_gated, x, y, base, dy, kind))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for t, u in zip(results[0], other):
            assert torch.equal(t, u)


def test_poison_hook():
    ext = adaln_ext.extension()
    assert not ext.poison_outputs()
    with adaln_ext.poison_outputs():
        assert ext.poison_outputs()
        # empty inputs: outputs of zero size, parameter gradients are zeros (not poison)
        x = torch.randn(2, 0, 8, device=DEVICE, requires_grad=True)
        w = torch.randn(8, device=DEVICE, requires_grad=True)
        ada = torch.randn(2, 16, device=DEVICE, requires_grad=True)
        out = adaln_ext.adaln_modulate(x, w, ada[:, :8], ada[:, 8:])
        gx, gw, ga = torch.autograd.grad(out, (x, w, ada), torch.randn_like(out))
        assert out.shape == (2, 0, 8) and torch.equal(gw, torch.zeros_like(gw)) and torch.equal(ga, torch.zeros_like(ga))
    assert not ext.poison_outputs()


def test_errors_are_clear():
    x = torch.randn(2, 3, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    m = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must be \(B, N, D\)"):
        adaln_ext.adaln_modulate(x[0], w, m, m)
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        adaln_ext.adaln_modulate(x, torch.ones(7, device=DEVICE), m, m)
    with pytest.raises(ValueError, match=r"shift must be \(B, D\), \(B, 1, D\) or \(B, N, D\)"):
        adaln_ext.adaln_modulate(x, w, torch.randn(2, 4, 8, device=DEVICE), m)
    with pytest.raises(ValueError, match=r"gate must be"):
        adaln_ext.gated_residual(x, torch.randn(3, 8, device=DEVICE), x)
    with pytest.raises(ValueError, match=r"x .* and y .* must both be"):
        adaln_ext.gated_residual(x, m, x[:, :2])
    with pytest.raises(TypeError, match="float32 or bfloat16, got torch.float16"):
        adaln_ext.adaln_modulate(x.half(), w, m, m)
    with pytest.raises(TypeError, match="scale must be float32 or bfloat16, got torch.float64"):
        adaln_ext.adaln_modulate(x, w, m, m.double())
    with pytest.raises(ValueError, match="weight is on meta but x is on"):
        adaln_ext.adaln_modulate(x, torch.ones(8, device="meta"), m, m)
    with pytest.raises(ValueError, match="eps must be"):
        adaln_ext.adaln_modulate(x, w, m, m, eps=float("nan"))
    # the ops themselves (every check is in C++, so direct torch.ops calls get the same errors)
    ops = torch.ops.rectok_fast
    with pytest.raises(ValueError, match=r"shift must be \(B, D\), \(B, 1, D\) or \(B, N, D\)"):
        ops.adaln_modulate_fwd(x, w, torch.randn(3, 8, device=DEVICE), m, 1e-6)
    with pytest.raises(TypeError, match="must be float32 or bfloat16"):
        ops.gated_residual_fwd(x.half(), m, x.half())
    with pytest.raises(ValueError, match="the feature dimension D must be at least 1"):
        ops.adaln_modulate_fwd(torch.randn(2, 3, 0), torch.ones(0), torch.randn(2, 0), torch.randn(2, 0), 1e-6)
    out, rstd = ops.adaln_modulate_fwd(x, w, m, m, 1e-6)
    with pytest.raises(TypeError, match="the output gradient must have x's dtype"):
        ops.adaln_modulate_bwd(out.double(), x, w, m, m, rstd)
    with pytest.raises(ValueError, match=r"rstd must be float32 \(B, N\)"):
        ops.adaln_modulate_bwd(out, x, w, m, m, rstd[:1])


def test_cuda_width_limit_is_reported():
    """A row group of at most 512 threads holds a row: D above the limit is refused with a clear
    message (host-side check, testable without a GPU)."""
    cfg = adaln_ext.cuda_launch_config(1152, torch.bfloat16, "adaln_bwd")
    max_d = cfg["max_dim"]
    assert cfg["threads_per_row"] * cfg["chunks_per_thread"] * cfg["elems_per_chunk"] >= 1152 and max_d >= 4096
    assert adaln_ext.cuda_launch_config(2048, torch.float32)["threads_per_block"] <= 512
    with pytest.raises(ValueError, match=rf"D = {max_d + 1} is larger than the CUDA kernels support"):
        adaln_ext.cuda_launch_config(max_d + 1, torch.bfloat16, "adaln_bwd")
    if DEVICE.type == "cuda":
        x = torch.randn(1, 2, max_d + 8, device=DEVICE)
        m = torch.randn(1, max_d + 8, device=DEVICE)
        with pytest.raises(ValueError, match="is larger than the CUDA kernels support"):
            adaln_ext.adaln_modulate(x, torch.ones(max_d + 8, device=DEVICE), m, m)


@pytest.mark.skipif(DEVICE.type == "cuda" or not torch.cuda.is_available() or adaln_ext.has_cuda(),
                    reason="needs a GPU and an extension built without CUDA")
def test_cuda_tensors_without_cuda_build():  # pragma: no cover - only on such machines
    x = torch.randn(1, 2, 8, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        torch.ops.rectok_fast.gated_residual_fwd(x, x[:, 0], x)


def test_backend_dispatch_uses_extension():
    with ops.use_backend("fused"):
        assert ops.implementation_for("adaln_modulate", DEVICE) == "cuda-ext"
        assert ops.implementation_for("gated_residual", DEVICE) == "cuda-ext"


class _TinyDiTBlock(nn.Module):
    """The DiT block's AdaLN structure: adaLN linear -> chunk(6) -> modulate / gated residual."""

    def __init__(self, d: int):
        super().__init__()
        self.ada = nn.Linear(d, 6 * d)
        self.norm1 = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.norm2 = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = ops.gated_residual(x, g1, self.attn(ops.adaln_modulate(x, self.norm1, sh1, sc1)))
        return ops.gated_residual(x, g2, self.mlp(ops.adaln_modulate(x, self.norm2, sh2, sc2)))


def test_torch_compile_dit_block():
    """torch.compile(fullgraph=True) traces the C++ ops (Meta kernels + C++ autograd) and matches
    eager, and both match the reference backend."""
    torch.manual_seed(0)
    block = _TinyDiTBlock(48).to(DEVICE)
    x = torch.randn(3, 10, 48, device=DEVICE)
    c = torch.randn(3, 48, device=DEVICE)

    def run(fn):
        block.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = fn(xx, c)
        out.square().mean().backward()
        return [out.detach(), xx.grad] + [p.grad.clone() for p in block.parameters()]

    with ops.use_backend("reference"):
        ref = run(block)
    with ops.use_backend("fused"):
        eager = run(block)
        torch._dynamo.reset()
        compiled = run(torch.compile(block, fullgraph=True))
    for r, e, k in zip(ref, eager, compiled):
        torch.testing.assert_close(e, r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(k, e, rtol=1e-4, atol=1e-5)
