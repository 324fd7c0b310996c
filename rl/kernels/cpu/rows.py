"""Products whose every element has one defined arithmetic order: `bmm_rows` (csrc/rows.c).

    out[g, i, j] = Σ_k a[g, i, k] · b[g, k, j], products rounded to fp32, summed from +0 in
    increasing k, no fused multiply-add.

An element's bits depend on its row of a and its column of b alone, by construction (MKL's
sgemm, behind `torch.bmm`, gives no such promise: its kernel and blocking follow the shape, so
the attention kernels had to compute whole zero-padded 16-row tiles to get a decode row's
bits). With `bmm_rows` a decode step computes only its live rows; operands are read through
their strides (transposed and expanded views cost no copy), b's matrices optionally found by
offset from a pool (`b_offsets`, `pool_offsets`), and b may be bf16 (widened exactly on the fly).

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
    fn.argtypes = [_I64, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR,
                   ctypes.c_int, _PTR]
    return fn


def pool_offsets(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Element offsets, for `bmm_rows`' b_offsets, of the [slot, head] matrices of a pool
    [slots, H, ...] (any strides), in (slot, head) order: int64 [len(slots) * H]."""
    heads = torch.arange(pool.shape[1], device=pool.device)
    return (slots.to(torch.int64)[:, None] * pool.stride(0) + heads[None, :] * pool.stride(1)).reshape(-1)


def _product(a: torch.Tensor, b: torch.Tensor, b_offsets: torch.Tensor | None,
             b_rows: torch.Tensor | None = None) -> torch.Tensor:
    if a.device.type != "cpu" or b.device.type != "cpu":
        raise ValueError("bmm_rows: CPU tensors only")
    if a.dtype != torch.float32 or b.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"bmm_rows: a must be float32 and b float32 or bfloat16, got {a.dtype}, {b.dtype}")
    g, m, k = a.shape
    if b_offsets is None:
        if b.dim() != 3 or b.shape[0] != g:
            raise ValueError(f"bmm_rows: a {list(a.shape)} needs b [{g}, {k}, N], got {list(b.shape)}")
        bk, n = b.shape[1:]
        strides = b.stride()
    else:
        if b.dim() != 2 or b_offsets.dtype != torch.int64 or b_offsets.shape != (g,):
            raise ValueError(f"bmm_rows: with b_offsets (int64 [{g}]) b is one matrix [K, N]; got b "
                             f"{list(b.shape)}, b_offsets {b_offsets.dtype} {list(b_offsets.shape)}")
        bk, n = b.shape
        strides = (0,) + b.stride()
        if g:          # every matrix read must lie inside b's storage
            low, high = torch.aminmax(b_offsets)
            extent = (bk - 1) * b.stride(0) + (n - 1) * b.stride(1)
            room = b.untyped_storage().nbytes() // b.element_size() - b.storage_offset()
            if int(low) + b.storage_offset() < 0 or int(high) + extent >= room:
                raise ValueError(f"bmm_rows: b_offsets [{int(low)}, {int(high)}] reach outside b's storage")
        b_offsets = b_offsets.contiguous()
    if bk != k:
        raise ValueError(f"bmm_rows: inner sizes differ, a {list(a.shape)} b {list(b.shape)}")
    if b_rows is not None:
        if b_rows.dtype != torch.int64 or b_rows.shape != (g,):
            raise ValueError(f"bmm_rows: b_rows must be int64 [{g}], got {b_rows.dtype} {list(b_rows.shape)}")
        b_rows = b_rows.contiguous()
    out = torch.empty((g, m, n), dtype=torch.float32)
    if g and m and n:
        _kernel()(g, m, k, n, a.data_ptr(), *a.stride(), b.data_ptr(), *strides,
                  None if b_offsets is None else b_offsets.data_ptr(),
                  None if b_rows is None else b_rows.data_ptr(), int(b.dtype == torch.bfloat16), out.data_ptr())
    return out


class _RowsProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _product(a, b, None)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = torch.bmm(grad, b.float().transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = torch.bmm(a.transpose(1, 2), grad).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def bmm_rows(a: torch.Tensor, b: torch.Tensor, b_offsets: torch.Tensor | None = None,
             b_rows: torch.Tensor | None = None) -> torch.Tensor:
    """a [G, M, K] fp32 @ b [G, K, N] fp32 or bf16 (any strides) -> [G, M, N] fp32, contiguous.

    With `b_offsets` (int64 [G]) b is one [K, N] view and product g reads the matrix with b's
    strides that starts b_offsets[g] elements after b's first element (`pool_offsets`).
    With `b_rows` (int64 [G]) rows k >= b_rows[g] of matrix g read as +0.0 (memory past a
    sequence's end in a cache page, never read). Differentiable in a and b when called with
    neither."""
    if (b_offsets is None and b_rows is None and torch.is_grad_enabled()
            and (a.requires_grad or b.requires_grad)):
        return _RowsProduct.apply(a, b)
    return _product(a, b, b_offsets, b_rows)
