"""Noise levels, flow noise and transport for RecTok.

Two time conventions live in this project; every name says which one it uses:

* **tokenizer noise level ``tau``** (``TAU_IS_NOISE``): tau = 0 is the clean latent, tau = 1 pure
  noise. The tokenizer trains on ``z_tau = (1 - tau) * z + tau * gamma * eps``.
* **DiT transport time ``t``** (``T_IS_DATA``): t = 0 is noise, t = 1 is data,
  ``x_t = t * x1 + (1 - t) * x0``; velocity target ``u = x1 - x0``.

The shifted schedules map a uniform ``u`` through ``s * u / (1 + (s - 1) * u)`` with
``s = sqrt(h * w * C / 4096)`` (the official code; the project page writes the inverse).

Contents: tokenizer noise levels; the DiT transport (``sample_dit_time``, ``transport_path``,
``dit_training_loss``); the Euler ODE sampler with CFG / AutoGuidance (``euler_time_grid``,
``sample_latents``). Interpolation goes through :func:`rectok_fast.ops.flow_interpolate` so the fused
kernel serves both conventions.
"""
from __future__ import annotations

import math

import torch

from rectok_fast import ops

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


# ----------------------------------------------------------------------------------------------------
# DiT transport (T_IS_DATA: t = 0 is noise x0, t = 1 is the data latent x1)


def dit_time_shift(h: int, w: int, channels: int) -> float:
    """The DiT transport's time shift s = sqrt(h * w * C / 4096) (DDT.py; 2.83 for 16x16x128)."""
    return timestep_shift(h, w, channels)


def shift_dit_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """T_IS_DATA: t = 1 - s*u/(1+(s-1)u). For s > 1 this skews t towards 0, i.e. towards NOISE."""
    return 1.0 - shift_noise_level(u, shift)


