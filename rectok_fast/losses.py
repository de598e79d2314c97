"""Stage-1 / stage-2 tokenizer objectives with the official EFFECTIVE weights (spec sections 3, 4).

Generator: L = w_rec*MSE01/exp(logvar) + w_p*Perc + w_kl*sum_b KL_b/B + w_sem*L_sem + w_g*1[epoch>=start]*(-mean D(x̂))
with w_rec 1, w_p 1 (Perc = (LPIPS + 0.1*ConvNeXt)/1.1), w_kl 1e-6, w_sem 1, w_g 0.1 (the scripts'
0.5 is never forwarded), start epoch 100. Discriminator: hinge, same start epoch. Images enter in
[-1, 1] and are mapped to [0, 1] (reconstructions NOT clamped); everything runs in fp32 with autocast off.
The semantic cosine loss goes through :func:`rectok_fast.ops.cosine_distill_loss`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from rectok_fast import ops
from rectok_fast.models.discriminator import NLayerDiscriminator
from rectok_fast.models.tokenizer import SEM_TARGETS, gather_tokens

RECONSTRUCTION_LOSSES = ("l2", "l1", "l2+l1")

STAGE_DEFAULTS = {
    # stage 1 (run_train_tokenizer.sh)
    "tokenizer": dict(kl_weight=1e-6, sem_weight=1.0, disc_start_epoch=100),
    # stage 2 (run_decoder_finetune_tokenizer.sh): no KL, no semantics, GAN from epoch 0
    "decoder_ft": dict(kl_weight=0.0, sem_weight=0.0, disc_start_epoch=0),
}


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _no_autocast(device: torch.device):
    """The official loss module disables CUDA autocast; do the same on whatever device we run."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


