"""The tokenizer's 2D rotary position embedding, reproduced bit for bit (spec 1.3).

The official table is *not* a proper rotation: frequencies are block-concatenated
``[f_0..f_{D/4-1}, f_0..f_{D/4-1}]`` per axis while ``rotate_half`` pairs ADJACENT channels
(2m, 2m+1), so the two channels of a pair usually carry different angles. Checkpoints were trained
with this, so we keep it; any fused kernel must use the per-channel table as stored here.
(The DiT uses a different, proper EVA-style RoPE; do not share this one with it.)
"""
from __future__ import annotations

import math

import torch

MAX_FREQ, MIN_FREQ = 7.0, 7e-4


def rope_frequencies_1d(head_dim: int, max_freq: float = MAX_FREQ, min_freq: float = MIN_FREQ,
                        dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(head_dim/2,) block-concatenated geometric band from max_freq down to min_freq.

    Computed with the same op sequence as the official code (power of a linspace in ``dtype``),
    because a different but mathematically equal formula would not be bit-exact.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    band = max_freq * (max_freq / min_freq) ** torch.linspace(0, -1, head_dim // 4, dtype=dtype, device=device)
    return torch.cat([band, band])


def rope_angles(head_dim: int, grid_h: int, grid_w: int, dtype: torch.dtype = torch.float32,
                device=None) -> torch.Tensor:
    """(grid_h*grid_w, head_dim) angles; channels [0, D/2) follow the row, [D/2, D) the column.

    Coordinates are normalized to [0, 1] per axis (linspace), tokens in row-major order.
    """
    f = rope_frequencies_1d(head_dim, dtype=dtype, device=device)
    freqs_2d = torch.zeros(2, head_dim, dtype=dtype, device=device)
    freqs_2d[0, : head_dim // 2] = f
    freqs_2d[1, head_dim // 2:] = f
    freqs_2d = freqs_2d * 2 * math.pi
    rows = torch.linspace(0, 1, grid_h, dtype=dtype, device=device)
    cols = torch.linspace(0, 1, grid_w, dtype=dtype, device=device)
    coords = torch.cartesian_prod(rows, cols)          # (N, 2) = [row, col], row-major
    return coords @ freqs_2d                            # one term of each dot product is exactly 0


def rope_table(head_dim: int, grid_h: int, grid_w: int, dtype: torch.dtype = torch.float32,
               device=None) -> torch.Tensor:
    """(1, N, 2*head_dim) = [cos | sin], the official non-persistent ``rope_tensor`` buffer."""
    angle = rope_angles(head_dim, grid_h, grid_w, dtype=dtype, device=device)
    return torch.cat([angle.cos(), angle.sin()], dim=-1).unsqueeze(0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Adjacent pairs (2m, 2m+1) -> (-x_{2m+1}, x_{2m})."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with table (B or 1, N, 2D): ``x * cos + rotate_half(x) * sin``."""
    if table.shape[-1] != 2 * x.shape[-1] or table.shape[-2] != x.shape[-2]:
        raise ValueError(f"RoPE table {tuple(table.shape)} does not fit q/k of shape {tuple(x.shape)} "
                         f"(expected (*, {x.shape[-2]}, {2 * x.shape[-1]}))")
    cos, sin = table.unsqueeze(1).chunk(2, dim=-1)
    return x * cos + rotate_half(x) * sin
