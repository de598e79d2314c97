"""The RecTok tokenizer: ViT encoder with MAE masking, KL posterior, flow noise on latents, ViT pixel
decoder and the semantic decoders distilled from a frozen teacher (spec sections 1, 2 and 4).

State-dict keys and shapes equal the official ones (``spec/official-keys-rectok.txt``). The frozen
teacher is deliberately NOT part of the module tree: it is held in the plain dict ``teachers`` (moved
along by ``.to()``/``.cuda()``), so our checkpoints do not carry ~303M frozen weights and the EMA does
not copy them every step. Official stage-1 checkpoints DO contain ``sem_foundation_models.*``; the
loader drops that prefix (see :attr:`RecTok.official_ignored_prefixes`).

Two time conventions exist in the project; here only the tokenizer one is used: noise level ``tau``,
tau = 1 is pure noise (:data:`rectok_fast.flow.TAU_IS_NOISE`).
"""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from rectok_fast import ops
from rectok_fast.flow import NOISE_SCHEDULES, sample_tokenizer_noise_level, timestep_shift
from rectok_fast.models.layers import NORM_EPS, Block
from rectok_fast.models.rope import rope_table

# models/model_utils.py SIZE_DICT: width, layers, heads
SIZE_DICT = {
    "tiny": dict(width=192, layers=3, heads=4),
    "small": dict(width=512, layers=8, heads=8),
    "base": dict(width=768, layers=12, heads=12),
    "large": dict(width=1024, layers=24, heads=16),
    "xl": dict(width=1152, layers=28, heads=16),
    "huge": dict(width=1280, layers=32, heads=16),
}

SEM_TARGETS = ("rec+align", "align", "reconstruction")
SEM_DECODER_TYPES = ("transformer", "mlp")
SEM_INPUT_TYPES = ("noisy", "clean")

# Checkpoint prefixes a decode-only tokenizer (built with teachers={}) skips: the frozen teacher and the
# semantic decoders of a stage-1 file.
DECODE_ONLY_IGNORED_PREFIXES = ("sem_foundation_models.", "sem_decoders.")

# Teacher feature widths of the official foundation models (DINOv3 ViT-L/16, DINOv2 ViT-L/14).
OFFICIAL_TEACHER_DIMS = {"dinov3": 1024, "dinov2": 1024}


