"""Python side of the C++/CUDA AdaLN extension (csrc/). Placeholder until the extension lands."""
from __future__ import annotations


def load_error() -> str | None:
    return "the rectok_fast C++ extension (rectok_fast._C) is not built yet"


def has_cuda() -> bool:
    return False
