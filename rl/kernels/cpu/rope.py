"""Partial rotary position embedding (rotate-half / NeoX) with fp32 tables and rotation.

Every rotary layer of one forward rotates q and k at the same positions: the tables of the
last call are kept and reused for equal positions (the same function of the same values, so
the same bits; a decode step built them 2 x layers times)."""
from __future__ import annotations

import ctypes
import functools

import torch

from rl.kernels.cpu.native import library


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float):
    """cos, sin [N, rotary_dim/2] fp32 for integer positions [N]."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device) / rotary_dim
    inv_freq = (1.0 / (theta ** exponent)).float()
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return torch.cos(freqs), torch.sin(freqs)


_last_tables: tuple | None = None     # (a copy of the positions, rotary_dim, theta, cos, sin)


def _cached_tables(positions: torch.Tensor, rotary_dim: int, theta: float):
    """rope_tables, reused while the positions are equal in value to the last call's (a
    comparison of N integers instead of two transcendental passes; by value, because vLLM's
    inference tensors keep no version counter that would tell an in-place change)."""
    global _last_tables
    last = _last_tables
    if (last is not None and last[1] == rotary_dim and last[2] == theta
            and last[0].shape == positions.shape and last[0].dtype == positions.dtype
            and last[0].device == positions.device and torch.equal(last[0], positions)):
        return last[3], last[4]
    cos, sin = rope_tables(positions, rotary_dim, theta)
    _last_tables = (positions.clone(), rotary_dim, theta, cos, sin)
    return cos, sin


@functools.lru_cache(maxsize=1)
def _rows_kernel():
    fn = library().rope_rows
    fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, i64, ptr, i64, i64, ptr, ptr, ctypes.c_int, ptr]
    return fn


def rope(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """x [N, H, D], positions [N] -> x.dtype; rotates the first `rotary_dim` dims of each head.

    Elementwise per token, so invariant to batch and to prefill/decode by construction. Without
    autograd, on CPU tensors, the rotation runs in one C pass (csrc/norm_rope.c: the same fp32 operations, the
    same bits; tests/test_kernels_invariance.py compares the two forms)."""
    cos, sin = _cached_tables(positions, rotary_dim, theta)
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and x.dim() == 3
            and x.stride(-1) == 1 and not (torch.is_grad_enabled() and x.requires_grad)):
        n, h, d = x.shape
        y = torch.empty((n, h, d), dtype=x.dtype)
        _rows_kernel()(n, h, d, rotary_dim, x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(),
                       int(x.dtype == torch.float32), y.data_ptr())
        return y
    return _rope_torch(x, cos, sin, rotary_dim)


def _rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = rotary_dim // 2
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)