@dataclass
class TokenizerConfig:
    """Everything that shapes a RecTok; defaults = the official ``rectok_BB`` stage-1 run."""
    img_size: int = 256
    patch_size: int = 16
    encoder_size: str = "base"
    decoder_size: str = "base"
    sem_size: str = "tiny"
    token_channels: int = 128            # every official script; the constructor default 16 is never used
    teachers: dict = field(default_factory=lambda: {"dinov3": 1024})   # name -> feature width; {} = no sem
    sem_dec_type: str = "transformer"
    sem_input_type: str = "noisy"
    sem_target: str = "rec+align"
    mask_ratio: float = 0.4
    mask_ratio_min: float = -0.1
    mask_ratio_type: str = "random"      # 'random' or 'fix'
    gamma: float = 1.0
    noise_schedule: str = "shift"

    def validate(self) -> None:
        for name in ("encoder_size", "decoder_size", "sem_size"):
            if getattr(self, name) not in SIZE_DICT:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {tuple(SIZE_DICT)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.sem_target not in SEM_TARGETS:
            raise ValueError(f"sem_target={self.sem_target!r}; choose one of {SEM_TARGETS}")
        if self.sem_dec_type not in SEM_DECODER_TYPES:
            raise ValueError(f"sem_dec_type={self.sem_dec_type!r}; choose one of {SEM_DECODER_TYPES}")
        if self.sem_input_type not in SEM_INPUT_TYPES:
            raise ValueError(f"sem_input_type={self.sem_input_type!r}; choose one of {SEM_INPUT_TYPES}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule={self.noise_schedule!r}; choose one of {NOISE_SCHEDULES}")
        if self.mask_ratio_type not in ("random", "fix"):
            raise ValueError(f"mask_ratio_type={self.mask_ratio_type!r}; choose 'random' or 'fix'")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")


# Variant name -> config fields: the tokenizer rows of the registry (rectok_fast.models.registry), the one
# place where variants (rectok_BB, rectok_tiny, rectok_demo and their decode-only *_decft twins) are defined.
from rectok_fast.models.registry import configs as _registry_configs  # noqa: E402

PRESETS = _registry_configs("tokenizer")


# ----------------------------------------------------------------------------------------------
# masking


def sample_mask_ratio(mask_ratio: float, mask_ratio_min: float, randomize: bool, rng=random) -> float:
    """Official ratio: ``max(0, U(min, max))`` drawn once per step with Python's ``random``.

    With the defaults (-0.1, 0.4) P(r = 0) = 0.2. ``rng`` is the ``random`` module (official, seeded by
    ``random.seed``) or a ``random.Random`` instance.
    """
    if not randomize:
        return mask_ratio
    return max(0.0, rng.uniform(mask_ratio_min, mask_ratio))


def num_visible(seq_len: int, ratio: float) -> int:
    """L = ceil(N * (1 - r)), computed in float64 as numpy does officially."""
    return int(math.ceil(seq_len * (1.0 - ratio)))


@dataclass
class MaskIds:
    """MAE indices. ``ids_keep``: original positions of the L visible tokens, in shuffled (not sorted)
    order; ``ids_masked``: the other N - L; ``ids_restore``: inverse permutation of the shuffle, so
    token i is masked iff ids_restore[b, i] >= L."""
    ids_keep: torch.Tensor
    ids_masked: torch.Tensor
    ids_restore: torch.Tensor


def random_masking_ids(batch: int, seq_len: int, len_keep: int, device=None,
                       generator: torch.Generator | None = None) -> MaskIds:
    """argsort of uniform noise per sample, as MAE and the official encoder do."""
    noise = torch.rand(batch, seq_len, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return MaskIds(ids_shuffle[:, :len_keep], ids_shuffle[:, len_keep:], ids_restore)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[b, ids[b, j]] for x (B, N, D), ids (B, M) -> (B, M, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def unshuffle_with_mask(visible: torch.Tensor, fill: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Full sequence from the L visible tokens plus N - L copies of ``fill`` (1, 1, D), unshuffled."""
    b, l, d = visible.shape
    n = ids_restore.shape[1]
    if l > n:
        raise ValueError(f"{l} visible tokens but ids_restore covers only {n} positions")
    full = torch.cat([visible, fill.to(visible.dtype).expand(b, n - l, d)], dim=1)
    return gather_tokens(full, ids_restore)


# ----------------------------------------------------------------------------------------------
# parameter-free reshapes (kept as modules so Sequential indices match the official keys)


class _GridToTokens(nn.Module):
    def forward(self, x):  # (B, C, h, w) -> (B, h*w, C)
        return x.flatten(2).transpose(1, 2)


class _TokensToGrid(nn.Module):
    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid

    def forward(self, x):  # (B, h*w, C) -> (B, C, h, w)
        return x.transpose(1, 2).unflatten(2, (self.grid, self.grid))


class DepthToSpacePC(nn.Module):
    """(B, p*p*3, h, w) -> (B, 3, h*p, w*p) with channel index (p1*p + p2)*3 + c.

    The official head uses this (p1, p2, c) order; ``nn.PixelShuffle`` would assume (c, p1, p2)."""

    def __init__(self, patch: int, channels: int = 3):
        super().__init__()
        self.patch, self.channels = patch, channels

    def forward(self, x):
        b, _, h, w = x.shape
        p, c = self.patch, self.channels
        x = x.reshape(b, p, p, c, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, c, h * p, w * p)


# ----------------------------------------------------------------------------------------------
# encoder / decoders


class EncoderOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 attaches its backward hooks to tensors it
    finds in tuples/lists/dicts returned by modules, and misses them inside dataclasses."""
    moments: torch.Tensor                 # (B, L, 2C) = [mean | logvar]
    ids_restore: torch.Tensor | None
    ids_keep: torch.Tensor | None
    ids_masked: torch.Tensor | None


class Encoder(nn.Module):
    """ViT encoder: patchify, + pos-emb (before masking), MAE masking, blocks, latent head."""

    def __init__(self, img_size: int, patch_size: int, size: str, token_channels: int,
                 mask_ratio: float, mask_ratio_min: float, random_mask_ratio: bool):
        super().__init__()
        cfg = SIZE_DICT[size]
        width = cfg["width"]
        self.grid = img_size // patch_size
        self.seq_len = self.grid ** 2
        self.width = width
        self.mask_ratio, self.mask_ratio_min, self.random_mask_ratio = mask_ratio, mask_ratio_min, random_mask_ratio
        self.mask_rng = random   # the official code draws the ratio from Python's global RNG
        self.patch_embed = nn.Sequential(nn.Conv2d(3, width, patch_size, patch_size), _GridToTokens())
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1, self.seq_len, width))
        self.ln_pre = nn.RMSNorm(width, eps=NORM_EPS)
        self.transformer = nn.ModuleList(Block(width, cfg["heads"]) for _ in range(cfg["layers"]))
        self.ln_post = nn.RMSNorm(width, eps=NORM_EPS)
        self.latent_head = nn.Linear(width, 2 * token_channels)
        self.register_buffer("rope_tensor", rope_table(width // cfg["heads"], self.grid, self.grid),
                             persistent=False)

    def draw_len_keep(self) -> int | None:
        """Visible-token count L of the next masked step, from the official ratio draw (Python ``random``);
        None (and no draw) when the next forward does not mask (eval mode or mask_ratio = 0).

        Host code: a compiled training forward takes L as an argument (``len_keep``) drawn by the
        caller with this method, so the graph holds no Python-random draw. Python's ``random`` stream
        is separate from torch's, so drawing it first changes no value."""
        if not (self.training and self.mask_ratio > 0):
            return None
        r = sample_mask_ratio(self.mask_ratio, self.mask_ratio_min, self.random_mask_ratio, self.mask_rng)
        return num_visible(self.seq_len, r)

    def forward(self, x: torch.Tensor, mask: bool = True, len_keep: int | None = None) -> EncoderOutput:
        """``mask`` allows MAE masking; it happens only in training mode with mask_ratio > 0, keeping
        ``len_keep`` tokens (drawn here when None, see :meth:`draw_len_keep`)."""
        x = self.patch_embed(x) + self.positional_embedding
        b = x.shape[0]
        rope = self.rope_tensor.expand(b, -1, -1)
        ids = None
        if mask and self.training and self.mask_ratio > 0:
            if len_keep is None:
                len_keep = self.draw_len_keep()
            ids = random_masking_ids(b, self.seq_len, len_keep, device=x.device)
            x = gather_tokens(x, ids.ids_keep)
            rope = gather_tokens(rope, ids.ids_keep)
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x, rope)
        moments = self.latent_head(self.ln_post(x))
        if ids is None:
            return EncoderOutput(moments, None, None, None)
        return EncoderOutput(moments, ids.ids_restore, ids.ids_keep, ids.ids_masked)


class _TokenTransformer(nn.Module):
    """Shared body of the pixel and semantic decoders: embed visible latents, fill the masked
    positions with a learned vector, unshuffle, + pos-emb, ln_pre, blocks (RoPE), ln_post."""

    embed_name = "embed"
    fill_name = "fill"

    def __init__(self, img_size: int, patch_size: int, size: str, token_channels: int):
        super().__init__()
        cfg = SIZE_DICT[size]
        width = cfg["width"]
        self.grid = img_size // patch_size
        self.seq_len = self.grid ** 2
        self.width = width
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1, self.seq_len, width))

    def _build_body(self, width: int, heads: int, layers: int) -> None:
        self.ln_pre = nn.RMSNorm(width, eps=NORM_EPS)
        self.transformer = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_post = nn.RMSNorm(width, eps=NORM_EPS)
        self.register_buffer("rope_tensor", rope_table(width // heads, self.grid, self.grid), persistent=False)

    def _body(self, z: torch.Tensor, ids_restore: torch.Tensor | None) -> torch.Tensor:
        embed = getattr(self, self.embed_name)
        # The posterior op returns fp32 latents; officially the latents keep the moments' dtype
        # (DiagonalGaussianDistribution chunks its input). Casting to the weights' dtype makes a
        # .double() or .to(bfloat16) model run as the official one does; a no-op for fp32 weights
        # (autocast still decides the matmul precision).
        x = embed(z.to(embed.weight.dtype))
        if ids_restore is not None:
            x = unshuffle_with_mask(x, getattr(self, self.fill_name), ids_restore)
        elif x.shape[1] != self.seq_len:
            raise ValueError(f"decoder got {x.shape[1]} tokens without ids_restore; expected all {self.seq_len}")
        x = self.ln_pre(x + self.positional_embedding)
        rope = self.rope_tensor.expand(x.shape[0], -1, -1)
        for block in self.transformer:
            x = block(x, rope)
        return self.ln_post(x)


class PixelDecoder(_TokenTransformer):
    """Latents -> image in [-1, 1] (no output activation): 1x1 conv to p*p*3, (p1,p2,c) depth-to-space, 3x3 conv."""

    embed_name, fill_name = "decoder_embed", "mask_token"

    def __init__(self, img_size: int, patch_size: int, size: str, token_channels: int):
        super().__init__(img_size, patch_size, size, token_channels)
        cfg = SIZE_DICT[size]
        w = cfg["width"]
        self.mask_token = nn.Parameter(w ** -0.5 * torch.randn(1, 1, w))
        self.decoder_embed = nn.Linear(token_channels, w)
        self._build_body(w, cfg["heads"], cfg["layers"])
        self.ffn = nn.Sequential(_TokensToGrid(self.grid), nn.Conv2d(w, patch_size * patch_size * 3, 1),
                                 DepthToSpacePC(patch_size))
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, z: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv_out(self.ffn(self._body(z, ids_restore)))


class TransformerSemDecoder(_TokenTransformer):
    """Predicts teacher features at ALL N positions from the visible (noisy) latents."""

    embed_name, fill_name = "token_embedding", "mask_embedding"

    def __init__(self, img_size: int, patch_size: int, size: str, token_channels: int, out_dim: int):
        super().__init__(img_size, patch_size, size, token_channels)
        cfg = SIZE_DICT[size]
        w = cfg["width"]
        self.token_embedding = nn.Linear(token_channels, w)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, w))
        self._build_body(w, cfg["heads"], cfg["layers"])
        self.out = nn.Linear(w, out_dim)

    def forward(self, z: torch.Tensor, ids_restore: torch.Tensor | None = None,
                pick: torch.Tensor | None = None) -> torch.Tensor:
        """Features at all N positions, or with ``pick`` (B, M) only at those positions: the hidden
        states are gathered before the output projection, so its GEMM runs on the M picked tokens."""
        h = self._body(z, ids_restore)
        if pick is not None:
            h = gather_tokens(h, pick)
        return self.out(h)


