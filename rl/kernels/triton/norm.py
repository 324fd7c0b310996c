"""RMSNorm forms on the GPU: row-wise Triton kernels, fp32 statistics, never fused with the
residual add.

Each row (a token's hidden vector, a head's D values, or one of `num_groups` groups) is
reduced by one program with a block shape fixed by the row length alone, so a row's bits do
not depend on the number of rows, their values or the row's position. Inputs may be strided
3-D views ([N, H, D] slices of a fused qkv projection) without a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl.kernels.triton.autograd import with_reference_grad


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, inner, stride_x0, stride_x1, stride_y0, stride_y1,
                     D, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    r = tl.where(row_ok, rows, 0).to(tl.int64)
    i, j = r // inner, r % inner
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + (i * stride_x0 + j * stride_x1)[:, None] + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / D
    inv = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = (x * inv[:, None]) * w[None, :]
    tl.store(y_ptr + (i * stride_y0 + j * stride_y1)[:, None] + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _gated_group_norm_kernel(x_ptr, g_ptr, w_ptr, y_ptr, n_rows, stride_x, stride_g, stride_y, eps,
                             GROUPS: tl.constexpr, GROUP_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gi = tl.arange(0, GROUPS)
    di = tl.arange(0, GROUP_D)
    cols = gi[:, None] * GROUP_D + di[None, :]                 # [G, GD]
    x = tl.load(x_ptr + row * stride_x + cols).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / GROUP_D
    inv = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols).to(tl.float32)
    gate = 1.0 / (1.0 + tl.exp(-g))
    y = ((x * inv[:, None]) * w) * gate
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty))


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """View x [..., D] as [A, B, D] with unit stride on D, copying only if unavoidable."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        return x
    if x.dim() == 1:
        return x.view(1, 1, -1)
    try:
        return x.view(-1, 1, x.shape[-1])
    except RuntimeError:
        return x.contiguous().view(-1, 1, x.shape[-1])


# (rows per program, warps) by padded row length; overridable for tuning (bench/kernels_gpu.py
# --only tune). A row's reduction tree depends on these, so they depend on D alone.
NORM_CONFIGS: dict[int, tuple[int, int]] = {}


def norm_config(block_d: int) -> tuple[int, int]:
    if block_d in NORM_CONFIGS:
        return NORM_CONFIGS[block_d]
    return max(1, min(16, 4096 // block_d)), (4 if block_d <= 1024 else 8)


def _rms_norm_fast(x, weight, eps):
    d = x.shape[-1]
    x3 = _as_3d(x)
    y = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    n_rows = x3.shape[0] * x3.shape[1]
    block_d = triton.next_power_of_2(d)
    rows, warps = norm_config(block_d)
    if n_rows:
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            x3, weight, y, n_rows, x3.shape[1], x3.stride(0), x3.stride(1), y.stride(0), y.stride(1),
            d, eps, ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return y.view(x.shape)


def _rms_norm_ref(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (may be a strided [N, H, D] view), weight [D] -> x.dtype, fp32 statistics.

    Bitwise invariant: a row's program shape depends only on D."""
    return with_reference_grad(_rms_norm_fast, _rms_norm_ref, (x, weight), (eps,))


def _gated_fast(x, gate, weight, num_groups, eps):
    c = x.shape[-1]
    x2, g2 = x.reshape(-1, c), gate.reshape(-1, c)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    group_d = c // num_groups
    if x2.shape[0]:
        _gated_group_norm_kernel[(x2.shape[0],)](
            x2, g2, weight, y, x2.shape[0], x2.stride(0), g2.stride(0), y.stride(0), eps,
            GROUPS=num_groups, GROUP_D=group_d, num_warps=4 if c <= 2048 else 8)
    return y.view(x.shape)


def _gated_ref(x, gate, weight, num_groups, eps):
    c = x.shape[-1]
    xf = x.float().reshape(*x.shape[:-1], num_groups, c // num_groups)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    return (y * weight.float() * torch.sigmoid(gate.float())).to(x.dtype)


def gated_group_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                         num_groups: int, eps: float) -> torch.Tensor:
    """RMSNorm over `num_groups` equal groups of the last dim, times weight, times sigmoid(gate).

    x, gate [..., C], weight [C] -> x.dtype; fp32 arithmetic; one program per row, its shape
    fixed by (C, num_groups). C / num_groups must be a power of two (Ring: 2048/4, 4096/4)."""
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"gated_group_rms_norm: {c} channels not divisible by {num_groups} groups")
    gd = c // num_groups
    if gd & (gd - 1) or num_groups & (num_groups - 1):
        raise ValueError(f"gated_group_rms_norm: group size {gd} and groups {num_groups} must be powers of two")
    return with_reference_grad(_gated_fast, _gated_ref, (x, gate, weight), (num_groups, eps))

