"""Command line of ``rectok_fast/train.py``, resolved ONCE into a frozen, validated :class:`RunConfig`.

Precedence: explicit flag > preset > stage default (official) > ds.json (gradient accumulation).
Every check runs before any model is built or data is read; stages, the data pipeline and the
schedules receive only the typed sections (``cfg.model``, ``cfg.data`` ...), never the argparse
namespace. Model sizes are registered variants (:mod:`rectok_fast.models.registry`): a preset names
the variant of each stage; there is no "small" switch.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from types import MappingProxyType

from rectok_fast.models import registry

STAGES = ("tokenizer", "decoder_ft", "dit")
PATCH = 16

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


def _variants(tokenizer: str, dit: str) -> dict:
    """A preset's model per stage: the stage-1 tokenizer, its decode-only twin, and a DiT on it."""
    decft = registry.decode_only_name(tokenizer)
    return {"models": {"tokenizer": tokenizer, "decoder_ft": decft, "dit": dit}, "tokenizer": decft}


# Small models on the bundled photos; run anywhere in minutes. 'tiny' is the test size.
PRESETS = {
    "official": {},
    # ~3 minutes (tokenizer) on 2 CPU cores: 8-px patches (rectok_demo), no random-weight perceptual nets (they cost
    # 4/5 of a step and teach nothing), the GAN only for the last epochs, a fast EMA for a short run, and
    # an evaluation on the held-out demo photos at the end (--eval_every_epochs).
    # 'stages': values for one stage only. The tokenizer trains 96 epochs with a slower EMA (0.996): on the
    # held-out photos the 0.99 EMA of a 48-epoch run reached 19.6 dB, 72 epochs with 0.995 20.1 dB, this one
    # 20.2 dB (the EMA averages over the high-lr phase, where single weights swing by ~1 dB; a longer run
    # with the 0.99 EMA overfits).
    "demo": dict(**_variants("rectok_demo", "ditdh_demo"), img_size=64, batch_size=8, epochs=48, lr=1e-3,
                 warmup_epochs=2, disc_start_epoch=46, ckpt_every=200, log_every=8, ema_decay=0.99, num_classes=10,
                 decay_start_epoch=1, end_lr=1e-4, num_workers=2, disc_ndf=16, convnext=False, lpips=False,
                 sample_steps=10, keep_every_epochs=0, eval_every_epochs=16,
                 stages={"tokenizer": dict(epochs=96, disc_start_epoch=94, ema_decay=0.996, eval_every_epochs=32)}),
    "tiny": dict(**_variants("rectok_tiny", "ditdh_tiny"), img_size=32, batch_size=4, epochs=1, lr=1e-3,
                 warmup_epochs=0.0, disc_start_epoch=0, ckpt_every=0, log_every=1, num_classes=10,
                 decay_start_epoch=0, end_lr=1e-4, num_workers=0, disc_ndf=8, disc_layers=2, convnext=False,
                 sample_steps=4, keep_every_epochs=0),
    # the AutoGuidance guide model: DiT^DH-S, 30 epochs, same recipe otherwise
    "autoguide": dict(model="ditdh_s", epochs=30),
}


class ConfigError(ValueError):
    """A bad flag or flag combination, reported before any work starts."""


# =============================================================================================== sections
def _frozen(d) -> MappingProxyType:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class ModelConfig:
    """What trains and what it is built on. ``variant``/``overrides`` build it from the registry."""
    variant: str                       # the trained model (tokenizer variant, or DiT variant for 'dit')
    overrides: MappingProxyType        # config fields over the variant (img_size; DiT input/channels/classes)
    tokenizer: str | None = None       # dit: the (decode-only) tokenizer variant that makes the latents
    tokenizer_overrides: MappingProxyType = field(default_factory=lambda: _frozen({}))
    num_classes: int | None = None     # dit
    sample_steps: int = 50             # dit: sampling steps of the final image grid

    def build(self):
        return registry.build_model(self.variant, **self.overrides)

    def build_tokenizer(self):
        return registry.build_model(self.tokenizer, **self.tokenizer_overrides)


@dataclass(frozen=True)
class LossConfig:
    """Tokenizer stages: the GAN and the perceptual nets' settings."""
    use_gan: bool = True
    #: the LPIPS term; a preset may drop it (the CPU demo: random VGG features only slow it down) unless
    #: --vgg_weights/--lpips_weights are given
    lpips: bool = True
    disc_start_epoch: float = 100
    disc_ndf: int = 64
    disc_layers: int = 3
    convnext: bool = True              # the ConvNeXt-S term of the perceptual loss
    convnext_size: int = 224


