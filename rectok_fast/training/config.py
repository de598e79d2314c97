"""Command line of ``rectok_fast/train.py``: stages, official defaults, presets, validation.

Precedence: explicit flag > preset > stage default (official) > ds.json (micro batch only).
Every check runs before any model is built or data is read.
"""
from __future__ import annotations

import argparse
import os

STAGES = ("tokenizer", "decoder_ft", "dit")

# Official recipes (spec sections 3, 4, 5.6). lr for the tokenizer stages = blr * global_batch / 256.
STAGE_DEFAULTS = {
    "tokenizer": dict(model="rectok_BB", epochs=200, blr=1e-4, min_lr=0.0, warmup_rate=0.25, weight_decay=1e-4,
                      clip_grad=3.0, ema_decay=0.999, disc_start_epoch=100, batch_size=64, keep_every_epochs=100),
    "decoder_ft": dict(model="rectok_BB_decft", epochs=100, blr=5e-5, min_lr=0.0, warmup_rate=0.05,
                       weight_decay=1e-4, clip_grad=3.0, ema_decay=0.999, disc_start_epoch=0, batch_size=64,
                       keep_every_epochs=100),
    "dit": dict(model="ditdh_xl", tokenizer="rectok_BB_decft", epochs=800, lr=2e-4, end_lr=2e-5,
                decay_start_epoch=40, weight_decay=0.0, clip_grad=1.0, ema_decay=0.9995, batch_size=64,
                num_classes=1000, keep_every_epochs=100),
}

# Small models on the bundled photos; run anywhere in minutes. 'tiny' is the test size.
PRESETS = {
    "official": {},
    # ~2-3 minutes on 2 CPU cores; a faster EMA than the official 0.999 so its row moves within the run.
    "demo": dict(model_small=True, img_size=64, batch_size=8, epochs=16, lr=1e-3, warmup_epochs=1,
                 disc_start_epoch=10, ckpt_every=40, log_every=4, ema_decay=0.95, num_classes=10, decay_start_epoch=1,
                 end_lr=1e-4, num_workers=2, disc_ndf=16, convnext_size=32, sample_steps=10),
    "tiny": dict(model_small=True, img_size=32, batch_size=4, epochs=1, lr=1e-3, warmup_epochs=0.0,
                 disc_start_epoch=0, ckpt_every=0, log_every=1, num_classes=10, decay_start_epoch=0,
                 end_lr=1e-4, num_workers=0, disc_ndf=8, disc_layers=2, convnext=False, teacher_depth=1,
                 sample_steps=4),
    # the AutoGuidance guide model: DiT^DH-S, 30 epochs, same recipe otherwise
    "autoguide": dict(model="ditdh_s", epochs=30),
}