def sample_dit_time(batch: int, shift: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times t (B,) fp32 in the DiT convention (T_IS_DATA), u ~ U(0,1) shifted (transport.py)."""
    u = torch.rand(batch, device=device, generator=generator)
    return shift_dit_time(u, shift)


def transport_path(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor):
    """T_IS_DATA linear path: x_t = t*x1 + (1-t)*x0 and velocity target u = x1 - x0.

    Goes through :func:`rectok_fast.ops.flow_interpolate`, whose convention is "mix the first argument
    towards the second by t": passing (noise x0, data x1, t) gives exactly the DiT path and target.
    """
    return ops.flow_interpolate(x0, x1, t, return_velocity=True)


def velocity_mse(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Official velocity loss: mean over (C, H, W) of (v - u)^2 per sample, then mean over the batch (fp32)."""
    if v.shape != u.shape:
        raise ValueError(f"model output {tuple(v.shape)} and velocity target {tuple(u.shape)} differ in shape")
    return (v.float() - u.float()).pow(2).flatten(1).mean(1).mean()


def dit_training_loss(model, x1: torch.Tensor, y: torch.Tensor, shift: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One flow-matching loss on data latents x1 (B, C, H, W) with labels y (B,): scalar fp32.

    Draws t (shifted, T_IS_DATA) and x0 ~ N(0, I) from ``generator`` (label dropout inside the model uses
    the global RNG, as the official code). Run it under the caller's autocast.
    """
    if x1.dim() != 4:
        raise ValueError(f"x1 must be data latents (B, C, H, W), got {tuple(x1.shape)}")
    t = sample_dit_time(x1.shape[0], shift, device=x1.device, generator=generator)
    x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    xt, u = transport_path(x0, x1, t)
    return velocity_mse(model(xt, t, y), u)


# ----------------------------------------------------------------------------------------------------
# sampling: Euler ODE from noise (t = 0) to data (t = 1), optional CFG / AutoGuidance

GUIDANCE_KINDS = ("none", "cfg", "autoguidance")


def euler_time_grid(num_steps: int, shift: float) -> torch.Tensor:
    """The official fixed grid of ``num_steps`` POINTS (num_steps - 1 Euler steps), T_IS_DATA, fp32.

    g = linspace(0, 1, N); h = s*g/(1+(s-1)g); grid = reverse(1 - h): runs 0 (noise) -> 1 (data) with
    fine steps near noise (spec 5.5).
    """
    if int(num_steps) < 2:
        raise ValueError(f"num_steps counts grid points and must be >= 2 (got {num_steps})")
    g = torch.linspace(0.0, 1.0, int(num_steps), dtype=torch.float64)
    return (1.0 - shift_noise_level(g, shift)).flip(0).float()


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classic classifier-free guidance: v_uncond + w * (v_cond - v_uncond) (all channels)."""
    return v_uncond + scale * (v_cond - v_uncond)


def autoguidance_combine(v_main: torch.Tensor, v_guide: torch.Tensor, scale: float) -> torch.Tensor:
    """AutoGuidance: v_guide + w * (v_main - v_guide); the guide is the weaker model (DiT^DH-S)."""
    return v_guide + scale * (v_main - v_guide)


def _in_interval(t: float, interval) -> bool:
    lo, hi = interval
    return lo <= t <= hi


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: str = "none",
                    scale: float = 1.0, guide_model=None, interval=(0.0, 1.0)) -> torch.Tensor:
    """The velocity the sampler integrates at one time t (B,) (T_IS_DATA; ``interval`` in the same convention).

    'cfg' doubles the batch with the null label (model.num_classes) like the official forward_with_cfg;
    'autoguidance' calls ``guide_model`` with the SAME labels. Outside ``interval`` the plain conditional
    velocity is used.
    """
    if guidance == "none" or not _in_interval(float(t[0]), interval):
        return model(x, t, y)
    return _guided(model, x, t, y, guidance, scale, guide_model)


def _guided(model, x, t, y, guidance: str, scale: float, guide_model) -> torch.Tensor:
    """guided_velocity without the interval test (which needs t on the host)."""
    if guidance == "none":
        return model(x, t, y)
    if guidance == "cfg":
        null = torch.full_like(y, model.num_classes)
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return cfg_combine(v_cond, v_uncond, scale)
    if guidance == "autoguidance":
        return autoguidance_combine(model(x, t, y), guide_model(x, t, y), scale)
    raise ValueError(f"unknown guidance {guidance!r}; choose one of {GUIDANCE_KINDS}")


def _check_sampling_args(model, labels, guidance, guide_model):
    if guidance not in GUIDANCE_KINDS:
        raise ValueError(f"unknown guidance {guidance!r}; choose one of {GUIDANCE_KINDS}")
    if guidance == "autoguidance":
        if guide_model is None:
            raise ValueError("guidance='autoguidance' needs guide_model (the weak DiT^DH-S, EMA weights)")
        mine, theirs = tuple(model.latent_shape), tuple(guide_model.latent_shape)
        if mine != theirs:
            raise ValueError(f"guide_model latent shape {theirs} differs from the main model's {mine}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > model.num_classes):
        raise ValueError(f"labels must lie in [0, {model.num_classes}] ({model.num_classes} = null class)")


@torch.inference_mode()
def sample_latents(model, labels: torch.Tensor, num_steps: int = 150, shift: float | None = None,
                   guidance: str = "none", scale: float = 1.0, guide_model=None, interval=(0.0, 1.0),
                   generator: torch.Generator | None = None, progress: bool = False,
                   autocast: bool | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic Euler ODE from x ~ N(0, I) at t = 0 to latents at t = 1 (T_IS_DATA): (B, C, h, w) fp32.

    num_steps counts grid POINTS as the official num_sampling_steps (150 -> 149 model evaluations).
    shift defaults to dit_time_shift of the model's latent shape. The starting noise comes from
    ``generator`` (drawn on its device) unless ``noise`` is given: same seed -> same output.
    autocast: bf16 autocast as the official sampler; default on for CUDA, off on CPU.
    Guidance at scale 1.0 equals no guidance, so it is skipped (saves the extra evaluations).
    Use the EMA weights; the models are switched to eval mode.
    """
    _check_sampling_args(model, labels, guidance, guide_model)
    c, h, w = model.latent_shape
    device = next(model.parameters()).device
    if shift is None:
        shift = dit_time_shift(h, w, c)
    if noise is None:
        # Drawn on the generator's device, then moved: a CPU generator gives the same start on any device.
        gen_device = generator.device if generator is not None else device
        noise = torch.randn((labels.shape[0], c, h, w), generator=generator, device=gen_device)
    elif tuple(noise.shape) != (labels.shape[0], c, h, w):
        raise ValueError(f"noise must be {(labels.shape[0], c, h, w)}, got {tuple(noise.shape)}")
    if scale == 1.0:
        guidance = "none"
    model.eval()
    if guide_model is not None:
        guide_model.eval()
    # bf16 weights (a model cast by DeepSpeed's bf16 section) need autocast on any device: x stays fp32
    low = any(p.dtype in (torch.bfloat16, torch.float16)
              for m in (model, guide_model) if m is not None for p in m.parameters())
    use_autocast = (device.type == "cuda" or low) if autocast is None else bool(autocast)
    grid = euler_time_grid(num_steps, shift).tolist()
    x = noise.to(device=device, dtype=torch.float32)
    y = labels.to(device)
    steps = range(len(grid) - 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="euler", leave=False)
    for i in steps:
        t = torch.full((x.shape[0],), grid[i], device=device)
        # The interval test uses the host copy of t: float(t[0]) would sync the GPU every step.
        g = guidance if _in_interval(grid[i], interval) else "none"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            v = _guided(model, x, t, y, g, scale, guide_model)
        x = x + (grid[i + 1] - grid[i]) * v.float()
    return x
