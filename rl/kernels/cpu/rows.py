"""Products whose every element has one defined arithmetic order: `bmm_rows` (csrc/rows.c).

    out[g, i, j] = Σ_k a[g, i, k] · b[g, k, j], products rounded to fp32, summed from +0 in
    increasing k, no fused multiply-add.

An element's bits depend on its row of a and its column of b alone, by construction (MKL's
sgemm, behind `torch.bmm`, gives no such promise: its kernel and blocking follow the shape, so
the attention kernels had to compute whole zero-padded 16-row tiles to get a decode row's
bits). With `bmm_rows` (and the C decode steps that follow its definition, csrc/*_decode.c) a
decode step computes only its live rows. Operands are read through their strides (transposed
and expanded views cost no copy).

The C source (csrc/rows.c) is built by `native.library()`. Gradients (the trainer) are plain
`torch.bmm` products: correct, not bit-identical (DESIGN.md §2, contract 6).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from rl.kernels.cpu.native import library

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.lru_cache(maxsize=1)
def _kernel():
    fn = library().bmm_rows
    fn.restype = None
    fn.argtypes = [_I64] * 4 + [_PTR, _I64, _I64, _I64] * 2 + [_PTR]
    return fn


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError("bmm_rows: CPU tensors only")
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise ValueError(f"bmm_rows: float32 operands only, got {a.dtype}, {b.dtype}")
    g, m, k = a.shape
    if b.dim() != 3 or b.shape[0] != g:
        raise ValueError(f"bmm_rows: a {list(a.shape)} needs b [{g}, {k}, N], got {list(b.shape)}")
    if b.shape[1] != k:
        raise ValueError(f"bmm_rows: inner sizes differ, a {list(a.shape)} b {list(b.shape)}")
    n = b.shape[2]
    out = torch.empty((g, m, n), dtype=torch.float32)
    if g and m and n:
        _kernel()(g, m, k, n, a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(), out.data_ptr())
    return out


class _RowsProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _product(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = torch.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = torch.bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def bmm_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [G, M, K] @ b [G, K, N], fp32, any strides -> [G, M, N] fp32, contiguous; differentiable."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _RowsProduct.apply(a, b)
    return _product(a, b)
