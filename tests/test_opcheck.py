"""torch.library.opcheck on every custom op of every fused op in the registry, forward AND backward.

The parametrization comes from rectok_fast.ops.registry: each entry names its custom ops and a
``opcheck_samples(device)`` function in its fused module giving one sample call per op (triton ops:
kernels/*.py; AdaLN ops: rectok_fast/ops/adaln_ext.py). opcheck tests the schema, the fake (meta)
kernel against the real one, the autograd registration and AOT dispatch with dynamic shapes.
"""
from __future__ import annotations

import os

import pytest
import torch

from _kernel_checks import kernel_device, poison_outputs  # noqa: F401
from rectok_fast.ops import backend, registry


def _family_device(spec, device):
    if spec.family == "triton":
        return kernel_device(device)
    err = backend.capabilities().ext_error
    if err is not None:
        if os.environ.get("RECTOK_REQUIRE_EXT", "0") not in ("", "0"):
            pytest.fail(f"RECTOK_REQUIRE_EXT=1 but the extension did not load: {err}")
        pytest.skip(f"C++ extension not available: {err}")
    if device.type == "cuda" and not backend.capabilities().ext_has_cuda:
        pytest.fail("the extension was built without its CUDA kernels")
    return device


@pytest.mark.parametrize("spec", registry.OPS, ids=lambda s: s.name)
def test_opcheck_forward_and_backward(spec, device):
    dev = _family_device(spec, device)
    samples = [(name, args) for name, args in registry.resolve(spec.opcheck_samples)(dev)
               if name in spec.custom_ops]         # a module may serve several ops
    covered = {name for name, _ in samples}
    assert covered == set(spec.custom_ops), f"{spec.name}: samples cover {sorted(covered)}, registry lists " \
                                            f"{sorted(spec.custom_ops)}"
    for name, args in samples:
        ns, op = name.split("::")
        torch.library.opcheck(getattr(getattr(torch.ops, ns), op).default, args)


def test_every_registered_op_is_public_and_documented():
    from rectok_fast import ops
    for spec in registry.OPS:
        public = getattr(ops, spec.name)
        assert public.__doc__ and public.__doc__ == spec.reference_fn().__doc__
        assert spec.family in registry.FAMILIES
        assert registry.resolve(spec.fused).__name__ == spec.name


def test_readme_ops_table_matches_registry():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = registry.render_ops_table()
    assert table in readme, ("README's ops table is out of date; paste the output of\n  python -c \"from "
                             "rectok_fast.ops.registry import render_ops_table; print(render_ops_table())\"\n" + table)