class ConfigError(ValueError):
    """A bad flag or flag combination, reported before any work starts."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rectok_fast/train.py",
        description="Train RecTok: tokenizer (stage 1), decoder_ft (stage 2), dit (DiT^DH generator / AutoGuidance model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    S = argparse.SUPPRESS
    g = p.add_argument_group("stage")
    g.add_argument("--stage", choices=STAGES, default="tokenizer")
    g.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="default: 'demo' when no --data_path/--file_list is given, else 'official'")
    g.add_argument("--model", default=S, help="tokenizer preset (rectok_BB, rectok_BB_decft, rectok_tiny) or DiT (ditdh_xl, ditdh_s ...)")
    g.add_argument("--tokenizer", default=S, help="dit stage: tokenizer preset that makes the latents")
    g.add_argument("--tokenizer_ckpt", default=None, help="dit stage: tokenizer weights (official RecTok_decft.pth; its model_ema is used)")
    g.add_argument("--load_from", default=None, help="initial weights (official .pth): decoder_ft loads stage-1 'model' + 'model_ema'")
    g.add_argument("--latent_stats", default=None, help="dit: latent mean/std file (default: <tokenizer_ckpt>.latent_stats.pt, else computed)")
    g.add_argument("--stats_images", type=int, default=S, help="dit: images used when latent stats are computed")
    g.add_argument("--num_classes", type=int, default=S)
    g = p.add_argument_group("pretrained nets (local files; random stand-ins, loudly, when absent)")
    g.add_argument("--teacher_weights", default=None)
    g.add_argument("--vgg_weights", default=None)
    g.add_argument("--lpips_weights", default=None)
    g.add_argument("--convnext_weights", default=None)
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="ImageFolder root (or the root that --file_list paths are relative to)")
    g.add_argument("--file_list", default=None, help="official train.txt: 'path label' lines")
    g.add_argument("--loader", choices=("torch", "dali"), default="torch")
    g.add_argument("--num_workers", type=int, default=S)
    g.add_argument("--img_size", type=int, default=S)
    g.add_argument("--no_drop_last", action="store_true", help="pad the last global batch instead of dropping it")
    g.add_argument("--latent_cache", default=None, help="dit: folder of cached posterior moments (built if absent)")
    g.add_argument("--latent_cache_dtype", choices=("bf16", "fp32"), default="bf16")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=S, help="per process (micro batch)")
    g.add_argument("--epochs", type=float, default=S)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0 = the whole schedule)")
    g.add_argument("--blr", type=float, default=S, help="tokenizer stages: lr = blr * global_batch / 256")
    g.add_argument("--lr", type=float, default=S, help="absolute peak lr (overrides --blr)")
    g.add_argument("--min_lr", type=float, default=S)
    g.add_argument("--end_lr", type=float, default=S)
    g.add_argument("--warmup_epochs", type=float, default=S)
    g.add_argument("--decay_start_epoch", type=float, default=S)
    g.add_argument("--weight_decay", type=float, default=S)
    g.add_argument("--clip_grad", type=float, default=S)
    g.add_argument("--ema_decay", type=float, default=S)
    g.add_argument("--disc_start_epoch", type=float, default=S)
    g.add_argument("--no_gan", action="store_true", help="tokenizer stages: no discriminator at all")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("speed / numerics")
    g.add_argument("--backend", choices=("auto", "reference", "fused"), default=None,
                   help="rectok_fast.ops backend (default: $RECTOK_FAST_IMPL or auto)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA (as ds.json), fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained model's forward")
    g.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    g = p.add_argument_group("runs")
    g.add_argument("--output_dir", default=None, help="default: runs/<stage>_<preset>")
    g.add_argument("--ckpt_every", type=int, default=S, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep_last", type=int, default=2)
    g.add_argument("--resume", action="store_true", help="continue from the latest COMPLETE checkpoint in output_dir")
    g.add_argument("--log_every", type=int, default=S)
    g.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many consecutive non-finite losses")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    g.add_argument("--emulate_ranks", type=int, default=1,
                   help="plain single process only: take R data-parallel ranks' micro batches per step with "
                        "their RNG streams and average the gradients (the reference path of the DP check)")
    # DeepSpeed launcher arguments
    g.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    try:
        import deepspeed
        deepspeed.add_config_arguments(p)
    except Exception:  # deepspeed not installed: plain PyTorch only
        p.add_argument("--deepspeed_config", default=None)
        p.add_argument("--deepspeed", action="store_true")
    return p


# hidden defaults for keys that presets may set but that have no flag
_HIDDEN = dict(model_small=False, disc_ndf=64, disc_layers=3, convnext=True, convnext_size=224, teacher_depth=2,
               sample_steps=50)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults (flag > preset > stage) and validate. Raises :class:`ConfigError`."""
    if args.preset is None:
        args.preset = "official" if (args.data_path or args.file_list) else "demo"
    stage = args.stage
    merged = dict(_HIDDEN)
    merged.update(dict(img_size=256, num_workers=8, log_every=50, ckpt_every=1000, stats_images=10000,
                       warmup_epochs=None, lr=None))
    merged.update(STAGE_DEFAULTS[stage])
    merged.update(PRESETS[args.preset])
    given = set(vars(args))          # the flags given on the command line (SUPPRESS defaults are absent)
    for k, v in merged.items():
        if k not in given:
            setattr(args, k, v)
    if args.model_small and "model" not in given and "model" not in PRESETS[args.preset]:
        args.model = "ditdh_s" if stage == "dit" else ("rectok_tiny" if stage == "tokenizer" else "rectok_tiny_decft")
    if stage == "dit" and args.model_small and "tokenizer" not in given:
        args.tokenizer = "rectok_tiny_decft"
    if args.warmup_epochs is None:
        args.warmup_epochs = args.warmup_rate * args.epochs if stage != "dit" else 0.0
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{stage}_{args.preset}")
    validate(args)
    return args


