"""Official-format checkpoint import/export and safe file I/O, for any nn.Module.

Official .pth files are dicts {'model', 'model_ema', 'optimizer', 'loss_scaler', 'epoch', ...}
(spec section 8). 'model_ema' holds parameters only (no buffers). Everything is read with
``torch.load(weights_only=True)``: a file that needs arbitrary code to unpickle is refused.

Our files are self-describing: they carry ``CONFIG_KEY`` = ``{"kind", "variant", "overrides",
"img_size", ...}`` (a key official loaders never read), so :func:`build_from_checkpoint` rebuilds the
model from the file alone. Official files carry no description: they load by a registered variant
name, and a file that does not fit says which registered variants it does fit.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "safe_torch_load", "atomic_torch_save", "load_official_checkpoint",
           "export_official_checkpoint", "select_state_dict", "match_state_dict", "CONFIG_KEY",
           "checkpoint_config", "matching_variants", "load_variant_weights", "build_from_checkpoint"]

SUBDICT_NAMES = ("model", "model_ema")
#: where our checkpoints describe themselves (official loaders ignore unknown top-level keys)
CONFIG_KEY = "rectok_fast_config"


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


def atomic_write(path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file in the same folder, fsync, then os.replace: a crash
    never leaves a half-written file under ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def atomic_torch_save(obj, path) -> None:
    """torch.save, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


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
    **extra} atomically, in the official layout (so official code and our loader read it). A model
    built from a registered variant also gets its self-description (``CONFIG_KEY``) unless ``extra``
    brings one."""
    ckpt = {"model": _cpu_copy(model.state_dict().items()),
            "model_ema": _ema_state(ema_model if ema_model is not None else model)}
    spec = getattr(model, "variant_spec", None)
    if spec and CONFIG_KEY not in extra:
        extra[CONFIG_KEY] = {**spec, "img_size": getattr(model, "img_size", None)}
    for k in extra:
        if k in ckpt:
            raise ValueError(f"extra entry {k!r} would overwrite the weights")
    ckpt.update(extra)
    atomic_torch_save(ckpt, path)


# ---------------------------------------------------------------------------------------------------
# self-describing checkpoints


def checkpoint_config(ckpt: Mapping) -> dict | None:
    """The file's self-description (None for official files)."""
    cfg = ckpt.get(CONFIG_KEY) if isinstance(ckpt, Mapping) else None
    return dict(cfg) if isinstance(cfg, Mapping) else None


def _ignored_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Decode-only tokenizers skip a stage-1 file's teacher and semantic decoders; the others its teacher."""
    from rectok_fast.models.tokenizer import DECODE_ONLY_IGNORED_PREFIXES, RecTok
    if isinstance(model, RecTok) and not model.config.teachers:
        return DECODE_ONLY_IGNORED_PREFIXES
    return tuple(getattr(model, "official_ignored_prefixes", ()))


