"""Triton flow_interpolate (kernels/flow_interpolate.py) against the reference and an fp64 oracle.

CPU: kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py);
RECTOK_TEST_DEVICE=cuda runs the same tests on the GPU. Every launcher output starts as NaN
(poison_outputs), so an element the kernel does not write fails.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _kernel_checks import via_custom_op, as64, check, compile_backend, grads, kernel_device, leaf, poison_outputs  # noqa: F401
import rectok_fast.kernels.cosine_distill  # noqa: F401  (registers rectok_fast::cosine_distill_*)
import rectok_fast.kernels.posterior_flow  # noqa: F401  (registers rectok_fast::posterior_flow_*)
from rectok_fast import ops
from rectok_fast.kernels.flow_interpolate import flow_interpolate as fused_flow
from rectok_fast.ops import reference

DTYPES = [torch.float32, torch.bfloat16]


def _oracle(x, noise, t, return_velocity):
    tt = t.detach().double().reshape(x.shape[0], *([1] * (x.dim() - 1)))
    out = (1 - tt) * x + tt * noise
    return (out, noise - x) if return_velocity else (out,)


def _call(fn, x, noise, t, v):
    r = fn(x, noise, t, return_velocity=v)
    return tuple(r) if v else (r,)


def _fused_via(via):
    if via == "direct":
        return fused_flow

    def through_ops(*a, **k):
        with ops.use_backend("fused"):
            return ops.flow_interpolate(*a, **k)
    return through_ops


def _run_case(x, noise, t, velocity, via, seed_mask=(True, True)):
    dtype = x.dtype
    fused = _call(_fused_via(via), x, noise, t, velocity)
    ref = _call(reference.flow_interpolate, x, noise, t, velocity)
    x64, n64 = as64([x, noise])
    ora = _oracle(x64, n64, t, velocity)
    names = ("out", "velocity")
    for i in range(len(ora)):
        assert fused[i].dtype == x.dtype
        check(names[i], fused[i], ref[i], ora[i], dtype)
    # distinct per-sample t must give distinct per-sample mixing
    if x.shape[0] >= 2:
        assert not torch.equal(fused[0][0], fused[0][1])
    seeds = [torch.randn(o.shape, device=o.device).to(o.dtype) if keep else None
             for o, keep in zip(ref, seed_mask)]
    if not any(s is not None for s in seeds):
        return
    inputs = [x, noise]
    if not any(i.requires_grad for i in inputs):
        return
    gf, gr, go = grads(fused, inputs, seeds), grads(ref, inputs, seeds), grads(ora, [x64, n64], seeds)
    for name, a, b, c, inp in zip(("grad_x", "grad_noise"), gf, gr, go, inputs):
        if a is not None:
            assert a.dtype == inp.dtype
        check(name, a, b, c, inp.dtype if inp.requires_grad else dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 7, 9), (4, 3, 1500)])
@pytest.mark.parametrize("velocity", [False, True])
@pytest.mark.parametrize("via", ["direct", "ops", "customop"])
def test_forward_and_grads(device, dtype, shape, velocity, via, monkeypatch):
    via = via_custom_op(via, monkeypatch)
    dev = kernel_device(device)
    x = leaf(torch.randn(shape, device=dev).to(dtype))
    noise = leaf(torch.randn(shape, device=dev).to(dtype))
    t = torch.tensor([0.1, 0.93, 0.37, 0.61][: shape[0]], device=dev)
    _run_case(x, noise, t, velocity, via)


@pytest.mark.parametrize("seed_mask", [(True, False), (False, True)])
@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_partial_grads_and_seeds(device, seed_mask, need):
    """Only one output used / only one input requiring grad: each kernel branch on its own."""
    dev = kernel_device(device)
    x = leaf(torch.randn(3, 4, 11, device=dev), need[0])
    noise = leaf(torch.randn(3, 4, 11, device=dev), need[1])
    t = torch.rand(3, device=dev)
    _run_case(x, noise, t, True, "direct", seed_mask)


def test_mixed_dtypes_and_t_layouts(device):
    """bf16 x with fp32 noise (grads keep each input's dtype); t as (B, 1, 1) fp64 with requires_grad."""
    dev = kernel_device(device)
    x = leaf(torch.randn(2, 9, 13, device=dev).bfloat16())
    noise = leaf(torch.randn(2, 9, 13, device=dev))
    t = torch.tensor([0.25, 0.8], device=dev, dtype=torch.float64).reshape(2, 1, 1).requires_grad_(True)
    _run_case(x, noise, t, True, "direct")
    out = fused_flow(x, noise, t)
    out.float().sum().backward()
    assert t.grad is None, "t is data: no gradient may flow to it"
    assert x.grad.dtype == torch.bfloat16 and noise.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype):
    dev = kernel_device(device)
    base = torch.randn(3, 11, 6, device=dev).to(dtype)
    x = leaf(base).transpose(1, 2)                       # (3, 6, 11), strided
    nbase = leaf(torch.randn(3, 6, 23, device=dev).to(dtype))
    noise = nbase[:, :, ::2]                              # (3, 6, 12) -> slice to 11 below
    noise = noise[..., :11]
    t = torch.rand(3, 2, device=dev)[:, 1]               # strided t
    assert not x.is_contiguous() and not noise.is_contiguous() and not t.is_contiguous()
    _run_case(x, noise, t, True, "direct")


def test_input_errors(device):
    dev = kernel_device(device)
    x = torch.randn(2, 5, device=dev)
    with pytest.raises(ValueError, match="differ in shape"):
        fused_flow(x, torch.randn(2, 6, device=dev), torch.rand(2, device=dev))
    with pytest.raises(ValueError, match="one value per sample"):
        fused_flow(x, x, torch.rand(3, device=dev))
    with pytest.raises(TypeError, match="dtype"):
        fused_flow(x.long(), x.long(), torch.rand(2, device=dev))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        fused_flow(x, x, 0.5)


