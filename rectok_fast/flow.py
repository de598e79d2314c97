"""Noise levels, flow noise and transport for RecTok.

Two time conventions live in this project; every name says which one it uses:

* **tokenizer noise level ``tau``** (``TAU_IS_NOISE``): tau = 0 is the clean latent, tau = 1 pure
  noise. The tokenizer trains on ``z_tau = (1 - tau) * z + tau * gamma * eps``.
* **DiT transport time ``t``** (``T_IS_DATA``): t = 0 is noise, t = 1 is data,
  ``x_t = t * x1 + (1 - t) * x0``; velocity target ``u = x1 - x0``.

The shifted schedules map a uniform ``u`` through ``s * u / (1 + (s - 1) * u)`` with
``s = sqrt(h * w * C / 4096)`` (the official code; the project page writes the inverse).
"""
from __future__ import annotations

import math

import torch

TAU_IS_NOISE = "tokenizer: tau = 1 is pure noise"
T_IS_DATA = "DiT transport: t = 1 is data"

NOISE_SCHEDULES = ("shift", "lognorm", "uniform")


def timestep_shift(h: int, w: int, channels: int) -> float:
    """s = sqrt(h * w * C / 4096); sqrt(8) ~ 2.83 for 16 x 16 tokens of 128 channels."""
    return math.sqrt(h * w * channels / 4096.0)


def shift_noise_level(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The shifted map s*u / (1 + (s-1)*u): pushes uniform u towards 1."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_tokenizer_noise_level(batch: int, schedule: str = "shift", shift: float = 1.0,
                                 device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample tokenizer noise level tau (B,) in fp32, tau = 1 meaning pure noise (rectok.py:905-924).

    'shift': tau = s*u/(1+(s-1)u), u ~ U(0,1); 'lognorm': tau = sigmoid(n), n ~ N(0,1); 'uniform': tau ~ U(0,1).
    """
    if schedule == "shift":
        u = torch.rand(batch, device=device, generator=generator)
        return shift_noise_level(u, shift)
    if schedule == "lognorm":
        return torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    if schedule == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {NOISE_SCHEDULES}")
