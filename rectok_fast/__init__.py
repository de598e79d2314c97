"""rectok_fast: a fast, drop-in training stack for RecTok (arXiv 2512.13421).

Entry points (imported lazily so ``import rectok_fast`` stays cheap):

* :func:`build_model` -- any registered variant by name (:mod:`rectok_fast.models.registry`)
* :func:`build_tokenizer` -- the RecTok tokenizer (``rectok_BB`` and friends)
* :func:`build_dit` -- the DiT^DH generator (``ditdh_s`` ... ``ditdh_xl``, ``ditdh_tiny``)
* :func:`build_from_checkpoint` -- the model a checkpoint holds, rebuilt from the file
* :func:`load_official_checkpoint` / :func:`export_official_checkpoint` -- the official .pth layout
* :mod:`rectok_fast.ops` -- the fused ops and the backend switch
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "build_model": "rectok_fast.models.registry",
    "build_from_checkpoint": "rectok_fast.checkpoint",
    "build_tokenizer": "rectok_fast.models.tokenizer",
    "build_dit": "rectok_fast.models.dit",
    "load_official_checkpoint": "rectok_fast.checkpoint",
    "export_official_checkpoint": "rectok_fast.checkpoint",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rectok_fast' has no attribute {name!r}")