def test_torch_compile_matches_eager(device):
    """The custom ops trace under torch.compile (fullgraph). On CPU the backend is aot_eager: it runs
    the whole fake-tensor/AOT-autograd tracing (what the ops registration must support) in ~2 s,
    while inductor on CPU works too but costs ~25 s of compile on this machine (RECTOK_TEST_INDUCTOR=1
    selects it); on CUDA it is inductor."""
    dev = kernel_device(device)
    torch._dynamo.reset()
    lin = torch.nn.Linear(6, 10).to(dev)

    def model(xin, e1, e2, tau, tgt, ids, t2, n2):
        m = lin(xin)
        z, zt, kl = ops.posterior_flow_noise(m, e1, e2, tau, 0.9)
        h, v = ops.flow_interpolate(zt, n2, t2, return_velocity=True)
        picked = torch.gather(h + 0.1 * v, 1, ids[..., None].expand(-1, -1, h.shape[-1]))
        return ops.cosine_distill_loss(picked, tgt, ids) + kl.mean() * 1e-3 + z.square().mean()

    B, L = 2, 7
    args = (torch.randn(B, L, 6, device=dev), torch.randn(B, L, 5, device=dev), torch.randn(B, L, 5, device=dev),
            torch.rand(B, device=dev), torch.randn(B, L, 5, device=dev), torch.randperm(L, device=dev)[:3].repeat(B, 1),
            torch.rand(B, device=dev), torch.randn(B, L, 5, device=dev))
    with ops.use_backend("fused"):
        compiled = torch.compile(model, backend=compile_backend(dev), fullgraph=True)
        loss_c = compiled(*args)
        g_c = torch.autograd.grad(loss_c, list(lin.parameters()))
        loss_e = model(*args)
        g_e = torch.autograd.grad(loss_e, list(lin.parameters()))
    with ops.use_backend("reference"):
        loss_r = model(*args)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_e, loss_r, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_eager_and_custom_op_paths(device, monkeypatch):
    """Eager calls use the autograd.Function twins; FORCE_CUSTOM_OP (and torch.compile) the custom ops."""
    from rectok_fast.kernels import _launch
    dev = kernel_device(device)
    x = torch.randn(2, 3, 4, device=dev, requires_grad=True)
    t = torch.rand(2, device=dev)

    def names():
        return [type(o.grad_fn).__name__ for o in (
            fused_flow(x, x, t),
            rectok_fast.kernels.posterior_flow.posterior_flow_noise(torch.cat([x, x], -1), x, x, t)[0],
            rectok_fast.kernels.cosine_distill.cosine_distill_loss(x, x))]
    assert names() == ["_FlowInterpolateBackward", "_PosteriorFlowBackward", "_CosineDistillBackward"]
    monkeypatch.setattr(_launch, "FORCE_CUSTOM_OP", True)
    assert all("rectok_fast" in n for n in names()), names()


def test_fused_backend_without_interpreter_raises():
    """backend 'fused' on CPU tensors without TRITON_INTERPRET must raise the clear error, for every op."""
    code = textwrap.dedent("""
        import torch
        from rectok_fast import ops
        ops.set_backend("fused")
        x = torch.randn(2, 3, 4)
        calls = {
            "flow_interpolate": lambda: ops.flow_interpolate(x, x, torch.rand(2)),
            "posterior_flow_noise": lambda: ops.posterior_flow_noise(torch.randn(2, 3, 8), x, x, torch.rand(2)),
            "cosine_distill_loss": lambda: ops.cosine_distill_loss(x, x),
        }
        for name, call in calls.items():
            try:
                call()
            except ops.BackendUnavailable as e:
                assert "TRITON_INTERPRET" in str(e) and name in str(e), str(e)
                print("raised", name)
            else:
                raise SystemExit(f"{name}: no error")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RECTOK_FAST_IMPL")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("raised") == 3, r.stdout


_SM90_SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from rectok_fast.kernels import cosine_distill as CD, flow_interpolate as FI, posterior_flow as PF

    ALIGNED = {"S", "D", "C", "L", "N", "R", "M", "s_pb", "s_pm", "s_fb", "s_fn"}
    n = 0
    opt_in = [dict(cfg, constexprs=dict(cfg["constexprs"], PHILOX=True)) for cfg in PF.production_configs()]
    for cfgs in [FI.production_configs(), PF.production_configs(), CD.production_configs(), opt_in]:
        for cfg in cfgs:
            fn, sig, consts = cfg["fn"], cfg["signature"], cfg["constexprs"]
            attrs = {(i,): [["tt.divisibility", 16]] for i, (k, t) in enumerate(sig.items())
                     if t != "constexpr" and (t.startswith("*") or k in ALIGNED)}
            src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                 options={"num_warps": cfg["num_warps"]}).asm["ptx"]
            assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx or cfg in opt_in, \
                f"{fn.__name__}: loads are not vectorized"
            n += 1
            print("ok", fn.__name__, cfg["shape"])
    print("compiled", n)
''')


def test_kernels_compile_for_sm90(device):
    """The interpreter does not compile kernels; on a machine without a GPU, build every kernel for
    sm_90 (H100/H200) with Triton's own ptxas to catch GPU-only compile errors, and check that the
    loads along D are 128-bit vectorized. (On CUDA the other tests run the compiled kernels.)"""
    if device.type == "cuda":
        pytest.skip("the GPU run compiles and runs every kernel for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("Triton's ptxas is not available here")
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert "compiled 16" in r.stdout, r.stdout
