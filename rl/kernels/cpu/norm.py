"""RMSNorm forms on CPU: row-wise, fp32 statistics, never fused with the residual add.

A row's statistic is its sum of squares through `matmul.row_sum` (a fixed-shape product),
never an ATen reduction, whose order can change with the whole tensor's shape.
"""
from __future__ import annotations

import torch

from rl.kernels.cpu.elementwise import sigmoid
from rl.kernels.cpu.matmul import row_sum


def _normalize(x2d: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x2d.float()
    mean_sq = row_sum(xf * xf)[:, None].div_(xf.shape[-1])
    return xf * mean_sq.add_(eps).rsqrt_()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> x.dtype. Per-head q/k norm is x [N, H, D] with weight [D]."""
    d = x.shape[-1]
    y = _normalize(x.reshape(-1, d), eps) * weight           # bf16 weight promotes exactly
    return y.reshape(x.shape).to(x.dtype)


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
