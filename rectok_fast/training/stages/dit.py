"""Stage 'dit': DiT^DH (or the AutoGuidance model) on normalized latents of a frozen decode-only tokenizer.

One optimizer step: for each micro batch, latents (online, no grad, or from the latent cache) ->
flow-matching loss -> backward; clip + step (skipped by the engine on a non-finite gradient norm) -> EMA.
"""
from __future__ import annotations

import os

import torch

from rectok_fast.training.stages.base import Stage, StepOutcome, is_finite, micro_index, seed_step


class DiTStage(Stage):
    name = "dit"

    def build(self):
        from rectok_fast.flow import dit_time_shift
        from rectok_fast.training.ema import EMA
        cfg, dev = self.cfg, self.device
        self.tok = self._tokenizer().to(dev).eval().requires_grad_(False)
        self.shift = dit_time_shift(self.tok.seq_h, self.tok.seq_w, self.tok.token_channels)
        self.model = cfg.model.build().to(dev)
        if cfg.weights.load_from:
            from rectok_fast.checkpoint import load_variant_weights, safe_torch_load
            load_variant_weights(safe_torch_load(cfg.weights.load_from), self.model, "model", cfg.weights.load_from,
                                 flag="--model")
            self.note("initial DiT weights (--load_from)", cfg.weights.load_from)
        self.cache = self._latent_cache()
        self._latent_stats()
        self.ema = EMA(self.model, cfg.optim.ema_decay)
        return self

    def _tokenizer(self):
        path = self.cfg.weights.tokenizer_ckpt
        tok = self.cfg.model.build_tokenizer()
        if path:
            from rectok_fast.checkpoint import load_variant_weights, safe_torch_load
            load_variant_weights(safe_torch_load(path), tok, "model_ema", path, flag="--tokenizer")
        self.note("tokenizer (--tokenizer_ckpt)", path)
        return tok

    def _source(self):
        from rectok_fast.data import build_source
        d = self.cfg.data
        return build_source(d.data_path, d.file_list, d.listing_cache_dir, self.ctx.rank)

    def _latent_cache(self):
        """The cache of posterior moments (built, or finished, first when needed; a stale one is refused)."""
        lat, d = self.cfg.latents, self.cfg.data
        if not lat.cache:
            return None
        from rectok_fast.training.latent_cache import cache_complete, prepare_latent_cache
        if not cache_complete(lat.cache):
            self.ctx.say(f"[rectok_fast] building the latent cache in {lat.cache} (both flips)")
        return prepare_latent_cache(lat.cache, self.tok, self._source(), d.img_size, self.ctx.rank, self.ctx.world,
                                    d.batch_size, self.device, lat.cache_dtype, d.seed, d.num_workers,
                                    autocast=self.device.type == "cuda", progress=self.cfg.runtime.progress,
                                    barrier=self.ctx.barrier, tokenizer_id=self.cfg.weights.tokenizer_ckpt or "")

    def _latent_stats(self):
        """Per-channel stats: --latent_stats > the tokenizer checkpoint's sidecar > one streaming fp64 pass
        (over the cache, or encoding now) on --stats_images images spread over the classes (default all),
        sharded over the ranks and all-reduced."""
        from rectok_fast.latent_stats import (latent_stats_from_cache, latent_stats_online, latent_stats_path,
                                              latent_stats_sample, load_latent_stats, save_latent_stats)
        lat, d, ctx = self.cfg.latents, self.cfg.data, self.ctx
        ckpt = self.cfg.weights.tokenizer_ckpt
        path = lat.stats
        if path is None and ckpt and os.path.exists(latent_stats_path(ckpt)):
            path = latent_stats_path(ckpt)
        count = 0
        if path:
            mean, std = load_latent_stats(path)
        elif self.cache is not None:
            idx = latent_stats_sample(self.cache.labels_np, lat.stats_images, d.seed)
            mean, std, count = latent_stats_from_cache(self.cache, self.tok.token_channels, idx, ctx.rank, ctx.world)
        else:
            src = self._source()
            idx = latent_stats_sample(src.labels, lat.stats_images, d.seed)
            mean, std, count = latent_stats_online(self.tok, src, d.img_size, idx, ctx.rank, ctx.world, d.batch_size,
                                                   self.device, d.num_workers, autocast=self.device.type == "cuda",
                                                   seed=d.seed)
        self.tok.set_latent_stats(mean, std)
        self.latent_mean, self.latent_std = mean.float().cpu(), std.float().cpu()
        if ctx.rank == 0:
            os.makedirs(self.cfg.output_dir, exist_ok=True)
            save_latent_stats(os.path.join(self.cfg.output_dir, "latent_stats.pt"), mean, std, count)

    def engines(self):
        self.G = self._engine(self.model, "G")
        self.model = self.G.module
        self.engine_list = [self.G]
        return self.engine_list

    def loaders(self, ranks, data_parallel):
        if self.cache is None:
            loaders = super().loaders(ranks, data_parallel)
            classes = loaders[0].source.num_classes
        else:
            from rectok_fast.training.latent_cache import CacheLoader
            d = self.cfg.data
            loaders = [CacheLoader(self.cache, d.batch_size, r, data_parallel, d.seed, drop_last=d.drop_last,
                                   num_workers=d.num_workers, prefetch=d.prefetch) for r in ranks]
            classes = int(self.cache.labels.max().item()) + 1
        if classes > self.cfg.model.num_classes:
            raise ValueError(f"the data has {classes} classes but the DiT has --num_classes {self.cfg.model.num_classes}")
        return loaders

    # ---- one optimizer step -----------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, chunk):
        if "moments" in chunk:
            m = chunk["moments"].to(self.device)
        else:
            with self.ctx.autocast():
                m = self.tok.encode_moments(chunk["images"].to(self.device, non_blocking=True))
        return self.tok.latents_from_moments(m.float(), sample=True)

    def train_step(self, chunks, step, epoch, hooks=None):
        from rectok_fast.flow import dit_training_loss
        n = len(chunks)
        total = 0.0
        for i, c in enumerate(chunks):
            seed_step(self.cfg.seed, step, micro_index(c, i))
            x1 = self.latents(c)
            y = c["labels"].to(self.device)
            with self.ctx.autocast():
                loss = dit_training_loss(self.G.call, x1, y, self.shift)
            if hooks is not None:
                loss = hooks.loss(step, "generator", loss)
            self.G.backward(loss / n)
            total = total + loss.detach().float()
        gnorm = self.G.step()
        logs = {"loss": total / n, "grad_norm": gnorm}
        if not is_finite(gnorm):
            return StepOutcome(logs, ("generator",))
        self.ema.update_from(self.G)     # the fp32 values the optimizer updates (gathered under ZeRO-3)
        return StepOutcome(logs)

    # ---- outputs ----------------------------------------------------------------------------------
    def describe(self):
        out = super().describe()
        m = self.cfg.model
        out["latent_stats"] = {"mean": self.latent_mean, "std": self.latent_std}
        out["tokenizer"] = {"variant": m.tokenizer, "overrides": dict(m.tokenizer_overrides),
                            "checkpoint": os.path.abspath(self.cfg.weights.tokenizer_ckpt)
                            if self.cfg.weights.tokenizer_ckpt else None}
        return out

    def ema_model(self):
        m = self.cfg.model.build().to(self.device)
        self.ema.copy_to(m)
        return m.eval()

    @torch.no_grad()
    def final_images(self, path):
        if self.ctx.rank != 0:
            return None
        from rectok_fast.flow import sample_latents
        from rectok_fast.training.logging import save_image_grid
        labels = torch.arange(8, device=self.device) % self.cfg.model.num_classes
        z = sample_latents(self.ema_model(), labels, num_steps=self.cfg.model.sample_steps, shift=self.shift,
                           generator=torch.Generator(self.device).manual_seed(self.cfg.seed))
        return save_image_grid([self.tok.detokenize(z)], path)
