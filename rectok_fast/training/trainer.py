"""The training loop of all three stages.

Step (official order, train_utils.py): set LR (both optimizers) -> generator forward + all losses ->
backward -> clip + step -> EMA -> discriminator forward/loss on the same reconstructions -> backward
-> clip + step. The DiT stage: latents (online, no grad, or from the cache) -> flow-matching loss ->
backward -> clip + step -> EMA.

Randomness is counter-based: before each micro batch, Python/NumPy/torch RNGs are seeded from
(seed, global step, data-parallel rank). So a resumed run draws exactly what the uninterrupted run
drew, and a single process that emulates R ranks (``--emulate_ranks R``: R micro batches with the
ranks' seeds, gradients averaged) computes what R DeepSpeed processes compute -- the reference path
of the data-parallel check. Per-sample data randomness (flips, demo crops) is a function of
(seed, epoch, dataset index) (see :mod:`rectok_fast.data`).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import torch

from rectok_fast.training import resume as R
from rectok_fast.training.engine import all_reduce_, barrier, build_engine, dist_info, init_distributed, load_ds_config
from rectok_fast.training.logging import MetricLogger, plot_losses, save_image_grid
from rectok_fast.training.schedule import lr_at


class TrainingDiverged(RuntimeError):
    pass


def seed_step(seed: int, step: int, rank: int) -> None:
    s = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank), 0xC0FFEE]).generate_state(2)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]) & 0xFFFFFFFF)
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))


def loud(msg: str, rank: int = 0) -> None:
    if rank == 0:
        bar = "!" * 100
        print(f"\n{bar}\n!!! {msg}\n{bar}", file=sys.stderr, flush=True)


class _StateShim:
    """Duck-typed 'model' for export_official_checkpoint: only ``state_dict()`` is used."""

    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


# ============================================================================================ models
def _tokenizer_from_name(name: str, img_size: int, small: bool, **over):
    from rectok_fast.models.tokenizer import PRESETS, build_tokenizer
    decft = dict(teachers={}, gamma=0.0, mask_ratio=0.0, mask_ratio_type="fix")
    base = name
    extra = {}
    if name not in PRESETS and name.endswith("_decft"):
        base, extra = name[: -len("_decft")], decft
    if base not in PRESETS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(PRESETS)} or '<preset>_decft'")
    kw = dict(extra)
    if small or img_size != 256:
        kw["img_size"] = img_size
    kw.update(over)
    return build_tokenizer(base, **kw)


def _full_state(engine, module, fp32=True) -> dict | None:
    """Full (gathered) fp32 state dict on rank 0 (None elsewhere). Collective: call on all ranks."""
    rank = dist_info()[0]
    eng = getattr(engine, "engine", None)
    bf16 = eng is not None and engine.config.get("bf16", {}).get("enabled", False)
    if bf16:
        from deepspeed.utils import safe_get_full_fp32_param
        sd = {}
        for n, p in module.named_parameters():
            v = safe_get_full_fp32_param(p) if p.requires_grad else None
            if v is None:
                with engine.full_parameters():
                    v = p.detach().float().clone()
            if rank == 0:
                sd[n] = v.detach().cpu().clone()
        if rank == 0:
            for n, b in module.state_dict().items():
                if n not in sd:
                    sd[n] = b.detach().cpu().clone()
        return sd if rank == 0 else None
    with engine.full_parameters():
        if rank != 0:
            return None
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in module.state_dict().items()}


# ============================================================================================ tasks
class TokenizerTask:
    """Stages 'tokenizer' (stage 1) and 'decoder_ft' (stage 2)."""

    def __init__(self, args, device, rank):
        from rectok_fast.checkpoint import load_official_checkpoint
        from rectok_fast.losses import build_rectok_loss
        self.args, self.device = args, device
        stage = args.stage
        self.model = _tokenizer_from_name(args.model, args.img_size, args.model_small).to(device)
        self.stand_ins = []
        self.init_ema_state = None
        if args.load_from:
            ck = load_official_checkpoint(args.load_from, self.model, which="model", strict=False)
            if isinstance(ck.get("model_ema"), dict):
                self.init_ema_state = {k: v for k, v in ck["model_ema"].items()}
        elif stage == "decoder_ft":
            self.stand_ins.append("the stage-1 tokenizer (no --load_from: decoder_ft starts from RANDOM weights)")
        if stage == "decoder_ft":
            self.model.freeze_everything_but_decoder()
        if self.model.use_sem:
            from rectok_fast.models.teacher import build_teacher
            for name, dim in self.model.config.teachers.items():
                kw = {}
                if args.model_small:
                    kw = dict(depth=args.teacher_depth, embed_dim=int(dim), num_heads=2)
                teacher = build_teacher(name, args.teacher_weights, img_size=args.img_size, **kw)
                if args.teacher_weights is None:
                    self.stand_ins.append(f"teacher {name} (semantic targets)")
                self.model.attach_teacher(name, teacher.to(device))
        self.use_gan = not args.no_gan
        perceptual = "build"
        if args.model_small:
            from rectok_fast.models.perceptual import LPIPS, PerceptualLoss, build_convnext_small
            lp = LPIPS(args.vgg_weights, args.lpips_weights)
            cn = build_convnext_small(args.convnext_weights) if args.convnext else None
            perceptual = PerceptualLoss(lp, cn, convnext_size=args.convnext_size)
        if args.vgg_weights is None or args.lpips_weights is None:
            self.stand_ins.append("LPIPS (VGG16 trunk and/or lin heads)")
        if args.convnext_weights is None and (args.convnext or not args.model_small):
            self.stand_ins.append("ConvNeXt-S (perceptual logits)")
        from rectok_fast.models.discriminator import NLayerDiscriminator
        disc = NLayerDiscriminator(ndf=args.disc_ndf, n_layers=args.disc_layers)
        self.loss = build_rectok_loss(stage, perceptual=perceptual, discriminator=disc,
                                      disc_start_epoch=args.disc_start_epoch,
                                      disc_weight=0.1 if self.use_gan else 0.0).to(device)
        # only the discriminator trains in the loss module; perceptual nets stay frozen outside any engine
        self.loss.requires_grad_(False)
        self.loss.discriminator.requires_grad_(True)

    def engines(self, args, lr, ds_cfg, bf16):
        self.G = build_engine(self.model, lr, args.weight_decay, args.clip_grad, self.device, ds_cfg, bf16,
                              args.batch_size, "G")
        self.model = self.G.module
        self.D = None
        if self.use_gan:
            # D runs inside the fp32 loss module (autocast off, as officially): never bf16
            self.D = build_engine(self.loss.discriminator, lr, args.weight_decay, args.clip_grad, self.device,
                                  ds_cfg, False, args.batch_size, "D")
            # the loss module calls the raw D module (G's backward must not trigger D's engine hooks)
        return [e for e in (self.G, self.D) if e is not None]

    def forward_losses(self, chunks, step, epoch_f, autocast):
        outs = []
        for c in chunks:
            seed_step(self.args.seed, step, c["rank"])
            images = c["images"].to(self.device, non_blocking=True)
            with autocast():
                out = self.fwd(images)
            loss, logs = self.loss.generator_loss(images, out, epoch_f)
            outs.append((loss, logs, images, out.recon.detach()))
        return outs

    def train_step(self, chunks, step, epoch_f, autocast, ema, check_finite):
        outs = self.forward_losses(chunks, step, epoch_f, autocast)
        if not check_finite([o[0] for o in outs]):
            return None
        for loss, *_ in outs:
            self.G.backward(loss / len(outs))
        gnorm = self.G.step()
        with self.G.full_parameters():
            ema.update(self.model)
        logs = _mean_logs([o[1] for o in outs])
        logs["loss"] = logs.pop("total_loss")
        logs["grad_norm"] = gnorm
        if self.D is not None and self.loss.gan_active(epoch_f):
            dl = []
            for loss, _, images, recon in outs:
                d_loss, d_logs = self.loss.discriminator_loss(images, recon, epoch_f)
                self.D.backward(d_loss / len(outs))
                dl.append(d_logs)
            logs["d_grad_norm"] = self.D.step()
            logs.update(_mean_logs(dl))
        return logs

    def fwd(self, images):
        return self.G.call(images)

    @torch.no_grad()
    def final_images(self, args, ema, path, rank, engine_ctx):
        from rectok_fast.data import adm_center_crop, build_source, demo_sample, load_rgb, to_tensor_pm1
        if rank == 0:    # only rank 0 draws the grid; the others just take part in the ZeRO-3 gather
            src = build_source(args.data_path, args.file_list)
            imgs = []
            for i in range(min(8, len(src))):
                if src.kind == "demo":
                    pil = demo_sample(i, args.img_size, args.seed, 0)
                else:
                    try:
                        pil = adm_center_crop(load_rgb(src.samples[i][0]), args.img_size)
                    except Exception:
                        continue
                imgs.append(to_tensor_pm1(np.asarray(pil)))
            x = torch.stack(imgs).to(self.device)
        with engine_ctx():
            if rank != 0:
                return None
            self.model.eval()
            raw = self.model.reconstruct(x.to(next(self.model.parameters()).dtype)).float()
            self.model.train()
        ema_model = _tokenizer_from_name(args.model, args.img_size, args.model_small, teachers={}).to(self.device)
        sd = {k: v for k, v in ema.shadow.items() if not k.startswith("sem_decoders.")}
        ema_model.load_state_dict(sd, strict=False)
        ema_model.eval()
        rec_ema = ema_model.reconstruct(x).float()
        return save_image_grid([x * 0.5 + 0.5, raw, rec_ema], path, labels=["input", "recon", "EMA recon"])


class DiTTask:
    """Stage 'dit': DiT^DH (or the small AutoGuidance model) on normalized tokenizer latents."""

    def __init__(self, args, device, rank, world, barrier_fn):
        from rectok_fast.checkpoint import load_official_checkpoint
        from rectok_fast.flow import dit_time_shift
        from rectok_fast.models.dit import build_dit
        self.args, self.device = args, device
        self.stand_ins = []
        tok = _tokenizer_from_name(args.tokenizer, args.img_size, args.model_small)
        if tok.use_sem:
            tok = _tokenizer_from_name(args.tokenizer, args.img_size, args.model_small, teachers={}, gamma=0.0,
                                       mask_ratio=0.0, mask_ratio_type="fix")
        if args.tokenizer_ckpt:
            load_official_checkpoint(args.tokenizer_ckpt, tok, which="model_ema", strict=False)
        else:
            self.stand_ins.append("the tokenizer that makes the DiT latents (no --tokenizer_ckpt)")
        self.tok = tok.to(device).eval().requires_grad_(False)
        self.shift = dit_time_shift(tok.seq_h, tok.seq_w, tok.token_channels)
        over = dict(input_size=tok.seq_h, in_channels=tok.token_channels, num_classes=args.num_classes)
        if args.model_small:
            over.update(hidden_size=32, depth=2, num_heads=2, head_hidden_size=32, head_depth=1, head_num_heads=2)
        self.dit_overrides = over
        self.model = build_dit(args.model, **over).to(device)
        self.cache = None
        if args.latent_cache:
            from rectok_fast.data import build_source
            from rectok_fast.training.latent_cache import LatentCache, build_latent_cache, cache_complete
            if not cache_complete(args.latent_cache):
                if rank == 0:
                    print(f"[rectok_fast] building the latent cache in {args.latent_cache} (both flips)", flush=True)
                build_latent_cache(args.latent_cache, self.tok, build_source(args.data_path, args.file_list),
                                   args.img_size, rank, world, args.batch_size, device, args.latent_cache_dtype,
                                   args.seed, autocast=device.type == "cuda", progress=not args.no_progress,
                                   barrier=barrier_fn)
            self.cache = LatentCache(args.latent_cache)
        self._latent_stats(args, rank)

    def _latent_stats(self, args, rank):
        from rectok_fast.latent_stats import latent_stats_path, load_latent_stats, save_latent_stats
        path = args.latent_stats
        if path is None and args.tokenizer_ckpt and os.path.exists(latent_stats_path(args.tokenizer_ckpt)):
            path = latent_stats_path(args.tokenizer_ckpt)
        if path:
            mean, std = load_latent_stats(path)
        elif self.cache is not None:
            mean, std = self.cache.stats(self.tok.token_channels)
        else:
            from rectok_fast.data import TrainLoader, build_source
            from rectok_fast.latent_stats import compute_latent_stats
            src = build_source(args.data_path, args.file_list)
            n = min(len(src), args.stats_images)
            bs = min(args.batch_size, n)
            ld = TrainLoader(src, args.img_size, bs, seed=args.seed, shuffle=False, flip="none",
                             num_workers=0 if args.model_small else args.num_workers)
            steps = max(1, n // bs)
            batches = (b["images"] for _, b in zip(range(steps), ld.epoch(0)))
            mean, std, _ = compute_latent_stats(self.tok, batches, total=steps, progress=False, device=self.device)
        self.tok.set_latent_stats(mean, std)
        self.latent_mean, self.latent_std = mean, std
        if rank == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            save_latent_stats(os.path.join(args.output_dir, "latent_stats.pt"), mean, std)

    def engines(self, args, lr, ds_cfg, bf16):
        self.G = build_engine(self.model, lr, args.weight_decay, args.clip_grad, self.device, ds_cfg, bf16,
                              args.batch_size, "G")
        self.model = self.G.module
        self.D = None
        return [self.G]

    @torch.no_grad()
    def latents(self, chunk, autocast):
        if "moments" in chunk:
            m = chunk["moments"].to(self.device)
        else:
            with autocast():
                m = self.tok.encode_moments(chunk["images"].to(self.device, non_blocking=True))
        return self.tok.latents_from_moments(m.float(), sample=True)

    def train_step(self, chunks, step, epoch_f, autocast, ema, check_finite):
        from rectok_fast.flow import dit_training_loss
        losses = []
        for c in chunks:
            seed_step(self.args.seed, step, c["rank"])
            x1 = self.latents(c, autocast)
            y = c["labels"].to(self.device)
            with autocast():
                losses.append(dit_training_loss(self.fwd, x1, y, self.shift))
        if not check_finite(losses):
            return None
        for loss in losses:
            self.G.backward(loss / len(losses))
        gnorm = self.G.step()
        with self.G.full_parameters():
            ema.update(self.model)
        return {"loss": sum(l.detach().float() for l in losses) / len(losses), "grad_norm": gnorm}

    def fwd(self, x, t, y):
        return self.G.call(x, t, y)

    @torch.no_grad()
    def final_images(self, args, ema, path, rank, engine_ctx):
        if rank != 0:
            return None
        from rectok_fast.flow import sample_latents
        from rectok_fast.models.dit import build_dit
        m = build_dit(args.model, **self.dit_overrides).to(self.device)
        ema.copy_to(m)
        labels = torch.arange(8, device=self.device) % args.num_classes
        z = sample_latents(m, labels, num_steps=args.sample_steps, shift=self.shift,
                           generator=torch.Generator(self.device).manual_seed(args.seed))
        return save_image_grid([self.tok.detokenize(z)], path)


def _mean_logs(logs_list):
    """Mean over micro batches, in float64 as Python floats would be. Tensors stay on their device:
    the trainer reads them (a GPU sync) only on the steps it logs."""
    def f64(v):
        return v.double() if torch.is_tensor(v) else float(v)
    return {k: sum(f64(l[k]) for l in logs_list) / len(logs_list) for k in logs_list[0]}


# ============================================================================================ main loop
def run(args) -> dict:
    """Train as configured by resolved ``args`` (see :mod:`rectok_fast.training.config`)."""
    from rectok_fast import ops
    from rectok_fast.data import build_loader
    use_ds = bool(args.deepspeed_config)
    if use_ds:
        try:
            import deepspeed  # noqa: F401
        except Exception as exc:
            raise RuntimeError(f"--deepspeed_config given but deepspeed cannot be imported: {exc!r}") from None
    cuda = torch.cuda.is_available() and not args.cpu
    rank, world, local = dist_info()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    init_distributed(use_ds, device)
    if os.environ.get("RECTOK_FAST_DETECT_ANOMALY"):
        torch.autograd.set_detect_anomaly(True)
    if args.backend:
        ops.set_backend(args.backend)
    ds_cfg = load_ds_config(args.deepspeed_config) if use_ds else None
    ds_bf16 = bool(ds_cfg.get("bf16", {}).get("enabled", False)) if ds_cfg else True
    if args.precision == "auto":
        bf16 = cuda and ds_bf16
    else:
        bf16 = args.precision == "bf16"
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if not cuda and ds_bf16 and args.precision == "auto":
        say("[rectok_fast] CPU run: training in fp32 (the bf16 setting of ds.json is for GPUs; "
            "pass --precision bf16 to keep it on CPU)")
    zero = ds_cfg.get("zero_optimization", {}).get("stage", 0) if ds_cfg else None
    say(f"[rectok_fast] stage={args.stage} preset={args.preset} model={args.model} device={device.type} "
        f"world={world} precision={'bf16' if bf16 else 'fp32'} engine="
        f"{'deepspeed ZeRO-' + str(zero) if use_ds else 'plain pytorch'} backend={ops.get_backend()} "
        f"output={args.output_dir}")

    R_emu = args.emulate_ranks
    dp = world * R_emu
    global_batch = args.batch_size * dp
    if args.lr is None:
        args.lr = args.blr * global_batch / 256
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    # ---- models, data
    if args.stage == "dit":
        task = DiTTask(args, device, rank, world, barrier)
    else:
        task = TokenizerTask(args, device, rank)
    if task.stand_ins:
        loud("RANDOM STAND-INS (no local weights given) -- results are a smoke test, not a model: "
             + "; ".join(task.stand_ins), rank)
    if getattr(task, "cache", None) is not None:
        from rectok_fast.training.latent_cache import CacheLoader
        loaders = [CacheLoader(task.cache, args.batch_size, rank * R_emu + r, dp, args.seed,
                               drop_last=not args.no_drop_last) for r in range(R_emu)]
    else:
        loaders = [build_loader(args, rank * R_emu + r, dp, device) for r in range(R_emu)]
    n_classes = getattr(args, "num_classes", None)
    if args.stage == "dit":
        src_classes = task.cache.labels.max().item() + 1 if task.cache is not None else loaders[0].source.num_classes
        if src_classes > n_classes:
            raise ValueError(f"the data has {src_classes} classes but the DiT has --num_classes {n_classes}")
    spe = loaders[0].steps_per_epoch
    total = int(math.floor(args.epochs * spe))
    if args.max_steps:
        total = min(total, args.max_steps)

    from rectok_fast.training.ema import EMA
    ema = EMA(task.model, args.ema_decay)
    if getattr(task, "init_ema_state", None):
        ema.load(task.init_ema_state, strict=False)
    engines = task.engines(args, args.lr, ds_cfg, bf16)
    if args.compile:
        # RECTOK_FAST_COMPILE_BACKEND: a torch.compile backend other than inductor (the tests use
        # aot_eager: it traces the same graphs, custom ops included, without inductor's ~30 s CPU codegen)
        backend = os.environ.get("RECTOK_FAST_COMPILE_BACKEND", "inductor")
        from torch._dynamo.utils import counters as dynamo_counters
        graphs_before = int(dynamo_counters["stats"]["unique_graphs"])
        if use_ds:
            engines[0].engine.compile(backend=backend)
        else:
            engines[0].call = torch.compile(engines[0].module, backend=backend)
        say(f"[rectok_fast] torch.compile ({backend}) of the trained model's forward "
            f"({'DeepSpeed engine.compile()' if use_ds else 'plain torch.compile'})")

    # ---- resume
    ck_root = os.path.join(args.output_dir, "checkpoints")
    start = 0
    bad_total = 0
    if args.resume:
        tag = R.find_resume_tag(ck_root) if rank == 0 else None
        if world > 1:
            obj = [tag]
            torch.distributed.broadcast_object_list(obj, src=0)
            tag = obj[0]
        if tag is None:
            raise RuntimeError(f"--resume: no complete checkpoint in {ck_root}")
        from rectok_fast.checkpoint import safe_torch_load
        folder = os.path.join(ck_root, tag)
        state = safe_torch_load(os.path.join(folder, "trainer.pt"))
        if state["world"] != world or state["emulate_ranks"] != R_emu or state["batch_size"] != args.batch_size:
            raise RuntimeError(f"--resume: checkpoint {tag} was written with world={state['world']} x "
                               f"batch {state['batch_size']} (emulate {state['emulate_ranks']}); this run has "
                               f"world={world} x batch {args.batch_size} (emulate {R_emu}). The data order "
                               f"would differ; resume with the same layout.")
        for e in engines:
            e.load(folder, e.name)
        ema.load(safe_torch_load(os.path.join(folder, "ema.pt")))
        start = int(state["step"])
        bad_total = int(state.get("bad_steps_total", 0))
        if rank == 0:   # the saved count is the all-rank total; the end-of-run all-reduce sums the ranks again
            loaders[0].skipped = int(state.get("skipped", 0))
        say(f"[rectok_fast] resumed from {folder} at step {start}")
    logger = MetricLogger(args.output_dir, enabled=rank == 0, resume=args.resume, start_step=start)
    if rank == 0:
        logger.print(f"[rectok_fast] logging to {logger.backend} + {logger.jsonl_path}; {spe} steps/epoch, "
                     f"{total} steps, global batch {global_batch}, peak lr {args.lr:.3g}")

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    nan_steps = {int(s) for s in os.environ.get("RECTOK_FAST_TEST_NAN_AT_STEPS", "").split(",") if s}
    kill_at = int(os.environ.get("RECTOK_FAST_TEST_KILL_AT_STEP", "-1"))
    bad_run = 0

    current = {"step": start}

    def check_finite(losses):
        """All ranks agree: every micro-batch loss finite on every rank (else all skip the step)."""
        ok = torch.stack([torch.isfinite(l.detach()).all() for l in losses]).all().float().reshape(1)
        if current["step"] in nan_steps:
            ok.zero_()
        all_reduce_(ok, torch.distributed.ReduceOp.MIN if world > 1 else None)
        return bool(ok.item())      # the one sync a step needs: every rank must agree before backward

    def save(step):
        tag = R.tag_for(step)
        folder = os.path.join(ck_root, tag)
        os.makedirs(folder, exist_ok=True)
        barrier()
        for e in engines:
            e.save(folder, e.name)
        states = [_full_state(e, e.module) for e in engines]
        for e in engines:
            e.reset_zero3_trace()
        skipped = all_reduce_(torch.tensor([float(sum(ld.skipped for ld in loaders))]))
        if rank == 0:
            from rectok_fast.checkpoint import atomic_torch_save, export_official_checkpoint
            atomic_torch_save(ema.state_dict(), os.path.join(folder, "ema.pt"))
            atomic_torch_save({"step": step, "epoch": step / spe, "world": world, "emulate_ranks": R_emu,
                               "batch_size": args.batch_size, "bad_steps_total": bad_total,
                               "skipped": int(skipped.item())},
                              os.path.join(folder, "trainer.pt"))
            extra = {"epoch": int(step // spe), "step": step, "args": {k: v for k, v in vars(args).items()
                                                                     if isinstance(v, (int, float, str, bool))}}
            if len(states) > 1 and states[1] is not None:
                extra["discriminator"] = states[1]
            export_official_checkpoint(_StateShim(states[0]), os.path.join(folder, "official.pth"),
                                       ema_model=ema.state_dict(), **extra)
        barrier()
        if rank == 0:
            R.mark_complete(ck_root, tag, {"step": step})
            keep_every = int(args.keep_every_epochs * spe) if args.keep_every_epochs else 0
            R.prune(ck_root, args.keep_last, keep_every)
        barrier()
        return folder

    # ---- loop
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, disable=rank != 0 or args.no_progress, desc=args.stage, unit="step",
               dynamic_ncols=True, file=sys.stdout)
    step = start
    t_last = time.time()
    last_logs = {}
    try:
        while step < total:
            epoch = step // spe
            iters = [ld.epoch(epoch, start_step=step % spe) for ld in loaders]
            for batches in zip(*iters):
                if step >= total:
                    break
                epoch_f = step / spe
                lr = lr_at(args, epoch_f)
                for e in engines:
                    e.set_lr(lr)
                chunks = [dict(b, rank=rank * R_emu + r) for r, b in enumerate(batches)]
                current["step"] = step
                t0 = time.time()
                logs = task.train_step(chunks, step, epoch_f, autocast, ema, check_finite)
                if logs is None:
                    bad_run += 1
                    bad_total += 1
                    for e in engines:
                        e.zero_grad()
                    say(f"[rectok_fast] step {step}: non-finite loss, step skipped "
                        f"({bad_run} in a row, {bad_total} in total)")
                    if bad_run >= args.max_bad_steps:
                        raise TrainingDiverged(
                            f"{bad_run} consecutive steps had a non-finite (NaN/inf) loss (last at step {step}); "
                            f"stopping. Lower the learning rate, check the data, or resume from the last "
                            f"checkpoint in {ck_root} with changed settings.")
                else:
                    bad_run = 0
                step += 1
                bar.update(1)
                if logs is not None and (step % args.log_every == 0 or step == total):
                    logs = {k: float(v) for k, v in logs.items()}   # the GPU sync: only on logged steps
                    dt = time.time() - t0
                    logs.update(lr=lr, epoch=epoch_f, step_time=dt, images_per_s=global_batch / max(dt, 1e-9))
                    if world > 1:   # mean over data-parallel ranks (same steps on every rank)
                        keys = sorted(logs)
                        vals = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
                        all_reduce_(vals)
                        logs = {k: float(v) / world for k, v in zip(keys, vals.tolist())}
                    last_logs = logs
                    logger.log(step, logs)
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
                if args.ckpt_every and step % args.ckpt_every == 0 and step < total:
                    save(step)
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
    folder = save(step)
    skipped = torch.tensor([float(sum(ld.skipped for ld in loaders))])
    all_reduce_(skipped)
    out = {"steps": step, "checkpoint": folder, "last_logs": last_logs, "skipped_images": int(skipped.item()),
           "bad_steps": bad_total}
    if args.compile:
        out["compiled_graphs"] = int(dynamo_counters["stats"]["unique_graphs"]) - graphs_before
        say(f"[rectok_fast] torch.compile: {out['compiled_graphs']} graph(s) compiled")
    grid = os.path.join(args.output_dir, "recon_grid.png" if args.stage != "dit" else "samples_grid.png")
    img = task.final_images(args, ema, grid, rank, engines[0].full_parameters)
    if rank == 0:
        import shutil
        shutil.copyfile(os.path.join(folder, "official.pth"), os.path.join(args.output_dir, "final.pth"))
        plot = plot_losses(args.output_dir)
        logger.print(f"[rectok_fast] done: {step} steps; final official-format weights {args.output_dir}/final.pth; "
                     f"images {img}; loss plot {plot}; metrics {logger.jsonl_path}")
        if out["skipped_images"]:
            warnings.warn(f"{out['skipped_images']} unreadable images were skipped during training "
                          f"(set RECTOK_FAST_DATA_VERBOSE=1 to list them)")
            print(f"[rectok_fast] WARNING: {out['skipped_images']} unreadable images were skipped", flush=True)
        if bad_total:
            print(f"[rectok_fast] WARNING: {bad_total} steps were skipped for non-finite losses", flush=True)
        if task.stand_ins:
            loud("REMINDER: these nets were RANDOM stand-ins: " + "; ".join(task.stand_ins), rank)
    logger.close()
    barrier()
    return out
