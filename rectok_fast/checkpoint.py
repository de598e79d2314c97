"""Official-format checkpoint import/export and safe file I/O, for any nn.Module.

Official .pth files are dicts {'model', 'model_ema', 'optimizer', 'loss_scaler', 'epoch', ...}
(spec section 8). 'model_ema' holds parameters only (no buffers). Everything is read with
``torch.load(weights_only=True)``: a file that needs arbitrary code to unpickle is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "safe_torch_load", "atomic_torch_save", "load_official_checkpoint",
           "export_official_checkpoint", "select_state_dict", "match_state_dict"]

SUBDICT_NAMES = ("model", "model_ema")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as asked (wrong layout, keys, shapes, or unsafe pickle)."""


def safe_torch_load(path, map_location="cpu"):
    """``torch.load(weights_only=True)``, turning an unsafe or corrupt file into a clear error.

    Files on disk are memory-mapped: an official DiT^DH-XL checkpoint with optimizer state is
    several GB, and only the picked sub-dict is ever touched."""
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=isinstance(path, (str, os.PathLike)))
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) files cannot be mapped: read them whole
                raise
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load. The file needs arbitrary Python objects to unpickle, which "
            f"weights_only=True does not allow (it could run code). Re-save it as plain tensors/dicts. "
            f"Details: {exc}") from exc
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc


def atomic_torch_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash never
    leaves a half-written checkpoint under ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def select_state_dict(ckpt: Mapping, which: str = "model_ema") -> dict:
    """Pick ``ckpt[which]``; a bare state dict (tensor values) is accepted as-is."""
    if which not in SUBDICT_NAMES:
        raise ValueError(f"which must be one of {SUBDICT_NAMES}, got {which!r}")
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint must be a dict, got {type(ckpt).__name__}")
    if which in ckpt and isinstance(ckpt[which], Mapping):
        return dict(ckpt[which])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise CheckpointError(f"checkpoint has no {which!r} entry (top-level keys: {sorted(map(str, ckpt))[:20]})")


def _persistent_buffer_names(model: nn.Module, own: Mapping) -> set[str]:
    """Buffers that ``own`` (the model's state dict) carries, i.e. the persistent ones."""
    return {name for name, _ in model.named_buffers() if name in own}


def match_state_dict(model: nn.Module, state: Mapping, which: str = "model",
                     ignore_prefixes: tuple[str, ...] = (), own: Mapping | None = None
                     ) -> tuple[dict, list, list, list]:
    """Compare ``state`` with ``model.state_dict()`` (pass it as ``own`` if you have it); returns
    (filtered state, missing, unexpected, shape mismatches). EMA dicts have no buffers, so for
    which='model_ema' missing persistent buffers are not reported (they keep the model's values)."""
    if own is None:
        own = model.state_dict()
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    missing = [k for k in own if k not in state]
    if which == "model_ema":
        buffers = _persistent_buffer_names(model, own)
        missing = [k for k in missing if k not in buffers]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in state
              if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    return state, missing, unexpected, shapes


def _format_problems(missing, unexpected, shapes, limit: int = 40) -> str:
    def block(title, items):
        if not items:
            return ""
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(map(str, items[:limit])) + more
    return (block("missing keys", missing) + block("unexpected keys", unexpected)
            + block("shape mismatches (key, checkpoint, model)", [f"{k}: {a} vs {b}" for k, a, b in shapes]))


def load_official_checkpoint(path_or_dict, model: nn.Module, which: str = "model_ema", strict: bool = True,
                             ignore_prefixes: tuple[str, ...] | None = None) -> dict:
    """Load ``ckpt[which]`` into ``model``. Returns the whole checkpoint dict (epoch etc.).

    strict: every key must match by name and shape, else a :class:`CheckpointError` lists the missing,
    unexpected and mis-shaped keys. Shape mismatches are always an error. ``ignore_prefixes``
    defaults to ``model.official_ignored_prefixes`` (the tokenizer drops the frozen teacher that
    official stage-1 checkpoints carry).
    """
    ckpt = path_or_dict if isinstance(path_or_dict, Mapping) else safe_torch_load(path_or_dict)
    source = "<dict>" if isinstance(path_or_dict, Mapping) else os.fspath(path_or_dict)
    state = select_state_dict(ckpt, which)
    if ignore_prefixes is None:
        ignore_prefixes = tuple(getattr(model, "official_ignored_prefixes", ()))
    own = model.state_dict()
    state, missing, unexpected, shapes = match_state_dict(model, state, which, ignore_prefixes, own)
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointError(f"{source}[{which!r}] does not match {type(model).__name__}:"
                              + _format_problems(missing, unexpected, shapes))
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v.to(dtype=own[k].dtype))
    return ckpt if isinstance(ckpt, dict) else dict(ckpt)


def _cpu_copy(items) -> dict:
    """Own CPU copies: no shared/flattened storages end up in the file, and a large model's copy
    never doubles its GPU memory."""
    return {k: v.detach().to("cpu", copy=True) for k, v in items}


def _ema_state(ema_model) -> dict:
    """Official 'model_ema' = {name: tensor} over named_parameters only."""
    if isinstance(ema_model, nn.Module):
        return _cpu_copy(ema_model.named_parameters())
    return _cpu_copy(dict(ema_model).items())


def export_official_checkpoint(model: nn.Module, path, ema_model=None, **extra) -> None:
    """Write {'model': state_dict, 'model_ema': parameters (of ``ema_model``, default the model),
    **extra} atomically, in the official layout (so official code and our loader read it)."""
    ckpt = {"model": _cpu_copy(model.state_dict().items()),
            "model_ema": _ema_state(ema_model if ema_model is not None else model)}
    for k in extra:
        if k in ckpt:
            raise ValueError(f"extra entry {k!r} would overwrite the weights")
    ckpt.update(extra)
    atomic_torch_save(ckpt, path)