@dataclass(frozen=True)
class WeightsConfig:
    """Local files of every pretrained net (None = random stand-in, loudly)."""
    teacher: str | None = None
    vgg: str | None = None
    lpips: str | None = None
    convnext: str | None = None
    load_from: str | None = None       # initial weights of the trained model (decoder_ft: the stage-1 file)
    tokenizer_ckpt: str | None = None  # dit: the tokenizer's weights


@dataclass(frozen=True)
class DataConfig:
    """What :func:`rectok_fast.data.build_loader` reads (names are its contract)."""
    data_path: str | None
    file_list: str | None
    loader: str
    img_size: int
    batch_size: int                    # per process and micro step
    num_workers: int
    seed: int
    drop_last: bool
    listing_cache_dir: str             # where the file listing is cached (the run's output folder)
    dali_threads: int | None = None
    prefetch: int = 2


@dataclass(frozen=True)
class LatentConfig:
    """dit: the latent cache and the latent statistics."""
    cache: str | None = None
    cache_dtype: str = "bf16"
    stats: str | None = None           # a latent-stats file
    stats_images: int | None = None    # images of the stats pass (None: the whole set)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training (tokenizer stages; :mod:`rectok_fast.training.evaluation`)."""
    every_epochs: float = 0.0          # 0: never
    val_path: str | None = None        # validation images (default for the demo source: the held-out photos)
    val_list: str | None = None
    val_images: int = 256              # at most this many validation images
    inception_weights: str | None = None   # torch-fidelity's Inception weights: + rFID


@dataclass(frozen=True)
class OptimConfig:
    lr: float                          # peak lr, resolved (blr * global_batch / 256 when not given)
    weight_decay: float
    clip_grad: float
    ema_decay: float
    grad_accum: int                    # micro steps per optimizer step
    global_batch: int                  # micro batch x grad_accum x data-parallel ranks
    grad_accum_explicit: bool = False  # --grad_accum (or ds.json's accumulation) given: a resume must keep it
    lr_explicit: bool = False          # --lr given: a resume keeps it instead of the saved run's blr-derived lr


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str                          # 'warmup_cosine' (tokenizer stages) or 'constant_linear' (dit)
    epochs: float
    max_steps: int
    lr: float
    min_lr: float = 0.0
    end_lr: float = 0.0
    warmup_epochs: float = 0.0
    decay_start_epoch: float = 0.0


@dataclass(frozen=True)
class CheckpointConfig:
    output_dir: str
    ckpt_every: int                    # steps (0: only at the end)
    keep_last: int
    keep_every_epochs: float           # milestones at every multiple of this many epochs, never deleted
    resume: bool


@dataclass(frozen=True)
class RuntimeConfig:
    deepspeed_config: str | None
    ds_config: MappingProxyType | None  # the parsed ds.json (None: plain PyTorch loop)
    precision: str                     # 'auto' | 'bf16' | 'fp32'
    backend: str | None
    compile: bool
    cpu: bool
    emulate_ranks: int
    world: int                         # processes, from the launcher's environment
    log_every: int
    max_bad_steps: int
    progress: bool


@dataclass(frozen=True)
class RunConfig:
    stage: str
    preset: str
    seed: int
    model: ModelConfig
    loss: LossConfig
    weights: WeightsConfig
    data: DataConfig
    latents: LatentConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    checkpoint: CheckpointConfig
    runtime: RuntimeConfig
    flags: MappingProxyType            # every resolved flag (scalars), stored as the checkpoints' 'args'
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    @property
    def output_dir(self) -> str:
        return self.checkpoint.output_dir

    @property
    def data_parallel(self) -> int:
        """Data-parallel ranks: processes x emulated ranks."""
        return self.runtime.world * self.runtime.emulate_ranks


