"""Stages 'tokenizer' (stage 1) and 'decoder_ft' (stage 2).

One optimizer step (official train_utils.py order): for each micro batch, generator forward + all
losses -> backward; clip + step (skipped by the engine when the global gradient norm is not finite)
-> EMA; then the discriminator on the same (detached) reconstructions -> backward per micro batch ->
clip + step. A non-finite generator norm skips the whole step (no EMA update, no discriminator step).
Each generator micro batch is seeded from (seed, step, its global micro index m); the discriminator
micro batches draw nothing (no augmentation, BatchNorm on the micro batch's own statistics), so every
micro batch computes the same on any world size.
"""
from __future__ import annotations

import torch

from rectok_fast.training.stages.base import Stage, StepOutcome, is_finite, mean_logs, micro_index, seed_step


def build_perceptual(loss_cfg, weights, note=None):
    """LPIPS-VGG (+ ConvNeXt-S logits) from the local files of ``weights`` (random stand-ins, loudly,
    without); ``note(net, path)`` records what each net loaded."""
    from rectok_fast.models.perceptual import LPIPS, PerceptualLoss, build_convnext_small
    note = note or (lambda net, path: None)
    lp = None
    if loss_cfg.lpips:
        lp = LPIPS(weights.vgg, weights.lpips)
        note("LPIPS VGG16 trunk", weights.vgg)
        note("LPIPS lin heads", weights.lpips)
    cn = None
    if loss_cfg.convnext:
        cn = build_convnext_small(weights.convnext)
        note("ConvNeXt-S", weights.convnext)
    if lp is None and cn is None:
        return None     # no perceptual term at all
    return PerceptualLoss(lp, cn, convnext_size=loss_cfg.convnext_size)


def build_tokenizer_loss(stage: str, loss_cfg, weights, note=None):
    """The stage's RecTokLoss with the perceptual nets from ``weights`` and a fresh PatchGAN; only the
    discriminator trains (the perceptual nets stay frozen, outside any engine)."""
    from rectok_fast.losses import build_rectok_loss
    from rectok_fast.models.discriminator import NLayerDiscriminator
    disc = NLayerDiscriminator(ndf=loss_cfg.disc_ndf, n_layers=loss_cfg.disc_layers)
    loss = build_rectok_loss(stage, perceptual=build_perceptual(loss_cfg, weights, note), discriminator=disc,
                             disc_start_epoch=loss_cfg.disc_start_epoch,
                             disc_weight=0.1 if loss_cfg.use_gan else 0.0)
    loss.requires_grad_(False)
    loss.discriminator.requires_grad_(True)
    return loss


