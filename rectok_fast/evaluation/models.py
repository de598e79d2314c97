"""Building the evaluated models from checkpoint files (the one place evaluation touches checkpoints).

Our checkpoints describe themselves (variant + overrides, see
:func:`rectok_fast.checkpoint.build_from_checkpoint`); official ones have no description and are
built as the official variants unless ``--tokenizer_model`` / ``--dit_model`` / ``--guide_model``
says otherwise. A mismatch names the registered variants the file does fit.
"""
from __future__ import annotations

import os

from rectok_fast.evaluation.fidelity import EvalError

OFFICIAL_TOKENIZER = "rectok_BB_decft"   # loads official stage-1 and decoder-fine-tuned files alike
OFFICIAL_DIT = "ditdh_xl"
OFFICIAL_GUIDE = "ditdh_s"


def _read(path, what) -> dict:
    from rectok_fast.checkpoint import CheckpointError, safe_torch_load
    if not path or not os.path.isfile(path):
        raise EvalError(f"{what} checkpoint {path!r} does not exist")
    try:
        ckpt = safe_torch_load(path)
    except CheckpointError as exc:
        raise EvalError(str(exc)) from exc
    if not isinstance(ckpt, dict):
        raise EvalError(f"{what} checkpoint {path} is not a dict")
    return ckpt


def _variant(ckpt: dict, given: str | None, official: str) -> str:
    """The user's variant, else the file's own description, else the official one."""
    from rectok_fast.checkpoint import checkpoint_config
    return given or (checkpoint_config(ckpt) or {}).get("variant") or official


def load_tokenizer(path, variant: str | None = None, weights: str = "auto", device="cpu"):
    """The decode-only twin of the checkpoint's tokenizer (no teacher / semantic decoders: encoding and
    decoding do not need them), eval mode."""
    from rectok_fast.checkpoint import CheckpointError, build_from_checkpoint
    from rectok_fast.models import registry
    ckpt = _read(path, "tokenizer")
    which = weights if weights != "auto" else ("model_ema" if "model_ema" in ckpt else "model")
    try:
        name = registry.decode_only_name(_variant(ckpt, variant, OFFICIAL_TOKENIZER))
        tok, _ = build_from_checkpoint(ckpt, name, which=which, device=device, flag="--tokenizer_model")
    except (CheckpointError, ValueError, TypeError) as exc:
        raise EvalError(f"tokenizer checkpoint {path} does not fit the model: {exc}") from exc
    return tok.to(device).eval()


def load_dit(path, variant: str | None = None, device="cpu", what="DiT", official=OFFICIAL_DIT,
             flag="--dit_model"):
    """(DiT^DH in eval mode with its EMA weights, checkpoint dict)."""
    from rectok_fast.checkpoint import CheckpointError, build_from_checkpoint
    ckpt = _read(path, what)
    legacy = dict(ckpt.get("dit_config") or {})      # files written before checkpoints described themselves
    try:
        model, _ = build_from_checkpoint(ckpt, _variant(ckpt, variant, official), device=device, flag=flag, **legacy)
    except (CheckpointError, ValueError, TypeError) as exc:
        raise EvalError(f"{what} checkpoint {path} does not fit the model: {exc}") from exc
    return model.to(device).eval(), ckpt


def recorded_tokenizer(dit_ckpt: dict) -> str | None:
    """The tokenizer checkpoint a DiT checkpoint of ours names (None for official files / a missing file)."""
    from rectok_fast.checkpoint import checkpoint_config
    path = ((checkpoint_config(dit_ckpt) or {}).get("tokenizer") or {}).get("checkpoint")
    return path if path and os.path.isfile(path) else None


def install_dit_latent_stats(tok, stats_path, tokenizer_path, dit_ckpt) -> str:
    """Latent stats for decoding generated latents: --latent_stats, else the DiT checkpoint's (what it
    was trained with), else <tokenizer>.latent_stats.pt; returns where they came from."""
    from rectok_fast.checkpoint import checkpoint_config
    from rectok_fast.latent_stats import latent_stats_path, load_latent_stats
    if stats_path is not None:
        if not os.path.isfile(stats_path):
            raise EvalError(f"latent stats file {stats_path!r} does not exist")
        tok.set_latent_stats(*load_latent_stats(stats_path))
        return stats_path
    stats = (checkpoint_config(dit_ckpt) or {}).get("latent_stats") or dit_ckpt.get("latent_stats")
    if isinstance(stats, dict) and {"mean", "std"} <= set(stats):
        tok.set_latent_stats(stats["mean"], stats["std"])
        return "the DiT checkpoint"
    side = latent_stats_path(tokenizer_path)
    if os.path.isfile(side):
        tok.set_latent_stats(*load_latent_stats(side))
        return side
    raise EvalError("no latent statistics for the DiT: pass --latent_stats, use a DiT checkpoint that carries "
                    "them, or put <tokenizer>.latent_stats.pt beside the tokenizer")


def check_latent_match(tok, dit, guide=None) -> None:
    want = (tok.token_channels, tok.seq_h, tok.seq_w)
    for what, m in (("DiT", dit), ("AutoGuidance model", guide)):
        if m is not None and tuple(m.latent_shape) != want:
            raise EvalError(f"latent shape mismatch: the tokenizer makes latents {want} (C, h, w) but the "
                            f"{what} expects {tuple(m.latent_shape)}; check --dit_model/--guide_model and the files")


def load_generation_models(args, device):
    """(tokenizer, DiT, guide or None, where the latent stats came from); --tokenizer defaults to the
    tokenizer checkpoint the DiT file records."""
    dit, dit_ckpt = load_dit(args.dit, args.dit_model, device)
    if not args.tokenizer:
        args.tokenizer = recorded_tokenizer(dit_ckpt)
        if not args.tokenizer:
            raise EvalError("--tokenizer is required: the DiT checkpoint does not name an existing tokenizer file")
    tok = load_tokenizer(args.tokenizer, args.tokenizer_model, args.tokenizer_weights, device)
    guide = (load_dit(args.guide, args.guide_model, device, "AutoGuidance", OFFICIAL_GUIDE, "--guide_model")[0]
             if args.guide else None)
    check_latent_match(tok, dit, guide)
    source = install_dit_latent_stats(tok, args.latent_stats, args.tokenizer, dit_ckpt)
    return tok, dit, guide, source
