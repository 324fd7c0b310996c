"""Partial rotary position embedding (rotate-half / NeoX) with fp32 tables and rotation."""
from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float):
    """cos, sin [N, rotary_dim/2] fp32 for integer positions [N]."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device) / rotary_dim
    inv_freq = (1.0 / (theta ** exponent)).float()
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return torch.cos(freqs), torch.sin(freqs)


def rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """x [N, H, D], positions [N] -> x.dtype; rotates the first `rotary_dim` dims of each head.

    Elementwise per token, so invariant to batch and to prefill/decode by construction.
    """
    cos, sin = rope_tables(positions, rotary_dim, theta)
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = rotary_dim // 2
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)