class TokenizerStage(Stage):
    name = "tokenizer"

    def build(self):
        from rectok_fast.models import registry
        from rectok_fast.training.ema import EMA
        cfg, dev = self.cfg, self.device
        self.model = cfg.model.build().to(dev)
        init_ema = self._load_initial()
        self._before_teachers()
        if self.model.use_sem:
            for kind in self.model.config.teachers:
                teacher = registry.build_teacher_for(cfg.model.variant, cfg.weights.teacher, cfg.data.img_size, kind)
                self.note(f"teacher {kind}", cfg.weights.teacher)
                self.model.attach_teacher(kind, teacher.to(dev))
        self.loss = build_tokenizer_loss(cfg.stage, cfg.loss, cfg.weights, self.note).to(dev)
        self.use_gan = cfg.loss.use_gan
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        if init_ema is not None:
            self.ema.load(init_ema, strict=False)
        return self

    def _load_initial(self):
        """--load_from: 'model' into the model; returns its 'model_ema' (the EMA's start) if any."""
        path = self.cfg.weights.load_from
        if not path:
            return None
        from rectok_fast.checkpoint import load_variant_weights, safe_torch_load
        ckpt = safe_torch_load(path)
        load_variant_weights(ckpt, self.model, "model", path, flag="--model")
        self.note("initial weights (--load_from)", path)
        ema = ckpt.get("model_ema")
        return dict(ema) if isinstance(ema, dict) else None

    def _before_teachers(self):
        """Hook for stage 2 (freeze the encoder)."""

    def engines(self):
        self.G = self._engine(self.model, "G")
        self.model = self.G.module
        self.D = None
        if self.use_gan:
            # D runs inside the fp32 loss module (autocast off, as officially): never bf16. The loss
            # module calls the raw D module (G's backward must not trigger D's engine hooks).
            self.D = self._engine(self.loss.discriminator, "D", bf16=False)
        self.engine_list = [e for e in (self.G, self.D) if e is not None]
        return self.engine_list

    # ---- one optimizer step -----------------------------------------------------------------------
    def train_step(self, chunks, step, epoch, hooks=None):
        n = len(chunks)
        g_logs, kept = [], []
        for i, c in enumerate(chunks):
            seed_step(self.cfg.seed, step, micro_index(c, i))
            images = c["images"].to(self.device, non_blocking=True)
            # the mask-ratio draw (Python random) stays on the host so a compiled forward has no graph break
            len_keep = self.model.encoder.draw_len_keep()
            with self.ctx.autocast():
                out = self.G.call(images, len_keep)
            loss, logs = self.loss.generator_loss(images, out, epoch)
            if hooks is not None:
                loss = hooks.loss(step, "generator", loss)
            self.G.backward(loss / n)
            g_logs.append(logs)
            kept.append((images, out.recon.detach()))
        gnorm = self.G.step()
        logs = mean_logs(g_logs)
        logs["loss"] = logs.pop("total_loss")
        logs["grad_norm"] = gnorm
        if not is_finite(gnorm):
            return StepOutcome(logs, ("generator",))
        self.ema.update_from(self.G)     # the fp32 values the optimizer updates (gathered under ZeRO-3)
        skipped = ()
        if self.D is not None and self.loss.gan_active(epoch):
            d_logs = []
            for images, recon in kept:
                d_loss, dl = self.loss.discriminator_loss(images, recon, epoch)
                if hooks is not None:
                    d_loss = hooks.loss(step, "discriminator", d_loss)
                self.D.backward(d_loss / n)
                d_logs.append(dl)
            logs["d_grad_norm"] = self.D.step()
            logs.update(mean_logs(d_logs))
            if not is_finite(logs["d_grad_norm"]):
                skipped = ("discriminator",)
        return StepOutcome(logs, skipped)

    # ---- outputs ----------------------------------------------------------------------------------
    def _grid_images(self):
        """8 validation images (the demo's held-out crops, or --val_path/--val_list), else the first 8
        training images, through the training preprocessing (unflipped, epoch 0)."""
        from rectok_fast.data import PlanDataset, build_source, collate
        from rectok_fast.training.evaluation import validation_images
        val = validation_images(self.cfg, 8)
        if val is not None:
            self.grid_source = "held-out"
            return (val.float() / 127.5 - 1.0).to(self.device)
        self.grid_source = "training"
        d = self.cfg.data
        src = build_source(d.data_path, d.file_list, d.listing_cache_dir, self.ctx.rank)
        ds = PlanDataset(src, d.img_size, range(min(8, len(src))), d.seed, 0, flip="none")
        return collate([ds[j] for j in range(len(ds))])["images"].to(self.device)

    def ema_model(self):
        """A decode-only copy of the model holding the EMA weights (for the grid and evaluation)."""
        from rectok_fast.models import registry
        m = registry.build_model(registry.decode_only_name(self.cfg.model.variant), **self.cfg.model.overrides)
        sd = {k: v for k, v in self.ema.shadow.items() if not k.startswith("sem_decoders.")}
        m.load_state_dict(sd, strict=False)
        return m.to(self.device).eval()

    @torch.no_grad()
    def final_images(self, path):
        from rectok_fast.training.logging import save_image_grid
        x = self._grid_images() if self.ctx.rank == 0 else None  # the other ranks only join the ZeRO-3 gather
        with self.G.full_parameters():
            if self.ctx.rank != 0:
                return None
            self.model.eval()
            raw = self.model.reconstruct(x.to(next(self.model.parameters()).dtype)).float()
            self.model.train()
        rec_ema = self.ema_model().reconstruct(x).float()
        return save_image_grid([x * 0.5 + 0.5, raw, rec_ema], path,
                               labels=[f"{self.grid_source} input", "recon", "EMA recon"])


class DecoderFTStage(TokenizerStage):
    """Stage 2: the decode-only variant from a stage-1 file; only the decoder trains (the frozen
    encoder keeps sampling the posterior); a fresh discriminator from step 0; the official EMA quirk
    (the EMA starts from the stage-1 EMA, frozen parameters are copied from the model)."""
    name = "decoder_ft"

    def _load_initial(self):
        if not self.cfg.weights.load_from:
            self.note("stage-1 tokenizer (--load_from)", None)
            return None
        ema = super()._load_initial()
        self.pretrained[-1] = ("stage-1 tokenizer (--load_from)", self.cfg.weights.load_from)
        return ema

    def _before_teachers(self):
        self.model.freeze_everything_but_decoder()
