"""Test-wide settings. The Triton interpreter and offline hub must be on before triton/timm import;
the README's test command exports them, and these defaults cover a bare `pytest` call."""
import os

if os.environ.get("RECTOK_TEST_DEVICE", "cpu") != "cuda":  # on the GPU the kernels must really compile
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RECTOK_FAST_QUIET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


# Tiny test tensors run far faster on one thread than two on a shared 2-core machine.
torch.set_num_threads(1)


def test_device() -> torch.device:
    """CPU by default; RECTOK_TEST_DEVICE=cuda (the GPU suite) runs the kernel tests on the GPU."""
    want = os.environ.get("RECTOK_TEST_DEVICE", "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        pytest.skip("RECTOK_TEST_DEVICE=cuda but no GPU is visible")
    return torch.device(want)


def adaln_extension_device() -> torch.device:
    """The AdaLN extension tests' device; at module level, skips them when the extension is not built,
    unless RECTOK_REQUIRE_EXT=1 makes that a failure."""
    from rectok_fast.ops import adaln_ext
    device = torch.device(os.environ.get("RECTOK_TEST_DEVICE", "cpu"))
    if adaln_ext.load_error() is not None:
        if os.environ.get("RECTOK_REQUIRE_EXT", "0") not in ("", "0"):
            raise RuntimeError(adaln_ext.load_error())
        pytest.skip(adaln_ext.load_error(), allow_module_level=True)
    if device.type == "cuda" and not (torch.cuda.is_available() and adaln_ext.has_cuda()):
        pytest.skip("RECTOK_TEST_DEVICE=cuda needs a GPU and an extension built with CUDA", allow_module_level=True)
    return device


@pytest.fixture
def device():
    return test_device()


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Fresh seed per test; every test starts (and ends) on the default backend."""
    from rectok_fast import ops
    torch.manual_seed(1234)
    previous = ops.get_backend()
    yield
    ops.set_backend(previous)
