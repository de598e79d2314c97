"""Whole graphs under the default backend: no graph breaks, and fullgraph compiles of forward + backward.

Each model runs in a fresh process (tests/_graph_cases.py) under backend ``auto`` without the Triton
interpreter, as a user's process would: on CPU ``auto`` picks the reference for the Triton ops and the
C++ extension for the AdaLN ops (when built). The CUDA decisions are checked in-process with injected
capabilities (:func:`rectok_fast.ops.backend.use_capabilities`), traced by dynamo like the real calls.
The compiled runs use the ``aot_eager`` backend (inductor's CPU codegen would dominate CI time); graph
capture, the fake kernels and the registered autograd are the same as under inductor.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rectok_fast import ops
from rectok_fast.ops import backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cases(which: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RECTOK_FAST_IMPL")}
    env["RECTOK_FAST_QUIET"] = "1"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "_graph_cases.py"), which, "both"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("which", ["dit", "tokenizer"])
def test_auto_backend_whole_graph(which):
    """DiT^DH forward / rectok tokenizer training forward: one graph, zero breaks (explain), and a
    fullgraph=True compile of forward + loss + backward that matches eager."""
    explained, compiled = _run_cases(which)
    assert explained["breaks"] == 0 and explained["graphs"] == 1, explained
    assert compiled["grads"] > 0
    assert compiled["max_diff"] <= 1e-5, compiled


def _cuda_like_dispatch(x):
    """What the public ops do, for CUDA tensors (the device is given, the capabilities injected)."""
    cuda = torch.device("cuda")
    out = x
    for op in ops.registry.NAMES:
        choice = backend.choose(op, cuda, x.dtype)
        out = out + (1.0 if choice != "reference" else -1.0)
    return out


@pytest.mark.parametrize("has_cuda_ext", [True, False])
def test_cuda_decisions_trace_without_breaks(has_cuda_ext, monkeypatch):
    """choose() for CUDA tensors reads only the cached capabilities: no graph break, no announcement
    while compiling, and the decision follows the capabilities (extension without CUDA -> reference)."""
    monkeypatch.setenv("RECTOK_FAST_QUIET", "0")
    x = torch.zeros(3)
    n_triton = sum(s.family == "triton" for s in ops.registry.OPS)
    n_ext = len(ops.registry.OPS) - n_triton
    want = n_triton - n_ext if not has_cuda_ext else len(ops.registry.OPS)
    with ops.use_backend("auto"), backend.use_capabilities(triton_error=None, ext_error=None,
                                                            ext_has_cuda=has_cuda_ext):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(_cuda_like_dispatch)(x)
        assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
        torch._dynamo.reset()
        got = torch.compile(_cuda_like_dispatch, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, torch.full((3,), float(want)))


def test_fused_backend_refusal_is_raised_not_hidden_under_compile():
    """An unavailable fused backend is an error in compiled code too, never a silent reference."""
    x = torch.zeros(3)
    with ops.use_backend("fused"), backend.use_capabilities(ext_error="rectok_fast._C is not built (test)"):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="not built"):
            torch.compile(lambda t: t + (backend.choose("adaln_modulate", t.device, t.dtype) == "cuda-ext"),
                          fullgraph=True, backend="eager")(x)


_TRITON_OP_SCRIPT = '''
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from rectok_fast.kernels import _launch, cosine_distill, flow_interpolate, posterior_flow
assert _launch.TRITON_OPS, "outside the interpreter the Triton ops must be triton_ops"
n = 0
for mod in (flow_interpolate, posterior_flow, cosine_distill):
    for name, args in mod.opcheck_samples("cpu"):
        ns, op = name.split("::")
        fn = getattr(torch.ops.rectok_fast, op).default
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        # the op's body (its fake kernel under triton_op), traced with fake tensors: allocations,
        # torch ops and wrap_triton kernel launches only (what inductor needs to see the kernels)
        impl = torch._library.custom_ops._maybe_get_opdef(name)._abstract_fn
        gm = make_fx(impl, tracing_mode="fake")(*plain)
        kernels = [nd for nd in gm.graph.nodes if "triton_kernel_wrapper" in str(nd.target)]
        assert kernels, f"{name}: no Triton kernel visible in the traced body:\\n{gm.code}"
        n += 1
print("traced", n)
'''


def test_triton_ops_expose_their_kernels_to_tracing():
    """Outside the interpreter the Triton ops are torch.library.triton_ops: tracing their body with
    fake tensors (what inductor does to see and fuse the kernels) yields the Triton kernel launches."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RECTOK_FAST_IMPL")}
    env["RECTOK_FAST_QUIET"] = "1"
    r = subprocess.run([sys.executable, "-c", _TRITON_OP_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
    assert "traced 12" in r.stdout, r.stdout