# =============================================================================================== parser
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
    g.add_argument("--model", default=S, help="registered variant that trains: " + ", ".join(registry.names()))
    g.add_argument("--tokenizer", default=S, help="dit stage: tokenizer variant that makes the latents")
    g.add_argument("--tokenizer_ckpt", default=None, help="dit stage: tokenizer weights (official RecTok_decft.pth; its model_ema is used)")
    g.add_argument("--load_from", default=None, help="initial weights (.pth): decoder_ft loads stage-1 'model' + 'model_ema'")
    g.add_argument("--latent_stats", default=None, help="dit: latent mean/std file (default: the tokenizer checkpoint's, else computed)")
    g.add_argument("--stats_images", type=int, default=S, help="dit: images of the latent-stats pass (default: all)")
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
    g.add_argument("--dali_threads", type=int, default=None, help="DALI CPU threads (default: from the CPU count)")
    g.add_argument("--prefetch", type=int, default=2, help="batches prefetched by the loader")
    g.add_argument("--img_size", type=int, default=S)
    g.add_argument("--no_drop_last", action="store_true", help="pad the last global batch instead of dropping it")
    g.add_argument("--latent_cache", default=None, help="dit: folder of cached posterior moments (built if absent)")
    g.add_argument("--latent_cache_dtype", choices=("bf16", "fp32"), default="bf16")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=S, help="per process and micro step")
    g.add_argument("--grad_accum", type=int, default=S,
                   help="micro steps per optimizer step (default: ds.json gradient_accumulation_steps, else 1)")
    g.add_argument("--epochs", type=float, default=S)
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many optimizer steps (0 = the whole schedule)")
    g.add_argument("--blr", type=float, default=S, help="tokenizer stages: lr = blr * global_batch / 256 "
                   "(global batch = micro batch x grad_accum x ranks)")
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
    g = p.add_argument_group("evaluation during training (tokenizer stages)")
    g.add_argument("--eval_every_epochs", type=float, default=S,
                   help="PSNR/SSIM (+ rFID with --inception_weights) of the EMA and raw model on the validation set "
                        "every N epochs and at the end (0: never)")
    g.add_argument("--val_path", default=None, help="validation ImageFolder root (default for the demo photos: "
                   "crops of the held-out photos)")
    g.add_argument("--val_list", default=None, help="validation 'path label' list (paths relative to --val_path)")
    g.add_argument("--val_images", type=int, default=256, help="at most this many validation images")
    g.add_argument("--inception_weights", default=None,
                   help="torch-fidelity's inception-v3-compat weights file: adds rFID to the evaluation")
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
    g.add_argument("--keep_every_epochs", type=float, default=S,
                   help="milestone checkpoints at every multiple of this many epochs, never deleted (0: none)")
    g.add_argument("--resume", action="store_true", help="continue from the latest COMPLETE checkpoint in output_dir")
    g.add_argument("--log_every", type=int, default=S)
    g.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many consecutive non-finite steps")
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
_HIDDEN = dict(disc_ndf=64, disc_layers=3, convnext=True, convnext_size=224, sample_steps=50, lpips=True,
               eval_every_epochs=0.0)


# =============================================================================================== resolve
def resolve(ns: argparse.Namespace) -> RunConfig:
    """Fill defaults (flag > preset > stage > ds.json), validate, and freeze. Raises :class:`ConfigError`."""
    if ns.preset is None:
        ns.preset = "official" if (ns.data_path or ns.file_list) else "demo"
    stage = ns.stage
    merged = dict(_HIDDEN)
    merged.update(dict(img_size=256, num_workers=8, log_every=50, ckpt_every=1000, stats_images=None,
                       warmup_epochs=None, lr=None, grad_accum=None))
    merged.update(STAGE_DEFAULTS[stage])
    preset = dict(PRESETS[ns.preset])
    models = preset.pop("models", None)
    if models is not None:
        preset["model"] = models[stage]
    preset.update(preset.pop("stages", {}).get(stage, {}))
    if stage != "dit":
        preset.pop("tokenizer", None)
    merged.update(preset)
    given = set(vars(ns))            # the flags given on the command line (SUPPRESS defaults are absent)
    for k, v in merged.items():
        if k not in given:
            setattr(ns, k, v)
    if ns.warmup_epochs is None:
        ns.warmup_epochs = ns.warmup_rate * ns.epochs if stage != "dit" else 0.0
    if ns.output_dir is None:
        ns.output_dir = os.path.join("runs", f"{stage}_{ns.preset}")
    _adopt_described_variant(ns, given)
    ds_cfg = _load_ds_config(ns.deepspeed_config)
    ns.grad_accum = _resolve_grad_accum(ns, ds_cfg, "grad_accum" in given)
    ds_gas = int((ds_cfg or {}).get("gradient_accumulation_steps", 1) or 1)
    explicit = {"grad_accum": "grad_accum" in given or ds_gas != 1, "lr": ns.lr is not None}
    ns.world = int(os.environ.get("WORLD_SIZE", 1))
    validate(ns, given)
    _check_ds_batch(ns, ds_cfg)
    return _freeze(ns, ds_cfg, explicit)


