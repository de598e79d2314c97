"""The one backend switch: names, environment variable, explicit-request errors, auto choices."""
import os
import subprocess
import sys

import pytest
import torch

from rectok_fast import ops
from rectok_fast.ops import backend


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto.*reference.*fused"):
        ops.set_backend("fast-please")


def test_use_backend_restores_previous():
    ops.set_backend("reference")
    with ops.use_backend("fused"):
        assert ops.get_backend() == "fused"
    assert ops.get_backend() == "reference"


def test_reference_backend_never_picks_a_fast_path():
    with ops.use_backend("reference"):
        for op in ops.registry.NAMES:
            assert ops.implementation_for(op, "cpu") == "reference"


def test_auto_uses_reference_for_triton_ops_on_cpu():
    with ops.use_backend("auto"):
        assert ops.implementation_for("flow_interpolate", "cpu") == "reference"
        assert ops.implementation_for("cosine_distill_loss", "cpu") == "reference"


def test_auto_announces_its_choice_once(capsys, monkeypatch):
    monkeypatch.setenv("RECTOK_FAST_QUIET", "0")
    with ops.use_backend("auto"):
        x = torch.randn(2, 3, 4)
        ops.flow_interpolate(x, torch.randn_like(x), torch.rand(2))
        ops.flow_interpolate(x, torch.randn_like(x), torch.rand(2))
    err = capsys.readouterr().err
    assert err.count("flow_interpolate: using the reference implementation") == 1


def test_env_var_selects_backend_and_rejects_garbage():
    code = "from rectok_fast import ops; print(ops.get_backend())"
    env = dict(os.environ, RECTOK_FAST_IMPL="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["RECTOK_FAST_IMPL"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown rectok_fast backend 'bogus'" in bad.stderr


def test_fused_triton_on_cpu_without_interpreter_is_a_clear_error():
    with ops.use_backend("fused"), backend.use_capabilities(triton_interpreter=False):
        with pytest.raises(backend.BackendUnavailable, match="TRITON_INTERPRET=1"):
            ops.implementation_for("cosine_distill_loss", "cpu")


def test_fused_extension_missing_is_a_clear_error():
    with backend.use_capabilities(ext_error="rectok_fast._C is not built (test)"):
        with ops.use_backend("fused"):
            with pytest.raises(backend.BackendUnavailable, match="not built"):
                ops.implementation_for("adaln_modulate", "cpu")
        with ops.use_backend("auto"):
            assert ops.implementation_for("adaln_modulate", "cpu") == "reference"


# (triton importable, interpreter, ext error, ext has CUDA) -> expected choice per family on each device
_CUDA_CASES = [
    (dict(triton_error=None, ext_error=None, ext_has_cuda=True), "cuda", {"triton": "triton", "cuda-ext": "cuda-ext"}),
    (dict(triton_error=None, ext_error=None, ext_has_cuda=False), "cuda", {"triton": "triton", "cuda-ext": "reference"}),
    (dict(triton_error="no triton (test)", ext_error="not built (test)", ext_has_cuda=False), "cuda",
     {"triton": "reference", "cuda-ext": "reference"}),
    (dict(triton_error=None, triton_interpreter=True, ext_error=None, ext_has_cuda=False), "cpu",
     {"triton": "reference", "cuda-ext": "cuda-ext"}),
]


@pytest.mark.parametrize("caps,dev,want", _CUDA_CASES)
@pytest.mark.parametrize("spec", ops.registry.OPS, ids=lambda s: s.name)
def test_auto_decisions_follow_the_capabilities(caps, dev, want, spec):
    """The CUDA-path decisions, checked on any machine by injecting the capabilities."""
    with ops.use_backend("auto"), backend.use_capabilities(**caps):
        assert ops.implementation_for(spec.name, dev, torch.bfloat16) == want[spec.family]
        assert ops.implementation_for(spec.name, dev, torch.float64) == "reference"
    with ops.use_backend("fused"), backend.use_capabilities(**caps):
        if want[spec.family] == "reference" and not (dev == "cpu" and spec.family == "triton"):
            with pytest.raises(backend.BackendUnavailable, match=spec.name):
                ops.implementation_for(spec.name, dev, torch.bfloat16)
        else:
            assert ops.implementation_for(spec.name, dev, torch.bfloat16) == spec.family


def test_capabilities_are_detected_once_as_plain_values():
    caps = backend.capabilities()
    assert backend.capabilities() is caps
    for field in ("triton_error", "ext_error"):
        assert getattr(caps, field) is None or isinstance(getattr(caps, field), str)
    assert isinstance(caps.triton_interpreter, bool) and isinstance(caps.ext_has_cuda, bool)


def test_auto_falls_back_for_float64_and_fused_refuses_it():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    mod = torch.randn(2, 8, dtype=torch.float64)
    with ops.use_backend("auto"):
        out = ops.adaln_modulate(x, w, mod, mod)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ops.reference.adaln_modulate(x, w, mod, mod))
    with ops.use_backend("fused"):
        with pytest.raises(backend.BackendUnavailable, match="float32 or bfloat16"):
            ops.adaln_modulate(x, w, mod, mod)
