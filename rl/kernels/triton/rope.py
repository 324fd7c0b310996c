"""Partial rotary position embedding (rotate-half / NeoX), fp32 tables and rotation.

The cos/sin tables are computed per token from its integer position with torch's fp32
`cos`/`sin` (accurate libm-style device functions, elementwise), then one Triton kernel
rotates the first `rotary_dim` dims of every head in fp32 and copies the rest. Elementwise per
token, so invariant to batch and to prefill/decode split by construction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl.kernels.triton.autograd import with_reference_grad


@triton.jit(do_not_specialize=["n_tokens"])
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_tokens, num_heads, stride_x0, stride_x1,
                 HALF: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    t_ok = tok < n_tokens
    t64 = tl.where(t_ok, tok, 0).to(tl.int64)
    hi = tl.arange(0, HALF)
    x_row = x_ptr + t64 * stride_x0 + head * stride_x1
    y_row = y_ptr + (t64 * num_heads + head) * D
    c = tl.load(cos_ptr + t64[:, None] * HALF + hi[None, :], mask=t_ok[:, None], other=0.0)
    s = tl.load(sin_ptr + t64[:, None] * HALF + hi[None, :], mask=t_ok[:, None], other=0.0)
    x1 = tl.load(x_row[:, None] + hi[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(x_row[:, None] + HALF + hi[None, :], mask=t_ok[:, None], other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    tl.store(y_row[:, None] + hi[None, :], o1.to(y_ptr.dtype.element_ty), mask=t_ok[:, None])
    tl.store(y_row[:, None] + HALF + hi[None, :], o2.to(y_ptr.dtype.element_ty), mask=t_ok[:, None])
    if D > 2 * HALF:
        ri = 2 * HALF + tl.arange(0, BLOCK_D)
        r_ok = t_ok[:, None] & (ri[None, :] < D)
        rest = tl.load(x_row[:, None] + ri[None, :], mask=r_ok, other=0.0)
        tl.store(y_row[:, None] + ri[None, :], rest, mask=r_ok)


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float):
    """cos, sin [N, rotary_dim/2] fp32 for integer positions [N] (inv_freq via float64)."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device) / rotary_dim
    inv_freq = (1.0 / (theta ** exponent)).float()
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return torch.cos(freqs).contiguous(), torch.sin(freqs).contiguous()


def _rope_fast(x, cos, sin, rotary_dim):
    n, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((n, h, d), dtype=x.dtype, device=x.device)
    half = rotary_dim // 2
    block_t = 16
    if n:
        _rope_kernel[(triton.cdiv(n, block_t), h)](
            x, cos, sin, y, n, h, x.stride(0), x.stride(1), HALF=half, D=d, BLOCK_T=block_t,
            BLOCK_D=triton.next_power_of_2(max(d - rotary_dim, 1)), num_warps=4)
    return y


def _rope_ref(x, cos, sin, rotary_dim):
    half = rotary_dim // 2
    xf = x.float()
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """x [N, H, D] (may be strided), positions [N] -> contiguous [N, H, D] in x.dtype;
    rotates the first `rotary_dim` dims of each head (power of two halves), fp32 math."""
    half = rotary_dim // 2
    if rotary_dim % 2 or half & (half - 1):
        raise ValueError(f"rope: rotary_dim/2 must be a power of two, got rotary_dim={rotary_dim}")
    cos, sin = rope_tables(positions, rotary_dim, theta)
    return with_reference_grad(_rope_fast, _rope_ref, (x, cos, sin), (rotary_dim,))