def _described(path) -> dict | None:
    """The self-description of one of our checkpoints (None for official files); cheap: memory-mapped."""
    from rectok_fast.checkpoint import CheckpointError, checkpoint_config, safe_torch_load
    try:
        return checkpoint_config(safe_torch_load(path))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def _adopt_described_variant(ns, given) -> None:
    """A self-describing --load_from (decoder_ft) / --tokenizer_ckpt (dit) names the tokenizer variant
    when --model / --tokenizer is not given; its image size must be this run's."""
    flag, path = {"decoder_ft": ("model", ns.load_from), "dit": ("tokenizer", ns.tokenizer_ckpt)}.get(ns.stage, (None, None))
    if not path or not os.path.isfile(path):
        return
    desc = _described(path)
    if not desc or desc.get("kind") != "tokenizer":
        return
    if flag not in given:
        setattr(ns, flag, registry.decode_only_name(desc["variant"]))
    if desc.get("img_size") and desc["img_size"] != ns.img_size:
        raise ConfigError(f"{path} holds a tokenizer for {desc['img_size']} px images (variant {desc['variant']}); "
                          f"this run has --img_size {ns.img_size}: pass --img_size {desc['img_size']}")


def _load_ds_config(path):
    if not path:
        return None
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed_config {path!r} does not exist")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed_config {path!r} is not valid JSON: {exc}") from None


def _resolve_grad_accum(ns, ds_cfg, flag_given: bool) -> int:
    ds_gas = int((ds_cfg or {}).get("gradient_accumulation_steps", 1) or 1)
    if flag_given:
        if ds_gas != 1 and ds_gas != ns.grad_accum:
            raise ConfigError(f"--grad_accum {ns.grad_accum} contradicts gradient_accumulation_steps {ds_gas} in "
                              f"{ns.deepspeed_config}; give one of them")
        return int(ns.grad_accum)
    return ds_gas if ns.grad_accum is None else int(ns.grad_accum)


def _check_ds_batch(ns, ds_cfg) -> None:
    tb = (ds_cfg or {}).get("train_batch_size")
    if tb is not None:
        want = ns.batch_size * ns.grad_accum * ns.world
        if int(tb) != want:
            raise ConfigError(f"train_batch_size {tb} in {ns.deepspeed_config} contradicts micro batch "
                              f"{ns.batch_size} x grad_accum {ns.grad_accum} x {ns.world} processes = {want}; "
                              f"drop train_batch_size (the trainer derives it)")


