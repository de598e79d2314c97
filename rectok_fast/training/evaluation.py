"""Evaluation during training (tokenizer stages): reconstruction quality on a small validation set.

The validation set is ``--val_path``/``--val_list`` (the first ``--val_images`` images through the
training preprocessing, unflipped) or, for the demo source, fixed crops of the held-out demo photos
(:func:`rectok_fast.demo_data.heldout_crops`, never trained on). Every ``--eval_every_epochs`` and at
the last step, :class:`PeriodicEvaluator` measures the EMA model (what ``model_ema`` exports and the
later stages use) and the raw model with :func:`rectok_fast.evaluate.evaluate_reconstruction` -- PSNR
and SSIM on uint8-rounded images, rFID when ``--inception_weights`` is given -- on rank 0 only, with a
fixed batch, so the numbers do not depend on the number of ranks.
"""
from __future__ import annotations

import torch

VAL_BATCH = 16          # images per reconstruction batch


def validation_images(cfg, n: int | None = None) -> torch.Tensor | None:
    """(N, 3, H, W) uint8 validation images of the run (None: the run has no validation set).

    ``n`` caps the count below ``--val_images`` (the grid takes 8)."""
    from rectok_fast.evaluation.image_metrics import pm1_to_uint8
    e, d = cfg.evaluation, cfg.data
    cap = e.val_images if n is None else min(n, e.val_images)
    if e.val_path or e.val_list:
        from rectok_fast.data import PlanDataset, build_source, collate
        src = build_source(e.val_path, e.val_list, d.listing_cache_dir, 0)
        ds = PlanDataset(src, d.img_size, range(min(cap, len(src))), d.seed, 0, flip="none")
        images = collate([ds[j] for j in range(len(ds))])["images"]
    elif d.data_path is None and d.file_list is None:
        from rectok_fast.demo_data import heldout_crops
        images = heldout_crops(d.img_size, cap)
    else:
        return None
    return pm1_to_uint8(images)


class PeriodicEvaluator:
    """``evaluator.due(step)`` / ``evaluator.evaluate(stage)`` from the run loop (collective under
    ZeRO-3: every rank calls evaluate; rank 0 returns the metrics, the others None)."""

    def __init__(self, cfg, ctx, steps_per_epoch: int, total_steps: int):
        self.cfg, self.ctx, self.total = cfg, ctx, total_steps
        e = cfg.evaluation
        self.every = max(1, round(e.every_epochs * steps_per_epoch)) if e.every_epochs > 0 else 0
        self.enabled = bool(self.every) and cfg.stage != "dit"
        self.images = self.inception = None
        if self.enabled and ctx.rank == 0:
            self.images = validation_images(cfg)
            if e.inception_weights:
                from rectok_fast.evaluation.fidelity import load_inception
                self.inception = load_inception(e.inception_weights, ctx.device)

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.every == 0 or step == self.total)

    def _batches(self):
        return [self.images[i:i + VAL_BATCH] for i in range(0, self.num_images, VAL_BATCH)]

    @torch.no_grad()
    def evaluate(self, stage) -> dict | None:
        from rectok_fast.evaluate import evaluate_reconstruction
        rank0 = self.ctx.rank == 0
        out = None
        with stage.G.full_parameters():      # the raw model (gathered under ZeRO-3; all ranks join)
            if rank0:
                raw = evaluate_reconstruction(stage.model, self._batches(), autocast=self.ctx.bf16, gather=False)
        if rank0:
            ema = evaluate_reconstruction(stage.ema_model(), self._batches(), self.inception,
                                          autocast=self.ctx.bf16, gather=False)
            out = {"val_psnr": ema["psnr"], "val_ssim": ema["ssim"], "val_psnr_raw": raw["psnr"],
                   "val_ssim_raw": raw["ssim"]}
            if ema.get("rfid") is not None:
                out["val_rfid"] = ema["rfid"]
        return out


def describe(metrics: dict, num_images: int) -> str:
    """One line for the console: 'held-out PSNR 21.3 dB, SSIM 0.712 (EMA; raw 20.9 dB) on 16 images'."""
    s = f"PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.3f}"
    if "val_rfid" in metrics:
        s += f", rFID {metrics['val_rfid']:.2f}"
    return s + f" (EMA model; raw model PSNR {metrics['val_psnr_raw']:.2f} dB) on {num_images} validation images"