class MLPSemDecoder(nn.Module):
    """Per-token Linear(C, 4C)-GELU-Linear(4C, D). It sees only visible tokens, so it cannot predict
    masked positions; official runs use it with masking off, and so must we."""

    def __init__(self, token_channels: int, out_dim: int, **_):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(token_channels, 4 * token_channels), nn.GELU(),
                                 nn.Linear(4 * token_channels, out_dim))

    def forward(self, z: torch.Tensor, ids_restore: torch.Tensor | None = None,
                pick: torch.Tensor | None = None) -> torch.Tensor:
        if pick is not None:
            raise ValueError("the MLP semantic decoder predicts visible tokens only and cannot pick masked ones")
        if ids_restore is not None and ids_restore.shape[1] != z.shape[1]:
            raise ValueError("the MLP semantic decoder predicts visible tokens only and cannot be used with "
                             "MAE masking; set mask_ratio=0 (as the official MLP runs do) or use 'transformer'")
        return self.mlp(z)


# ----------------------------------------------------------------------------------------------
# the tokenizer


class TokenizerOutput(NamedTuple):
    """What a forward pass gives the losses. Images are in [-1, 1]. (A NamedTuple for ZeRO-3,
    see :class:`EncoderOutput`.)"""
    recon: torch.Tensor                       # (B, 3, H, W), no clamp
    kl: torch.Tensor                          # (B,) per-sample KL over the visible tokens, fp32
    z: torch.Tensor                           # (B, L, C) posterior sample (mean in eval), fp32
    z_tau: torch.Tensor                       # (B, L, C) flow-noised latents (= z without noise)
    moments: torch.Tensor                     # (B, L, 2C)
    tau: torch.Tensor                         # (B,) noise level used (zeros without noise)
    ids_restore: torch.Tensor | None
    ids_keep: torch.Tensor | None
    ids_masked: torch.Tensor | None           # (B, N - L) long, None without masking
    sem_pred: dict                            # teacher -> (B, N, Dt); empty without semantic decoders
    sem_target: dict                          # teacher -> (B, N, Dt), no grad
    sem_mode: str = "rec+align"
    sem_picked: bool = False                  # sem_pred holds only the ids_masked rows (B, N - L, Dt)