def _inferred_overrides(kind: str, state: Mapping) -> dict:
    """Sizes that official files fix per run rather than per variant, read off the weights."""
    import math
    out = {}
    if kind == "tokenizer":
        pe, pw = state.get("encoder.positional_embedding"), state.get("encoder.patch_embed.0.weight")
        patch = int(pw.shape[-1]) if pw is not None and pw.dim() == 4 else 16    # the patchify conv's kernel
        if pw is not None and pw.dim() == 4:
            out["patch_size"] = patch
        if pe is not None and pe.dim() == 3:
            out["img_size"] = int(round(math.sqrt(pe.shape[1]))) * patch
    else:
        pe, xw, yt = (state.get(k) for k in ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight"))
        if xw is not None and xw.dim() == 4:
            out["in_channels"], out["patch_size"] = int(xw.shape[1]), int(xw.shape[-1])
            if pe is not None and pe.dim() == 3:
                out["input_size"] = int(round(math.sqrt(pe.shape[1]))) * out["patch_size"]
        if yt is not None and yt.dim() == 2:
            out["num_classes"] = int(yt.shape[0]) - 1
    return out


def matching_variants(ckpt_or_state: Mapping, which: str = "model_ema", kind: str | None = None) -> list[str]:
    """Registered variants whose keys and shapes equal the file's ``which`` weights (sizes that vary per
    run, like the image size or the DiT's latent shape, are read off the weights)."""
    from rectok_fast.models import registry
    try:
        state = select_state_dict(ckpt_or_state, which)
    except CheckpointError:
        state = select_state_dict(ckpt_or_state, "model")
    found = []
    for name in registry.names(kind):
        k = registry.variant(name).kind
        try:
            with torch.device("meta"):
                model = registry.build_model(name, **_inferred_overrides(k, state))
        except (ValueError, TypeError):
            continue
        _, missing, unexpected, shapes = match_state_dict(model, state, which, _ignored_prefixes(model))
        if not (missing or unexpected or shapes):
            found.append(name)
    return found


def load_variant_weights(ckpt: Mapping, model: nn.Module, which: str = "model_ema", source: str = "<dict>",
                         flag: str = "the variant name") -> dict:
    """Strictly load ``ckpt[which]`` into ``model`` (a decode-only tokenizer skips the stage-1 extras).
    On a mismatch the error names the registered variants the file does fit, and ``flag`` to pass."""
    try:
        return load_official_checkpoint(ckpt, model, which=which, strict=True, ignore_prefixes=_ignored_prefixes(model))
    except CheckpointError as exc:
        spec = getattr(model, "variant_spec", None) or {}
        fits = matching_variants(ckpt, which, spec.get("kind"))
        described = checkpoint_config(ckpt)
        hint = (f" The file says it holds variant {described.get('variant')!r} with overrides "
                f"{described.get('overrides')}." if described else "")
        hint += (f" Its weights fit the registered variant(s) {', '.join(fits)}: pass {flag} {fits[0]}."
                 if fits else " No registered variant fits its weights.")
        raise CheckpointError(f"{source} does not fit variant {spec.get('variant', type(model).__name__)!r} "
                              f"(overrides {spec.get('overrides', {})}).{hint}\n{exc}") from None


def build_from_checkpoint(path_or_ckpt, variant: str | None = None, which: str = "auto", device=None,
                          flag: str = "the variant name", **overrides) -> tuple[nn.Module, dict]:
    """(model, checkpoint dict): rebuild the model a checkpoint holds and load its weights.

    Our files name their variant and overrides; official files need ``variant`` (a registered name).
    ``overrides`` change config fields on top (e.g. ``img_size``). ``which``: 'model_ema', 'model' or
    'auto' (the EMA weights when present). ``flag`` names the option that picks the variant, for errors."""
    from rectok_fast.models import registry
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, Mapping) else safe_torch_load(path_or_ckpt)
    source = "<dict>" if isinstance(path_or_ckpt, Mapping) else os.fspath(path_or_ckpt)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: a checkpoint must be a dict, got {type(ckpt).__name__}")
    described = checkpoint_config(ckpt) or {}
    over = dict(described.get("overrides") or {}) if variant is None or variant == described.get("variant") else {}
    name = variant or described.get("variant")
    if name is None:
        fits = matching_variants(ckpt, "model_ema" if "model_ema" in ckpt else "model")
        raise CheckpointError(f"{source} does not describe its model (an official file?): give its variant ({flag})"
                              + (f"; its weights fit {', '.join(fits)}" if fits else
                                 f"; registered variants: {', '.join(registry.names())}"))
    if not over:
        state = select_state_dict(ckpt, "model_ema" if "model_ema" in ckpt else "model")
        over = registry.changed_fields(name, _inferred_overrides(registry.variant(name).kind, state))
    over.update(overrides)
    with torch.device(device or "cpu"):
        model = registry.build_model(name, **over)
    if which == "auto":
        which = "model_ema" if "model_ema" in ckpt else "model"
    load_variant_weights(ckpt, model, which, source, flag)
    return model, dict(ckpt)