class RecTokLoss(nn.Module):
    """Tokenizer losses; owns the PatchGAN discriminator (the only trainable part) and a frozen
    ``logvar`` (0) so that ``state_dict`` carries the official ``discriminator.*`` and ``logvar`` keys.

    ``perceptual``: a module ``(x01, y01) -> scalar`` (see :func:`rectok_fast.models.perceptual.build_perceptual_loss`)
    or None to drop the term. ``sem_target`` None = use the tokenizer's mode (``out.sem_mode``).
    """

    def __init__(self, perceptual: nn.Module | None = None, discriminator: nn.Module | None = None, *,
                 reconstruction_loss: str = "l2", rec_weight: float = 1.0, perceptual_weight: float = 1.0,
                 kl_weight: float = 1e-6, sem_weight: float = 1.0, sem_target: str | None = None,
                 disc_weight: float = 0.1, disc_start_epoch: int = 100, logvar_init: float = 0.0):
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction_loss={reconstruction_loss!r}; choose one of {RECONSTRUCTION_LOSSES}")
        if sem_target is not None and sem_target not in SEM_TARGETS:
            raise ValueError(f"sem_target={sem_target!r}; choose one of {SEM_TARGETS}")
        self.perceptual_loss = perceptual
        self.discriminator = discriminator if discriminator is not None else NLayerDiscriminator()
        self.reconstruction_loss = reconstruction_loss
        self.rec_weight, self.perceptual_weight, self.kl_weight = rec_weight, perceptual_weight, kl_weight
        self.sem_weight, self.sem_target = sem_weight, sem_target
        self.disc_weight, self.disc_start_epoch = disc_weight, disc_start_epoch
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)), requires_grad=False)

    # ---- pieces (each usable alone, and each a test target) ----------------------------------

    @staticmethod
    def to01(x: torch.Tensor) -> torch.Tensor:
        return x.float() * 0.5 + 0.5

    def gan_active(self, epoch: float) -> bool:
        return epoch >= self.disc_start_epoch

    def pixel_loss(self, x01: torch.Tensor, r01: torch.Tensor) -> torch.Tensor:
        if self.reconstruction_loss == "l2":
            loss = F.mse_loss(x01, r01)
        elif self.reconstruction_loss == "l1":
            loss = F.l1_loss(x01, r01)
        else:
            loss = 0.5 * (F.mse_loss(x01, r01) + F.l1_loss(x01, r01))
        return self.rec_weight * loss / torch.exp(self.logvar)

    @staticmethod
    def kl_loss(kl_per_sample: torch.Tensor) -> torch.Tensor:
        return kl_per_sample.float().sum() / kl_per_sample.shape[0]

    def sem_loss(self, out) -> torch.Tensor:
        """Mean over teachers of the cosine loss; 'reconstruction' scores masked tokens only (zero loss,
        still connected to the prediction, when nothing is masked)."""
        if not out.sem_pred:
            return torch.zeros((), device=out.recon.device)
        mode = self.sem_target or getattr(out, "sem_mode", "rec+align")
        picked = getattr(out, "sem_picked", False)
        if picked and mode != "reconstruction":
            raise ValueError(f"sem_target={mode!r} scores every token, but the tokenizer projected only the masked "
                             "ones (its sem_target is 'reconstruction'); use the same mode in both")
        losses = []
        for name, pred in out.sem_pred.items():
            target = out.sem_target[name]
            ids = None
            if mode == "reconstruction":
                ids = out.ids_masked
                if ids is None:   # no masking this step: M = 0
                    ids = torch.zeros(pred.shape[0], 0, dtype=torch.long, device=pred.device)
                if not picked:    # the decoder predicted every token: score the masked rows
                    pred = gather_tokens(pred, ids)
            losses.append(ops.cosine_distill_loss(pred, target, ids))
        return torch.stack(losses).mean()

    def _set_disc_grad(self, flag: bool) -> None:
        for p in self.discriminator.parameters():
            p.requires_grad_(flag)

    # ---- objectives ----------------------------------------------------------------------------

    def generator_loss(self, images: torch.Tensor, out, epoch: float):
        """Total generator loss and detached logs. ``images`` in [-1, 1]; ``out`` a TokenizerOutput."""
        if images.shape != out.recon.shape:
            raise ValueError(f"images {tuple(images.shape)} and reconstructions {tuple(out.recon.shape)} differ")
        with _no_autocast(images.device):
            x01, r01 = self.to01(images).contiguous(), self.to01(out.recon).contiguous()
            zero = torch.zeros((), device=images.device)
            rec = self.pixel_loss(x01, r01)
            perc = (self.perceptual_loss(x01, r01).mean()
                    if self.perceptual_loss is not None and self.perceptual_weight > 0 else zero)
            kl = self.kl_loss(out.kl) if self.kl_weight > 0 else zero
            sem = self.sem_loss(out) if self.sem_weight > 0 else zero
            factor = 1.0 if self.gan_active(epoch) else 0.0
            gan = zero
            if factor > 0 and self.disc_weight > 0:
                self._set_disc_grad(False)   # G step must not write D gradients
                gan = -self.discriminator(r01).mean()
            total = (rec + self.perceptual_weight * perc + self.kl_weight * kl + self.sem_weight * sem
                     + self.disc_weight * factor * gan)
        logs = {
            "total_loss": total.detach(),
            "reconstruction_loss": rec.detach(),
            "perceptual_loss": (self.perceptual_weight * perc).detach(),
            "kl_loss": (self.kl_weight * kl).detach(),
            "kl_raw": kl.detach(),
            "sem_loss": (self.sem_weight * sem).detach(),
            "sem_raw": sem.detach(),
            "gan_loss": gan.detach(),
            "weighted_gan_loss": (self.disc_weight * factor * gan).detach(),
            "discriminator_factor": factor,
            # batch PSNR on [0, 1] images from the raw MSE, so it does not depend on the loss kind or weight
            "psnr": -10 * torch.log10(F.mse_loss(x01.detach(), r01.detach())),
        }
        return total, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor, epoch: float):
        """Hinge loss on D(x) vs D(x̂.detach()), times 1[epoch >= start]. Both inputs in [-1, 1]."""
        if images.shape != recon.shape:
            raise ValueError(f"images {tuple(images.shape)} and reconstructions {tuple(recon.shape)} differ")
        with _no_autocast(images.device):
            self._set_disc_grad(True)
            factor = 1.0 if self.gan_active(epoch) else 0.0
            logits_real = self.discriminator(self.to01(images).detach())
            logits_fake = self.discriminator(self.to01(recon).detach())
            loss = factor * hinge_d_loss(logits_real, logits_fake)
        logs = {"discriminator_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
        return loss, logs


def build_rectok_loss(stage: str = "tokenizer", *, vgg_weights: str | None = None,
                      lpips_lin_weights: str | None = None, convnext_weights: str | None = None,
                      perceptual: nn.Module | None | str = "build", **overrides) -> RecTokLoss:
    """Official loss for ``stage`` ('tokenizer' or 'decoder_ft'). ``perceptual='build'`` builds LPIPS-VGG +
    ConvNeXt-S from the given local files (random stand-ins, loudly, without); pass a module to use a
    small stand-in, or None to drop the term."""
    if stage not in STAGE_DEFAULTS:
        raise ValueError(f"stage={stage!r}; choose one of {tuple(STAGE_DEFAULTS)}")
    if isinstance(perceptual, str):
        if perceptual != "build":
            raise ValueError("perceptual must be 'build', a module, or None")
        from rectok_fast.models.perceptual import build_perceptual_loss
        perceptual = build_perceptual_loss(vgg_weights, lpips_lin_weights, convnext_weights)
    kwargs = dict(STAGE_DEFAULTS[stage])
    kwargs.update(overrides)
    return RecTokLoss(perceptual, **kwargs)
