"""Per-image reconstruction metrics: PSNR and SSIM on uint8 images, LPIPS from local weights.

Images are compared as the uint8 pictures that are written and shown to Inception: the
reconstruction in [0, 1] becomes ``trunc(255 x)`` like the official evaluation's PNGs. PSNR is
per image, ``10 log10(255^2 / MSE)``, averaged over images (the official averaging). SSIM follows
scikit-image's ``structural_similarity(a, b, channel_axis=-1, data_range=255)`` defaults: a 7x7
uniform window, sample covariance, K1 = 0.01, K2 = 0.03, the mean over the valid region of each
channel, then over channels; it runs in float64 on the images' device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_MAX_DB = 100.0     # identical images: MSE 0 would be +inf, which JSON cannot hold
SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] float (B, 3, H, W) -> uint8 (B, 3, H, W) by truncation, as the official evaluation saves PNGs."""
    return (images01.float().clamp(0, 1) * 255).to(torch.uint8)


def pm1_to_uint8(images_pm1: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images decoded from uint8 files back to the exact uint8 values (round, not truncate)."""
    return ((images_pm1.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"image batches must both be (B, C, H, W) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != torch.uint8 or b.dtype != torch.uint8:
        raise TypeError(f"PSNR/SSIM take uint8 images, got {a.dtype} and {b.dtype}")


def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) float64 PSNR in dB of uint8 (B, C, H, W) pairs, capped at PSNR_MAX_DB."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    floor = 255.0 ** 2 * 10 ** (-PSNR_MAX_DB / 10)
    return 10.0 * torch.log10(255.0 ** 2 / mse.clamp_min(floor))


def psnr_float(original01: torch.Tensor, recon01: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR of float images in [0, 1] (the official training-log formula, before quantization)."""
    mse = (original01.double() - recon01.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-PSNR_MAX_DB / 10)))


def ssim_uint8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) float64 SSIM of uint8 (B, C, H, W) pairs (scikit-image's default definition, see the module doc)."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    x, y = a.double(), b.double()
    n, c = x.shape[:2]
    x, y = x.reshape(n * c, 1, *x.shape[2:]), y.reshape(n * c, 1, *y.shape[2:])

    def mean(t):        # uniform window, valid positions only (= scikit-image's map cropped by 3 pixels)
        return F.avg_pool2d(t, SSIM_WINDOW, stride=1)

    ux, uy = mean(x), mean(y)
    np_ = SSIM_WINDOW ** 2
    cov_norm = np_ / (np_ - 1.0)
    vx = cov_norm * (mean(x * x) - ux * ux)
    vy = cov_norm * (mean(y * y) - uy * uy)
    vxy = cov_norm * (mean(x * y) - ux * uy)
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(n, c, -1).mean(-1).mean(-1)


def load_lpips(vgg_weights, lin_weights, device="cpu"):
    """LPIPS-VGG from local files only (a torchvision vgg16 state dict and the LPIPS ``vgg.pth`` heads);
    both are required here: random stand-ins would give meaningless numbers."""
    from rectok_fast.evaluation.fidelity import EvalError
    from rectok_fast.models.perceptual import LPIPS
    if not vgg_weights or not lin_weights:
        raise EvalError("LPIPS needs both --lpips_vgg_weights (torchvision vgg16 state dict) and "
                        "--lpips_lin_weights (the lpips package's weights/v0.1/vgg.pth)")
    return LPIPS(vgg_weights=vgg_weights, lin_weights=lin_weights).to(device).eval()


@torch.no_grad()
def lpips_uint8(lpips, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) LPIPS distance of uint8 pairs (mapped to [-1, 1] as LPIPS expects)."""
    _check_pair(a, b)
    dev = next(lpips.parameters()).device
    to_pm1 = lambda t: t.to(dev).float() / 127.5 - 1.0  # noqa: E731
    return lpips(to_pm1(a), to_pm1(b)).flatten().double().cpu()


def mean_finite(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan
