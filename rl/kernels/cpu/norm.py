"""RMSNorm forms on CPU: row-wise, fp32 statistics, never fused with the residual add.

A row's statistic is its sum of squares, never an ATen reduction (whose order can change with
the whole tensor's shape): `rows.bmm_rows` of each row with itself ([1, D] x [D, 1] per row),
products rounded to fp32 and summed from +0 in increasing k, so a row's bits depend only on the
row. Without autograd (the rollout engine) RMSNorm runs as one C pass (csrc/norm_rope.c) with
the same arithmetic, so the same bits as the torch form, which the trainer keeps.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from rl.kernels.cpu.elementwise import sigmoid
from rl.kernels.cpu.native import library
from rl.kernels.cpu.rows import bmm_rows


def _sum_of_squares(xf: torch.Tensor) -> torch.Tensor:
    """[M, D] fp32 -> [M, 1]: each row's sum of squares in increasing k (differentiable)."""
    return bmm_rows(xf.unsqueeze(1), xf.unsqueeze(2)).view(-1, 1)


def _normalize(x2d: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x2d.float()
    mean_sq = _sum_of_squares(xf).div_(xf.shape[-1])
    return xf * mean_sq.add_(eps).rsqrt_()


@functools.lru_cache(maxsize=1)
def _rows_kernel():
    fn = library().rms_norm_rows
    fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, ctypes.c_float, ctypes.c_int, ptr]
    return fn


def _c_weight_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many weight rows the C form cycles through for x (0: it does not take this call)."""
    d = x.shape[-1]
    if (x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32) or x.dim() < 2
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return 0
    if weight.shape == (d,):
        return 1
    if weight.dim() == 2 and weight.shape[1] == d and x.dim() >= 3 and x.shape[-2] == weight.shape[0]:
        return weight.shape[0]                       # one row per head, x [..., H, D]
    return 0


def _rms_norm_c(x: torch.Tensor, weight: torch.Tensor, eps: float, wrows: int,
                gate_exp: torch.Tensor | None = None) -> torch.Tensor:
    """The torch form's bits in one C pass (csrc/norm_rope.c; tests/test_kernels_invariance.py
    compares the two over row lengths 1 to 4096, both dtypes). `gate_exp`: exp(-gate) fp32,
    contiguous, x's rows (the gated form)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.dtype == torch.float32 and weight.is_contiguous() else weight.float().contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype)
    _rows_kernel()(x2.shape[0], d, x2.data_ptr(), x2.stride(0), w.data_ptr(), wrows,
                   None if gate_exp is None else gate_exp.data_ptr(), eps, int(x.dtype == torch.float32), y.data_ptr())
    return y.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] (or any shape broadcast against x's trailing dims, e.g. one row
    per head [H, D]) -> x.dtype. Per-head q/k norm is x [N, H, D] with weight [D]. Without
    autograd the C form runs (the same bits, one pass)."""
    wrows = _c_weight_rows(x, weight)
    if wrows:
        return _rms_norm_c(x, weight, eps, wrows)
    return _rms_norm_torch(x, weight, eps)


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    d = x.shape[-1]
    y = _normalize(x.reshape(-1, d), eps).view(x.shape) * weight      # bf16 weight promotes exactly
    return y.to(x.dtype)


def gated_group_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                         num_groups: int, eps: float) -> torch.Tensor:
    """RMSNorm over `num_groups` equal groups of the last dim, times weight, times sigmoid(gate).

    x, gate [..., C] (C = H*D), weight [C] -> x.dtype; all arithmetic in fp32. Without autograd
    the C form runs (the same bits: ATen's exp of -gate, the rest in one pass).
    """
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"gated_group_rms_norm: {c} channels not divisible by {num_groups} groups")
    if gate.shape == x.shape and weight.shape == (c,) and not (torch.is_grad_enabled() and gate.requires_grad):
        groups, group_weight = x.reshape(*x.shape[:-1], num_groups, c // num_groups), weight.view(num_groups, -1)
        if _c_weight_rows(groups, group_weight):          # one weight row per group
            gate_exp = gate.to(torch.float32, memory_format=torch.contiguous_format, copy=True).neg_().exp_()
            return _rms_norm_c(groups, group_weight, eps, num_groups, gate_exp).view(x.shape)
    return _gated_group_rms_norm_torch(x, gate, weight, num_groups, eps)


def _gated_group_rms_norm_torch(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                                num_groups: int, eps: float) -> torch.Tensor:
    c = x.shape[-1]
    y = _normalize(x.reshape(-1, c // num_groups), eps).reshape(-1, c)
    y = y * weight.float() * sigmoid(gate.reshape(-1, c).float())
    return y.reshape(x.shape).to(x.dtype)