def validate(ns, given=frozenset()) -> None:
    def bad(msg):
        raise ConfigError(msg)
    if ns.batch_size < 1:
        bad(f"--batch_size must be >= 1, got {ns.batch_size}")
    if ns.grad_accum < 1:
        bad(f"--grad_accum must be >= 1, got {ns.grad_accum}")
    if ns.epochs <= 0:
        bad(f"--epochs must be > 0, got {ns.epochs}")
    if ns.img_size % PATCH:
        bad(f"--img_size must be a multiple of the {PATCH}-pixel patch, got {ns.img_size}")
    for name in ("lr", "blr", "min_lr", "end_lr", "weight_decay", "clip_grad"):
        v = getattr(ns, name, None)
        if v is not None and v < 0:
            bad(f"--{name} must be >= 0, got {v}")
    if not 0 <= ns.ema_decay < 1:
        bad(f"--ema_decay must be in [0, 1), got {ns.ema_decay}")
    if ns.stage != "dit" and ns.warmup_epochs > ns.epochs:
        bad(f"--warmup_epochs ({ns.warmup_epochs}) exceeds --epochs ({ns.epochs})")
    for name, lo in (("log_every", 1), ("ckpt_every", 0), ("max_steps", 0), ("num_workers", 0), ("keep_last", 0),
                     ("keep_every_epochs", 0), ("prefetch", 1)):
        if getattr(ns, name) < lo:
            bad(f"--{name} must be >= {lo}, got {getattr(ns, name)}")
    if ns.dali_threads is not None and ns.dali_threads < 1:
        bad(f"--dali_threads must be >= 1, got {ns.dali_threads}")
    if ns.stats_images is not None and ns.stats_images < 1:
        bad(f"--stats_images must be >= 1, got {ns.stats_images}")
    if ns.loader == "dali" and not (ns.data_path or ns.file_list):
        bad("--loader dali reads image files; give --data_path/--file_list (the demo photos need --loader torch)")
    if ns.max_bad_steps < 1:
        bad("--max_bad_steps must be >= 1")
    if ns.emulate_ranks < 1:
        bad("--emulate_ranks must be >= 1")
    if ns.emulate_ranks > 1 and (ns.deepspeed_config or ns.world > 1):
        bad("--emulate_ranks is for the plain single-process loop (no --deepspeed_config, one process)")
    if ns.file_list and not os.path.isfile(ns.file_list):
        bad(f"--file_list {ns.file_list!r} does not exist")
    if ns.data_path and not os.path.isdir(ns.data_path):
        bad(f"--data_path {ns.data_path!r} is not a folder")
    _validate_eval(ns, given, bad)
    for name in ("load_from", "tokenizer_ckpt", "latent_stats", "teacher_weights", "vgg_weights", "lpips_weights",
                 "convnext_weights", "inception_weights", "val_list"):
        v = getattr(ns, name)
        if v and not os.path.exists(v):
            bad(f"--{name} {v!r} does not exist")
    _validate_models(ns, given, bad)
    if ns.stage == "decoder_ft" and ns.preset == "official" and not ns.load_from:
        bad("--stage decoder_ft needs --load_from <stage-1 checkpoint .pth> (official: epoch_0199.pth)")
    if ns.stage != "dit":
        for name in ("latent_cache", "tokenizer_ckpt", "latent_stats"):
            if getattr(ns, name):
                bad(f"--{name} is for --stage dit")
    else:
        for name in ("teacher_weights", "vgg_weights", "lpips_weights", "convnext_weights"):
            if getattr(ns, name):
                bad(f"--{name} is for the tokenizer stages (the dit stage has no {name.split('_')[0]} net)")
        if ns.no_gan:
            bad("--no_gan is for the tokenizer stages")
    if ns.no_gan and "disc_start_epoch" in given:
        bad("--no_gan and --disc_start_epoch contradict each other (no discriminator is built)")
    if ns.latent_cache and ns.loader == "dali":
        bad("--latent_cache trains from cached moments; --loader dali only applies to building it, "
            "which uses the torch loader (drop --loader dali)")
    if ns.resume and not os.path.isdir(os.path.join(ns.output_dir, "checkpoints")):
        bad(f"--resume: no checkpoints folder in {ns.output_dir!r}")
    if ns.compile and ns.emulate_ranks > 1:
        bad("--compile and --emulate_ranks do not combine")


def _validate_eval(ns, given, bad) -> None:
    if ns.eval_every_epochs < 0:
        bad(f"--eval_every_epochs must be >= 0, got {ns.eval_every_epochs}")
    if ns.val_images < 1:
        bad(f"--val_images must be >= 1, got {ns.val_images}")
    if ns.val_path and not os.path.isdir(ns.val_path):
        bad(f"--val_path {ns.val_path!r} is not a folder")
    if ns.stage == "dit":
        if "eval_every_epochs" in given and ns.eval_every_epochs > 0:
            bad("--eval_every_epochs evaluates the tokenizer stages' reconstructions; the dit stage has none "
                "(evaluate its samples with rectok-eval gen)")
        return
    demo_source = not (ns.data_path or ns.file_list)
    if ns.eval_every_epochs > 0 and not (demo_source or ns.val_path or ns.val_list):
        bad("--eval_every_epochs needs a validation set: --val_path and/or --val_list")


def _validate_models(ns, given, bad) -> None:
    want = "dit" if ns.stage == "dit" else "tokenizer"
    try:
        v = registry.variant(ns.model, want)
    except ValueError as exc:
        bad(f"--model: {exc} (--stage {ns.stage} trains a {want})")
    if ns.stage == "decoder_ft" and not v.decode_only:
        bad(f"--stage decoder_ft trains a decode-only variant; use --model {registry.decode_only_name(ns.model)} "
            f"instead of {ns.model}")
    if ns.stage == "dit":
        try:
            registry.variant(ns.tokenizer, "tokenizer")
        except ValueError as exc:
            bad(f"--tokenizer: {exc}")


