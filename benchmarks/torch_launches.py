"""Which aten ops a fused op runs besides its own kernels: on a GPU each is a kernel launch of its own.

Used by benchmarks/static_report.py, which runs every Triton op's launchers on CPU tensors under
:class:`TorchLaunches` and adds a launch cost for each op recorded (e.g. a ``.sum()`` of per-program
partials, a zero-filled gradient autograd materializes, a device-side input check).
"""
from __future__ import annotations

import torch

# aten ops that launch no GPU kernel of their own: allocations and metadata (views are found from the schema)
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "set_"}


class TorchLaunches:
    """Records the aten ops a fused op runs besides its Triton kernels (e.g. a ``.sum()`` of per-program
    partials): on a GPU each is a kernel launch of its own, with its own launch cost. Views and
    allocations are not launches; a read of a value on the host (``.item()``) would be a device sync and
    is recorded as such. The capture runs on CPU tensors; input checks take their CUDA branch
    (registry.HOST_CHECKED_DEVICES is emptied meanwhile)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        rec = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                rec.record(func, args, kwargs or {}, out)
                return out
        self.mode = _Mode()
        self.context: dict = {}
        self.ops: list[dict] = []

    def record(self, func, args, kwargs, out):
        from torch.utils._pytree import tree_leaves
        name = func.overloadpacket.__name__
        if name in _NO_LAUNCH or any(r.alias_info is not None and not r.alias_info.is_write
                                     for r in func._schema.returns):
            return                                   # an allocation, or a view of an input
        tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        if not tensors or all(t.numel() == 0 for t in tensors.values()):
            return
        self.ops.append(dict(self.context, aten=str(func), bytes=sum(t.nbytes for t in tensors.values())))
