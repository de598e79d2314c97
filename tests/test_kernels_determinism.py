"""Fused ops give bit-identical outputs and gradients with 1 and with 2 CPU threads.

Each thread count runs in its own process (torch's intra-op pool is sized once per process) under
backend 'fused' with the Triton interpreter; every op of the registry whose family can run here is
covered (the AdaLN ops when the C++ extension is built: its CPU path is OpenMP-parallel).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _kernel_checks import kernel_device

_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    from rectok_fast import ops
    from rectok_fast.ops import backend
    ops.set_backend("fused")
    g = torch.Generator().manual_seed(0)

    made = []      # every leaf that requires grad, in creation order

    def rnd(*s, grad=True):
        t = torch.randn(*s, generator=g).requires_grad_(grad)
        if grad:
            made.append(t)
        return t

    B, N, D = 3, 37, 96
    x, noise = rnd(B, N, D), rnd(B, N, D)
    cases = {
        "flow_interpolate": lambda: ops.flow_interpolate(x, noise, torch.rand(B, generator=g), return_velocity=True),
        "posterior_flow_noise": lambda: ops.posterior_flow_noise(rnd(B, N, 2 * D), rnd(B, N, D), rnd(B, N, D),
                                                                 torch.rand(B, generator=g), 0.8),
        "cosine_distill_loss": lambda: ops.cosine_distill_loss(
            rnd(B, 11, D), rnd(B, N, D, grad=False), torch.randint(0, N, (B, 11), generator=g)),
        "adaln_modulate": lambda: ops.adaln_modulate(x, rnd(D), rnd(B, D), rnd(B, N, D)),
        "gated_residual": lambda: ops.gated_residual(x, rnd(B, 1, D), rnd(B, N, D)),
    }
    out = {}
    for spec in ops.registry.OPS:
        if backend.why_cannot_run(spec.family, "cpu", torch.float32, backend.capabilities()) is not None:
            continue
        for t in made:
            t.grad = None
        first = len(made)
        res = cases[spec.name]()
        res = res if isinstance(res, tuple) else (res,)
        seeds = [torch.randn(r.shape, generator=g) for r in res]
        total = sum((r.double() * s.double()).sum() for r, s in zip(res, seeds))
        total.backward()
        used = [x, noise] + made[first:]
        out[spec.name] = [r.detach() for r in res] + [t.grad for t in used if t.grad is not None]
    torch.save(out, sys.argv[2])
    print("ops", sorted(out))
''')


def test_bit_identical_across_thread_counts(device, tmp_path):
    dev = kernel_device(device)
    if dev.type != "cpu":
        pytest.skip("CPU thread counts")
    results = []
    for n in (1, 2):
        path = str(tmp_path / f"t{n}.pt")
        env = dict(os.environ, TRITON_INTERPRET="1", RECTOK_FAST_QUIET="1")
        r = subprocess.run([sys.executable, "-c", _SCRIPT, str(n), path], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr[-4000:]
        results.append(torch.load(path, weights_only=True))
    one, two = results
    assert set(one) == set(two) and {"flow_interpolate", "posterior_flow_noise", "cosine_distill_loss"} <= set(one)
    for name in one:
        for a, b in zip(one[name], two[name]):
            assert a is not None and b is not None and torch.equal(a, b), f"{name}: 1 vs 2 threads differ"