def _model_config(ns) -> ModelConfig:
    """The variants with only the fields this run changes (their checkpoints then name the variant alone)."""
    if ns.stage != "dit":
        return ModelConfig(ns.model, _frozen(registry.changed_fields(ns.model, {"img_size": ns.img_size})),
                           sample_steps=ns.sample_steps)
    tokenizer = registry.decode_only_name(ns.tokenizer)     # the DiT's tokenizer only encodes and decodes
    tok_cfg = registry.full_config(tokenizer)
    channels, patch = tok_cfg["token_channels"], tok_cfg["patch_size"]    # the latent grid is img_size // patch
    dit = registry.changed_fields(ns.model, dict(input_size=ns.img_size // patch, in_channels=channels,
                                                 num_classes=ns.num_classes))
    return ModelConfig(ns.model, _frozen(dit), tokenizer=tokenizer,
                       tokenizer_overrides=_frozen(registry.changed_fields(tokenizer, {"img_size": ns.img_size})),
                       num_classes=ns.num_classes, sample_steps=ns.sample_steps)


def _freeze(ns, ds_cfg, explicit=None) -> RunConfig:
    dp = ns.world * ns.emulate_ranks
    global_batch = ns.batch_size * ns.grad_accum * dp
    lr = ns.lr if ns.lr is not None else ns.blr * global_batch / 256
    ns.lr = lr
    schedule = ScheduleConfig(
        kind="constant_linear" if ns.stage == "dit" else "warmup_cosine", epochs=float(ns.epochs),
        max_steps=int(ns.max_steps), lr=lr, min_lr=float(getattr(ns, "min_lr", 0.0) or 0.0),
        end_lr=float(getattr(ns, "end_lr", 0.0) or 0.0), warmup_epochs=float(ns.warmup_epochs),
        decay_start_epoch=float(getattr(ns, "decay_start_epoch", 0.0) or 0.0))
    flags = {k: v for k, v in sorted(vars(ns).items()) if isinstance(v, (int, float, str, bool)) or v is None}
    return RunConfig(
        stage=ns.stage, preset=ns.preset, seed=int(ns.seed),
        model=_model_config(ns),
        loss=LossConfig(use_gan=not ns.no_gan, lpips=bool(ns.lpips or ns.vgg_weights or ns.lpips_weights),
                        disc_start_epoch=float(ns.disc_start_epoch) if ns.stage != "dit" else 0.0,
                        disc_ndf=int(ns.disc_ndf), disc_layers=int(ns.disc_layers), convnext=bool(ns.convnext),
                        convnext_size=int(ns.convnext_size)),
        weights=WeightsConfig(ns.teacher_weights, ns.vgg_weights, ns.lpips_weights, ns.convnext_weights,
                              ns.load_from, ns.tokenizer_ckpt),
        data=DataConfig(data_path=ns.data_path, file_list=ns.file_list, loader=ns.loader, img_size=int(ns.img_size),
                        batch_size=int(ns.batch_size), num_workers=int(ns.num_workers), seed=int(ns.seed),
                        drop_last=not ns.no_drop_last, listing_cache_dir=ns.output_dir,
                        dali_threads=ns.dali_threads, prefetch=int(ns.prefetch)),
        latents=LatentConfig(ns.latent_cache, ns.latent_cache_dtype, ns.latent_stats, ns.stats_images),
        optim=OptimConfig(lr=lr, weight_decay=float(ns.weight_decay), clip_grad=float(ns.clip_grad),
                          ema_decay=float(ns.ema_decay), grad_accum=int(ns.grad_accum), global_batch=global_batch,
                          grad_accum_explicit=bool((explicit or {}).get("grad_accum")),
                          lr_explicit=bool((explicit or {}).get("lr"))),
        schedule=schedule,
        checkpoint=CheckpointConfig(ns.output_dir, int(ns.ckpt_every), int(ns.keep_last),
                                    float(ns.keep_every_epochs), bool(ns.resume)),
        runtime=RuntimeConfig(ns.deepspeed_config, _frozen(ds_cfg) if ds_cfg is not None else None, ns.precision,
                              ns.backend, bool(ns.compile), bool(ns.cpu), int(ns.emulate_ranks), int(ns.world),
                              int(ns.log_every), int(ns.max_bad_steps), not ns.no_progress),
        flags=_frozen(flags),
        evaluation=EvalConfig(float(ns.eval_every_epochs) if ns.stage != "dit" else 0.0, ns.val_path, ns.val_list,
                              int(ns.val_images), ns.inception_weights))


def parse_config(argv=None) -> RunConfig:
    """Parse and resolve the command line; a bad combination exits with the parser's usage error."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return resolve(ns)
    except ConfigError as exc:
        parser.error(str(exc))


parse_args = parse_config   # the earlier name
