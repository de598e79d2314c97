"""DiT^DH: the RecTok generator (a DiT encoder stream plus a wide DDT head), reference implementation.

``model(x, t, y)`` returns the velocity exactly like the official ``DiTwDDTHead.forward`` (spec 5.2):
x (B, C, h, w) latents, t (B,) transport time in the DiT convention (t = 1 is DATA, see
:mod:`rectok_fast.flow`), y (B,) class labels (1000 = the null class used by classifier-free guidance).
Parameter/buffer names and shapes match the official state dict (spec/official-keys-ditdh.txt), so
official checkpoints load with ``strict=True``.

Every AdaLN modulation and gated residual goes through :func:`rectok_fast.ops.adaln_modulate` and
:func:`rectok_fast.ops.gated_residual`, so the fused C++/CUDA extension replaces them without any
change here. shift/scale/gate are passed as the (non-contiguous) chunk views of the adaLN output.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from rectok_fast import ops
from rectok_fast.models.layers import SwiGLU
# Only the adjacent-pair rotation is shared with the tokenizer; its RoPE *table* is a different one.
from rectok_fast.models.rope import rotate_half as rotate_half_pairs

# ----------------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of a DiT^DH. Defaults are DiT^DH-XL on 16x16x128 latents (spec 5.1)."""
    input_size: int = 16          # latent height = width
    patch_size: int = 1
    in_channels: int = 128        # latent channels
    hidden_size: int = 1152       # encoder stream width
    depth: int = 28               # encoder blocks
    num_heads: int = 16
    head_hidden_size: int = 2048  # DDT head width
    head_depth: int = 2
    head_num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    fourier_size: int = 256       # number of Gaussian Fourier frequencies (features = 2x)
    eps: float = 1e-6             # RMSNorm epsilon

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2

    def validate(self) -> "DiTConfig":
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        for width, heads, what in ((self.hidden_size, self.num_heads, "encoder"),
                                   (self.head_hidden_size, self.head_num_heads, "DDT head")):
            if width % heads:
                raise ValueError(f"{what} width {width} is not divisible by its {heads} heads")
            if (width // heads) % 4:
                raise ValueError(f"{what} head_dim {width // heads} must be a multiple of 4 for 2D RoPE")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2D sin-cos pos_embed")
        if self.depth < 1 or self.head_depth < 1:
            raise ValueError(f"depth ({self.depth}) and head_depth ({self.head_depth}) must be >= 1")
        return self


#: variant name -> config fields: the DiT rows of the registry (rectok_fast.models.registry): the four
#: official sizes (encoder width/depth/heads; all share the 2 x 2048 DDT head) and the tiny test/demo model.
from rectok_fast.models.registry import configs as _registry_configs  # noqa: E402

DIT_PRESETS: dict[str, dict] = _registry_configs("dit")
_ALIASES = {"ditddt_s": "ditdh_s", "ditddt_b": "ditdh_b", "ditddt_l": "ditdh_l", "ditddt_xl": "ditdh_xl"}


def dit_config(name: str, **overrides) -> DiTConfig:
    """The config of preset ``name`` (ours or the official ``DiTDDT_*`` spelling) with field overrides."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in DIT_PRESETS:
        raise ValueError(f"unknown DiT model {name!r}; choose one of {sorted(DIT_PRESETS)} "
                         f"(or the official names {sorted(_ALIASES)})")
    known = {f.name for f in fields(DiTConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown DiT config field(s) {bad}; valid fields: {sorted(known)}")
    return replace(DiTConfig(), **{**DIT_PRESETS[key], **overrides}).validate()


def build_dit(name: str = "ditdh_xl", **overrides) -> "DiTwDDTHead":
    """Build a DiT^DH by preset name; keyword overrides change any :class:`DiTConfig` field.

    To build without allocating memory (e.g. to count XL parameters), wrap the call in
    ``with torch.device("meta"):``.
    """
    model = DiTwDDTHead(dit_config(name, **overrides))
    key = _ALIASES.get(str(name).strip().lower().replace("-", "_"), str(name).strip().lower().replace("-", "_"))
    # what a self-describing checkpoint stores to rebuild it (rectok_fast.checkpoint.build_from_checkpoint)
    model.variant_spec = {"kind": "dit", "variant": key, "overrides": dict(overrides)}
    return model


# ----------------------------------------------------------------------------------------------------
# fixed tables: 2D sin-cos position embedding and 2D RoPE


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE 1D table: (len(pos), dim) = [sin(pos*w_k) | cos(pos*w_k)], w_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = pos.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_pos_embed(dim: int, grid_size: int, device=None) -> torch.Tensor:
    """Fixed (grid*grid, dim) table, tokens row-major; first dim/2 channels encode the COLUMN index,
    the last dim/2 the ROW index (MAE convention, as the official pos_embed). fp32."""
    idx = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


def rope_2d_tables(head_dim: int, grid_size: int, theta: float = 10000.0, device=None):
    """EVA-style 2D RoPE tables (cos, sin), each (grid*grid, head_dim), fp32.

    Per axis head_dim/4 frequencies theta^(-2k/(head_dim/2)), each repeated twice (adjacent pairs
    rotate together); channels [0, hd/2) use the ROW index, [hd/2, hd) the COLUMN index.
    """
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device)[: half // 2] / half)
    pos = torch.arange(grid_size, dtype=torch.float32, device=device)
    axis = torch.einsum("i,f->if", pos, freqs).repeat_interleave(2, dim=-1)      # (G, hd/2)
    g = grid_size
    angles = torch.cat([axis[:, None, :].expand(g, g, half), axis[None, :, :].expand(g, g, half)], dim=-1)
    angles = angles.reshape(g * g, head_dim)
    return angles.cos(), angles.sin()


class RotaryEmbedding2D(nn.Module):
    """Applies 2D RoPE to (B, heads, N, head_dim); tables are persistent buffers as in the official state dict."""

    def __init__(self, head_dim: int, grid_size: int):
        super().__init__()
        cos, sin = rope_2d_tables(head_dim, grid_size)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.freqs_cos + rotate_half_pairs(x) * self.freqs_sin


# ----------------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """RMSNorm whose statistics are computed in fp32 and cast back before the weight (layers.py)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain norm (the blocks fuse it with the modulation through ops.adaln_modulate instead)."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def dit_mlp_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU hidden width: 2/3 of the MLP width, truncated (1152 -> 3072, 2048 -> 5461, 384 -> 1024).

    Integer-first so float rounding cannot drop a unit (2/3 * 4 * 1152 is not exact in binary).
    """
    return (2 * int(dim * mlp_ratio)) // 3


class Attention(nn.Module):
    """Multi-head self-attention with qkv/proj biases and 2D RoPE on q and k; SDPA default scale."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        # RoPE runs against the fp32 tables; cast back to v's dtype as the official block does.
        q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DDTBlock(nn.Module):
    """LightningDDTBlock: AdaLN (6 chunks from SiLU(cond)) -> gated attention and gated SwiGLU residuals.

    ``cond`` is per sample (B, D) in the encoder and per token (B, N, D) in the DDT head.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm1 = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, dit_mlp_hidden(dim, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        if cond.dim() == 2:
            cond = cond.unsqueeze(1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(cond).chunk(6, dim=-1)
        h = ops.adaln_modulate(x, self.norm1.weight, shift_msa, scale_msa, self.eps)
        x = ops.gated_residual(x, gate_msa, self.attn(h, rope))
        h = ops.adaln_modulate(x, self.norm2.weight, shift_mlp, scale_mlp, self.eps)
        return ops.gated_residual(x, gate_mlp, self.mlp(h))


class FinalLayer(nn.Module):
    """Per-token adaptive RMSNorm (shift, scale; no gate) then Linear to patch*patch*C."""

    def __init__(self, dim: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm_final = RMSNorm(dim, eps)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(cond).chunk(2, dim=-1)
        return self.linear(ops.adaln_modulate(x, self.norm_final.weight, shift, scale, self.eps))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) by a patch x patch conv (1x1 for the official models)."""

    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class GaussianFourierEmbedder(nn.Module):
    """t -> MLP([sin(2 pi t W), cos(2 pi t W)]); W ~ N(0, 1) is a frozen parameter saved in the state
    dict (it cannot be re-drawn: it must come from the checkpoint)."""

    def __init__(self, dim: int, fourier_size: int = 256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(fourier_size), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * fourier_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Official dtype promotion (t * W): fp32 for fp32/int t with fp32 W, fp64 for a .double() model.
        dt = torch.promote_types(torch.promote_types(t.dtype, self.W.dtype), torch.float32)
        proj = t.reshape(-1, 1).to(dt) * self.W.reshape(1, -1).to(dt) * (2 * math.pi)
        return self.mlp(torch.cat([proj.sin(), proj.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (id ``num_classes``) for the null / dropped label."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            # Uses the global torch RNG (as the official code): seed it for reproducible training.
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------------------
# the model


class DiTwDDTHead(nn.Module):
    """DiT^DH: encoder blocks on s-tokens (per-sample cond), DDT head on x-tokens (per-token cond = s)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        cfg = self.config = config.validate()
        d, dh, p, c = cfg.hidden_size, cfg.head_hidden_size, cfg.patch_size, cfg.in_channels
        self.in_channels, self.input_size, self.patch_size = c, cfg.input_size, p
        self.num_classes = cfg.num_classes
        self.num_encoder_blocks = cfg.depth
        self.x_embedder = PatchEmbed(p, c, dh)
        self.s_embedder = PatchEmbed(p, c, d)
        self.s_projector = nn.Linear(d, dh) if d != dh else nn.Identity()
        self.t_embedder = GaussianFourierEmbedder(d, cfg.fourier_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, d), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DDTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.eps) for _ in range(cfg.depth)]
            + [DDTBlock(dh, cfg.head_num_heads, cfg.mlp_ratio, cfg.eps) for _ in range(cfg.head_depth)])
        self.final_layer = FinalLayer(dh, p * p * c, cfg.eps)
        self.enc_feat_rope = RotaryEmbedding2D(d // cfg.num_heads, cfg.grid_size)
        self.dec_feat_rope = RotaryEmbedding2D(dh // cfg.head_num_heads, cfg.grid_size)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    def initialize_weights(self) -> None:
        """Official init (DDT.py): Linear keeps the PyTorch default; patch convs xavier-uniform with zero
        bias; label table and t-MLP weights N(0, 0.02); every adaLN output layer and the final linear zero."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_pos_embed(self.config.hidden_size, self.config.grid_size,
                                                     device=self.pos_embed.device).unsqueeze(0))
            for emb in (self.x_embedder, self.s_embedder):
                nn.init.xavier_uniform_(emb.proj.weight.view(emb.proj.weight.shape[0], -1))
                nn.init.zeros_(emb.proj.bias)
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
            for layer in [blk.adaLN_modulation[-1] for blk in self.blocks] + [
                    self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def check_latents(self, x: torch.Tensor) -> None:
        """Raise a clear error when x is not (B, C, H, W) with this model's latent shape."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"DiT expects latents of shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(x.shape)}")

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        b, p, c, g = x.shape[0], self.patch_size, self.in_channels, self.config.grid_size
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity at transport time t (t = 1 is data) for latents x (B, C, H, W) and labels y (B,)."""
        self.check_latents(x)
        t_emb = self.t_embedder(t)
        c = F.silu(t_emb + self.y_embedder(y, self.training))
        s = self.s_embedder(x) + self.pos_embed
        for blk in self.blocks[: self.num_encoder_blocks]:
            s = blk(s, c, self.enc_feat_rope)
        # Row-major (contiguous) input to s_projector, as the official t.repeat(1, N, 1) + s gives: the
        # residual stream keeps the patch-embed's transposed layout, and a GEMM on that layout rounds
        # differently (~1e-7 rel), which would break bit-parity with the official DiT^DH.
        s = self.s_projector(F.silu(t_emb.unsqueeze(1) + s).contiguous())
        h = self.x_embedder(x)
        for blk in self.blocks[self.num_encoder_blocks:]:
            h = blk(h, s, self.dec_feat_rope)
        return self.unpatchify(self.final_layer(h, s))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def config_dict(model: DiTwDDTHead) -> dict:
    """Plain-dict config, for saving next to our checkpoints."""
    return asdict(model.config)