def validate(args) -> None:
    def bad(msg):
        raise ConfigError(msg)
    if args.batch_size < 1:
        bad(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.epochs <= 0:
        bad(f"--epochs must be > 0, got {args.epochs}")
    if args.img_size % 16:
        bad(f"--img_size must be a multiple of the 16-pixel patch, got {args.img_size}")
    for name in ("lr", "blr", "min_lr", "end_lr", "weight_decay", "clip_grad"):
        v = getattr(args, name, None)
        if v is not None and v < 0:
            bad(f"--{name} must be >= 0, got {v}")
    if not 0 <= args.ema_decay < 1:
        bad(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    if args.stage != "dit" and args.warmup_epochs > args.epochs:
        bad(f"--warmup_epochs ({args.warmup_epochs}) exceeds --epochs ({args.epochs})")
    for name, lo in (("log_every", 1), ("ckpt_every", 0), ("max_steps", 0), ("num_workers", 0), ("keep_last", 0)):
        if getattr(args, name) < lo:
            bad(f"--{name} must be >= {lo}, got {getattr(args, name)}")
    if args.loader == "dali" and not (args.data_path or args.file_list):
        bad("--loader dali reads image files; give --data_path/--file_list (the demo photos need --loader torch)")
    if args.max_bad_steps < 1:
        bad("--max_bad_steps must be >= 1")
    if args.emulate_ranks < 1:
        bad("--emulate_ranks must be >= 1")
    if args.emulate_ranks > 1 and (args.deepspeed_config or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        bad("--emulate_ranks is for the plain single-process loop (no --deepspeed_config, one process)")
    if args.file_list and not os.path.isfile(args.file_list):
        bad(f"--file_list {args.file_list!r} does not exist")
    if args.data_path and not os.path.isdir(args.data_path):
        bad(f"--data_path {args.data_path!r} is not a folder")
    if args.deepspeed_config and not os.path.isfile(args.deepspeed_config):
        bad(f"--deepspeed_config {args.deepspeed_config!r} does not exist")
    for name in ("load_from", "tokenizer_ckpt", "latent_stats", "teacher_weights", "vgg_weights", "lpips_weights",
                 "convnext_weights"):
        v = getattr(args, name)
        if v and not os.path.exists(v):
            bad(f"--{name} {v!r} does not exist")
    if args.stage == "decoder_ft" and args.preset == "official" and not args.load_from:
        bad("--stage decoder_ft needs --load_from <stage-1 checkpoint .pth> (official: epoch_0199.pth)")
    if args.stage != "dit" and args.latent_cache:
        bad("--latent_cache is for --stage dit")
    if args.latent_cache and args.loader == "dali":
        bad("--latent_cache trains from cached moments; --loader dali only applies to building it, "
            "which uses the torch loader (drop --loader dali)")
    if args.resume and not os.path.isdir(os.path.join(args.output_dir, "checkpoints")):
        bad(f"--resume: no checkpoints folder in {args.output_dir!r}")
    if args.compile and args.emulate_ranks > 1:
        bad("--compile and --emulate_ranks do not combine")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return resolve(args)
    except ConfigError as exc:
        parser.error(str(exc))