class RecTok(nn.Module):
    """RecTok tokenizer. ``forward`` is the stage-1 training pass when ``self.training`` (masking,
    posterior sampling, flow noise, semantic predictions); in eval it is a plain posterior-mean
    autoencoder pass. ``tokenize``/``detokenize``/``reconstruct`` have the official semantics."""

    # An official stage-1 checkpoint stores the frozen HF teacher under this prefix; we keep the
    # teacher out of the module tree, so checkpoint loading skips these keys.
    official_ignored_prefixes = ("sem_foundation_models.",)

    def __init__(self, config: TokenizerConfig | None = None):
        super().__init__()
        cfg = config or TokenizerConfig()
        cfg.validate()
        self.config = cfg
        self.img_size, self.patch_size = cfg.img_size, cfg.patch_size
        self.seq_h = self.seq_w = cfg.img_size // cfg.patch_size
        self.token_channels = cfg.token_channels
        self.gamma, self.noise_schedule = cfg.gamma, cfg.noise_schedule
        self.sem_input_type, self.sem_target = cfg.sem_input_type, cfg.sem_target
        self.timestep_shift = timestep_shift(self.seq_h, self.seq_w, cfg.token_channels)

        self.encoder = Encoder(cfg.img_size, cfg.patch_size, cfg.encoder_size, cfg.token_channels,
                               cfg.mask_ratio, cfg.mask_ratio_min, cfg.mask_ratio_type == "random")
        self.decoder = PixelDecoder(cfg.img_size, cfg.patch_size, cfg.decoder_size, cfg.token_channels)
        self.width = self.encoder.width
        # Official order: the trunc-normal init runs BEFORE the semantic decoders exist, so they keep
        # PyTorch's default init.
        self.apply(_init_weights)

        self.teachers: dict[str, nn.Module] = {}   # plain dict on purpose: not in state_dict
        if cfg.teachers:
            self.sem_decoders = nn.ModuleDict()
            for name, dim in cfg.teachers.items():
                if cfg.sem_dec_type == "transformer":
                    self.sem_decoders[name] = TransformerSemDecoder(cfg.img_size, cfg.patch_size, cfg.sem_size,
                                                                    cfg.token_channels, int(dim))
                else:
                    self.sem_decoders[name] = MLPSemDecoder(cfg.token_channels, int(dim))
        else:
            self.sem_decoders = None

        self.register_buffer("mean", torch.tensor(0.0), persistent=False)
        self.register_buffer("std", torch.tensor(1.0), persistent=False)
        self.scale_factor = 1.0

    # ---- teachers ---------------------------------------------------------------------------

    @property
    def use_sem(self) -> bool:
        return self.sem_decoders is not None and len(self.sem_decoders) > 0

    def attach_teacher(self, name: str, teacher: nn.Module) -> None:
        """Register the frozen teacher ``name`` (a :class:`rectok_fast.models.teacher.Teacher`).

        It is called as ``teacher(images_in_[-1,1]) -> (B, N, D)`` and kept out of the state dict."""
        if not self.use_sem or name not in self.sem_decoders:
            have = list(self.sem_decoders) if self.use_sem else []
            raise KeyError(f"no semantic decoder for teacher {name!r}; this tokenizer has {have}")
        dim = self.config.teachers[name]
        got = getattr(teacher, "embed_dim", dim)
        if got != dim:
            raise ValueError(f"teacher {name!r} gives {got}-dim features, the semantic decoder predicts {dim}")
        teacher.eval().requires_grad_(False)
        # _apply only moves teachers attached before a .to()/.cuda(); one attached afterwards would stay
        # on its own device and fail on the first batch.
        device = self.encoder.positional_embedding.device
        if device.type != "meta":
            teacher.to(device)
        self.teachers[name] = teacher

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for t in self.teachers.values():   # keep the teacher on the tokenizer's device
            t._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self.teachers.values():   # the teacher always runs in eval mode
            t.eval()
        return self

    # ---- checks -----------------------------------------------------------------------------

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB in [-1, 1]), got {x.shape[1]} in {tuple(x.shape)}")
        if x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"this tokenizer takes {self.img_size}x{self.img_size} images, got "
                             f"{x.shape[2]}x{x.shape[3]}; resize/crop first or build it with img_size=...")
        if not x.is_floating_point():
            raise TypeError(f"images must be floating point in [-1, 1], got {x.dtype}")

    # ---- encoding ---------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, sampling: bool = False, mask: bool = True,
               len_keep: int | None = None) -> dict:
        """Encoder + posterior (+ flow noise when training with gamma > 0), as the official ``encode``.

        The posterior sample, KL and flow noise go through :func:`rectok_fast.ops.posterior_flow_noise`.
        Random draws in the official order: mask noise, posterior eps, tau, flow eps.
        """
        self._check_images(x)
        enc = self.encoder(x, mask=mask, len_keep=len_keep)
        moments = enc.moments
        b, l, two_c = moments.shape
        c = two_c // 2
        dev = moments.device
        noisy = self.training and self.gamma > 0.0
        zeros = None if (sampling and noisy) else torch.zeros(b, l, c, device=dev)   # read-only, shared
        eps_post = torch.randn(b, l, c, device=dev) if sampling else zeros
        if noisy:
            tau = sample_tokenizer_noise_level(b, self.noise_schedule, self.timestep_shift, device=dev)
            eps_flow = torch.randn(b, l, c, device=dev)
        else:
            tau = torch.zeros(b, device=dev)
            eps_flow = zeros
        z, z_tau, kl = ops.posterior_flow_noise(moments, eps_post, eps_flow, tau, self.gamma)
        sem_input = z_tau if (noisy and self.sem_input_type == "noisy") else z
        return dict(z_latents=z_tau, sem_input=sem_input, z=z, kl=kl, tau=tau, moments=moments,
                    ids_restore=enc.ids_restore, ids_keep=enc.ids_keep, ids_masked=enc.ids_masked)

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, 2C) posterior moments without masking (eval semantics), e.g. for latent statistics."""
        self._check_images(images)
        return self.encoder(images, mask=False).moments

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, len_keep: int | None = None) -> TokenizerOutput:
        """Training/eval forward. ``len_keep``: the step's visible-token count when masking, drawn by
        the caller with ``self.encoder.draw_len_keep()`` (needed for a whole-graph torch.compile);
        None draws it here."""
        enc = self.encode(images, sampling=self.training, len_keep=len_keep)
        ids_restore = enc["ids_restore"]
        sem_pred, sem_tgt = {}, {}
        # 'reconstruction' scores the masked tokens only: the decoders project just those rows
        pick = enc["ids_masked"] if self.sem_target == "reconstruction" else None
        if self.use_sem and self.training:
            for name, dec in self.sem_decoders.items():
                sem_tgt[name] = self._teacher_features(name, images)
                sem_pred[name] = dec(enc["sem_input"], ids_restore, pick)
        recon = self.decoder(enc["z_latents"], ids_restore)
        return TokenizerOutput(recon=recon, kl=enc["kl"], z=enc["z"], z_tau=enc["z_latents"], moments=enc["moments"],
                               tau=enc["tau"], ids_restore=ids_restore, ids_keep=enc["ids_keep"],
                               ids_masked=enc["ids_masked"], sem_pred=sem_pred, sem_target=sem_tgt,
                               sem_mode=self.sem_target, sem_picked=pick is not None and bool(sem_pred))

    def _teacher_features(self, name: str, images: torch.Tensor) -> torch.Tensor:
        teacher = self.teachers.get(name)
        if teacher is None:
            raise RuntimeError(f"training forward needs the frozen teacher {name!r}: build it with "
                               f"rectok_fast.models.teacher.build_teacher(...) and call "
                               f"tokenizer.attach_teacher({name!r}, teacher), or build the tokenizer "
                               f"with teachers={{}} (no semantic distillation)")
        feats = teacher(images)
        if feats.shape[1] != self.seq_h * self.seq_w:
            raise ValueError(f"teacher {name!r} returned {feats.shape[1]} tokens, expected {self.seq_h * self.seq_w}")
        return feats   # a constant for the loss (the teacher runs under no_grad)

    # ---- latent normalization / DiT interface ----------------------------------------------

    def set_latent_stats(self, mean, std) -> None:
        """Per-channel (C,) or scalar latent statistics as non-persistent buffers (official reset_stats)."""
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} differ in shape")
        if mean.dim() > 0:
            if mean.numel() != self.token_channels:
                raise ValueError(f"latent stats have {mean.numel()} channels, the tokenizer has {self.token_channels}")
            mean, std = mean.reshape(1, 1, -1), std.reshape(1, 1, -1)
        if (std <= 0).any():
            raise ValueError("latent std must be positive")
        dev = self.encoder.positional_embedding.device
        self.register_buffer("mean", mean.to(dev), persistent=False)
        self.register_buffer("std", std.to(dev), persistent=False)

    def normalize_z(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z)) * self.scale_factor / self.std.to(z)

    def denormalize_z(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z) / self.scale_factor + self.mean.to(z)

    def _tokens_to_grid(self, z: torch.Tensor) -> torch.Tensor:
        return z.transpose(1, 2).unflatten(2, (self.seq_h, self.seq_w))

    def latents_from_moments(self, moments: torch.Tensor, sample: bool = True,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalized DiT latents (B, C, h, w) from cached moments (B, N, 2C); posterior sample or mean."""
        if moments.dim() != 3 or moments.shape[1:] != (self.seq_h * self.seq_w, 2 * self.token_channels):
            raise ValueError(f"moments must be (B, {self.seq_h * self.seq_w}, {2 * self.token_channels}), "
                             f"got {tuple(moments.shape)}")
        b, n, _ = moments.shape
        c = self.token_channels
        zeros = torch.zeros(b, n, c, device=moments.device)
        eps = torch.randn(b, n, c, device=moments.device, generator=generator) if sample else zeros
        z, _, _ = ops.posterior_flow_noise(moments, eps, zeros, torch.zeros(b, device=moments.device), 0.0)
        return self._tokens_to_grid(self.normalize_z(z))

    def tokenize(self, images: torch.Tensor, sampling: bool = False) -> torch.Tensor:
        """Normalized latents (B, C, h, w). No masking; flow noise only in training mode with gamma > 0
        (as officially; the DiT's tokenizer has gamma = 0)."""
        with self._inference_autocast() as low:
            z = self.encode(images, sampling=sampling, mask=False)["z_latents"]
            z = self._tokens_to_grid(self.normalize_z(z))
        return z.float() if low else z

    def detokenize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, C, h, w) or (B, N, C) -> images in [0, 1] (clamped)."""
        if z.dim() == 4:
            if z.shape[1:] != (self.token_channels, self.seq_h, self.seq_w):
                raise ValueError(f"latents must be (B, {self.token_channels}, {self.seq_h}, {self.seq_w}), "
                                 f"got {tuple(z.shape)}")
            z = z.flatten(2).transpose(1, 2)
        elif z.dim() != 3 or z.shape[-1] != self.token_channels:
            raise ValueError(f"latents must be (B, C, h, w) or (B, N, C) with C = {self.token_channels}, "
                             f"got {tuple(z.shape)}")
        with self._inference_autocast() as low:
            x = self.decoder(self.denormalize_z(z))
            x = torch.clamp(x * 0.5 + 0.5, 0.0, 1.0)
        return x.float() if low else x

    @contextlib.contextmanager
    def _inference_autocast(self):
        """Inference with bf16 weights (DeepSpeed's bf16 section casts the trained part, possibly only
        the decoder): autocast to that dtype, so that every op sees one dtype (fp32 buffers such as
        the RoPE table would otherwise meet bf16 activations). Yields whether it applies; fp32 weights
        run as they are (under the caller's autocast, if any)."""
        low = sorted({p.dtype for p in self.parameters()} - {torch.float32, torch.float64}, key=str)
        device = self.encoder.positional_embedding.device.type
        if not low or torch.is_autocast_enabled(device):
            yield False
            return
        with torch.autocast(device, dtype=low[0]):
            yield True

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean -> decoder -> [0, 1] (the rFID/PSNR path)."""
        return self.detokenize(self.tokenize(images))

    # ---- training stages --------------------------------------------------------------------

    def freeze_everything_but_decoder(self) -> None:
        """Stage 2 (decoder fine-tuning): only ``decoder.*`` trains; the encoder still samples."""
        self.requires_grad_(False)
        self.decoder.requires_grad_(True)


def _init_weights(module: nn.Module) -> None:
    """Official init: trunc-normal(0.02) weights and zero biases for every Linear/Conv (RMSNorm weights stay 1)."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_tokenizer(name: str = "rectok_BB", **overrides) -> RecTok:
    """Build a registered variant (``rectok_BB``, ``rectok_BB_decft``, ``rectok_tiny`` ...) with config overrides.

    Teachers are not built here (they are large and need local weights): see
    :func:`rectok_fast.models.teacher.build_teacher` and :meth:`RecTok.attach_teacher`.
    Build on the meta device (``with torch.device('meta'):``) to inspect shapes for free.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {tuple(PRESETS)}")
    kwargs = dict(PRESETS[name])
    unknown = set(overrides) - set(TokenizerConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown tokenizer option(s) {sorted(unknown)}; valid: "
                        f"{sorted(TokenizerConfig.__dataclass_fields__)}")
    kwargs.update(overrides)
    if isinstance(kwargs.get("teachers"), (list, tuple)):
        kwargs["teachers"] = {t: OFFICIAL_TEACHER_DIMS[t] for t in kwargs["teachers"]}
    model = RecTok(TokenizerConfig(**kwargs))
    # what a self-describing checkpoint stores to rebuild it (rectok_fast.checkpoint.build_from_checkpoint)
    model.variant_spec = {"kind": "tokenizer", "variant": name, "overrides": dict(overrides)}
    return model
