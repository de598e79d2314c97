"""Transformer pieces shared by the tokenizer's encoder, pixel decoder and semantic decoder.

Parameter names (w12/w3, qkv/proj, norm1/norm2) follow the official checkpoints so state dicts load
unchanged. ``SwiGLU`` is generic and also used by the DiT.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rectok_fast.models.rope import apply_rope

NORM_EPS = 1e-6


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """Official hidden width int(2/3 * ratio * dim): 768 -> 2048, 192 -> 512, 1152 -> 3072."""
    return int(2 / 3 * dim * mlp_ratio)


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``(a, b) = chunk(w12(x), 2)``; SiLU goes on the FIRST half."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Attention(nn.Module):
    """Multi-head self-attention; qkv output laid out [q | k | v], each head-major (h, d).

    ``rope`` is the tokenizer's (B or 1, N, 2*head_dim) table, applied to q and k; None skips it.
    qk-norm exists officially but is never enabled, so it is not implemented.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm block: x += attn(norm1(x)); x += mlp(norm2(x)). No LayerScale, dropout or drop-path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=NORM_EPS)   # registration order = official key order
        self.norm2 = nn.RMSNorm(dim, eps=NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))
