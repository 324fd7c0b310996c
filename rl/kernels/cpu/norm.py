"""RMSNorm forms on CPU: row-wise, fp32 statistics, never fused with the residual add.

A row's statistic is its sum of squares, never an ATen reduction (whose order can change with
the whole tensor's shape): for rows shorter than SHORT_ROW, one `bmm` of each row with itself
([1, D] x [D, 1] per row; ATen runs products this small as one sequential loop each), else
`matmul.row_sum` (a fixed-shape product). Either way a row's bits depend only on the row.
"""
from __future__ import annotations

import torch

from rl.kernels.cpu.elementwise import sigmoid
from rl.kernels.cpu.matmul import row_sum


SHORT_ROW = 400     # ATen's bmm computes a product of fewer multiply-adds as a plain loop


def _sum_of_squares(xf: torch.Tensor) -> torch.Tensor:
    """[M, D] fp32 -> [M, 1]."""
    if xf.shape[-1] < SHORT_ROW:
        return torch.bmm(xf.unsqueeze(1), xf.unsqueeze(2)).view(-1, 1)
    return row_sum(xf * xf)[:, None]


def _normalize(x2d: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x2d.float()
    mean_sq = _sum_of_squares(xf).div_(xf.shape[-1])
    return xf * mean_sq.add_(eps).rsqrt_()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] (or any shape broadcast against x's trailing dims, e.g. one row
    per head [H, D]) -> x.dtype. Per-head q/k norm is x [N, H, D] with weight [D]."""
    d = x.shape[-1]
    y = _normalize(x.reshape(-1, d), eps).view(x.shape) * weight      # bf16 weight promotes exactly
    return y.to(x.dtype)


def gated_group_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                         num_groups: int, eps: float) -> torch.Tensor:
    """RMSNorm over `num_groups` equal groups of the last dim, times weight, times sigmoid(gate).

    x, gate [..., C] (C = H*D), weight [C] -> x.dtype; all arithmetic in fp32.
    """
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"gated_group_rms_norm: {c} channels not divisible by {num_groups} groups")
    y = _normalize(x.reshape(-1, c // num_groups), eps).reshape(-1, c)
    y = y * weight.float() * sigmoid(gate.reshape(-1, c).float())
    return y.reshape(x.shape).to(x.dtype)
