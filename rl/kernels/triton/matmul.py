"""Batch-invariant GEMM on the GPU: one persistent Triton kernel, one config per (N, K).

`linear(x [..., K], weight [N, K])` computes y = x Wᵀ with fp32 accumulation. Every output
element is reduced over K by the same program shape: BLOCK_K-wide K blocks in ascending
order, each a fixed sequence of tensor-core steps, no split-K. The tile shape depends only on
(N, K, dtypes), never on M, so a row's bits do not depend on how many rows share the call, on
their values, or on where the row sits in its tile (M is not even specialised on).

Precision (DESIGN.md §2 rule 5, "no TF32 for fp32 inputs"):
  - bf16 x bf16: bf16 tensor cores, exact products, fp32 accumulate (lm_head, router).
  - exactly one fp32 operand: it is split into three bf16 parts (hi + mid + lo carry its 24
    mantissa bits); three bf16 products against the exact bf16 operand, fp32 accumulate —
    fp32-accurate on tensor cores.
  - fp32 x fp32: IEEE fp32 FMA dot (`input_precision="ieee"`), slow but exact-rule.
Backward (trainer only): plain torch matmuls; gradients need be correct, not invariant.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

MODE_BF16, MODE_SPLIT_A, MODE_SPLIT_B, MODE_IEEE = 0, 1, 2, 3


@triton.jit
def split3(x):
    """fp32 [.., ..] -> three bf16 parts whose fp32 sum is x to ~2^-24 relative."""
    hi = x.to(tl.bfloat16)
    r = x - hi.to(tl.float32)
    mid = r.to(tl.bfloat16)
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def split_dot_a(a, b, acc, PARTS: tl.constexpr):
    """acc += a @ b for fp32 a and bf16 b: a split into PARTS (2 or 3) bf16 parts, smallest
    part first. PARTS=3 is fp32-accurate; PARTS=2 keeps ~16 mantissa bits of a."""
    a_hi, a_mid, a_lo = split3(a)
    if PARTS == 3:
        acc = tl.dot(a_lo, b, acc)
    acc = tl.dot(a_mid, b, acc)
    acc = tl.dot(a_hi, b, acc)
    return acc


@triton.jit
def split_dot_b(a, b, acc, PARTS: tl.constexpr):
    """acc += a @ b for bf16 a and fp32 b (b split like `split_dot_a`)."""
    b_hi, b_mid, b_lo = split3(b)
    if PARTS == 3:
        acc = tl.dot(a, b_lo, acc)
    acc = tl.dot(a, b_mid, acc)
    acc = tl.dot(a, b_hi, acc)
    return acc


@triton.jit
def mm_acc(a, b, acc, MODE: tl.constexpr):
    """acc += a @ b under the precision MODE (see module docstring)."""
    if MODE == 3:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif MODE == 1:
        acc = split_dot_a(a, b, acc, 3)
    elif MODE == 2:
        acc = split_dot_b(a, b, acc, 3)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile index -> (pid_m, pid_n), GROUP_M row tiles side by side (L2 reuse of B)."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_m = (tile // num_pid_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group_size)
    pid_n = (tile % num_pid_in_group) // group_size
    return pid_m, pid_n


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                 NUM_PROGS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, MODE: tl.constexpr,
                 FLATTEN: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    offs_k0 = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, num_tiles, NUM_PROGS, flatten=FLATTEN):
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
        cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            k_ok = offs_k < K
            a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                        mask=k_ok[:, None], other=0.0)
            acc = mm_acc(a, b, acc, MODE)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel_tma(a_desc, b_desc, c_ptr, M, N, K, stride_cm, stride_cn,
                     NUM_PROGS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr,
                     WARP_SPEC: tl.constexpr):
    """bf16 x bf16 only: the same K walk as `_gemm_kernel`, tiles brought by the TMA engine
    (out-of-range rows and K columns arrive as zeros, like the masked loads' `other=0`)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    for tile in tl.range(pid, num_tiles, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = b_desc.load([pid_n * BLOCK_N, k0])
            acc = tl.dot(a, b.T, acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def precision_mode(a_dtype: torch.dtype, b_dtype: torch.dtype) -> int:
    a32, b32 = a_dtype == torch.float32, b_dtype == torch.float32
    if a32 and b32:
        return MODE_IEEE
    if a32:
        return MODE_SPLIT_A
    if b32:
        return MODE_SPLIT_B
    if a_dtype != b_dtype:
        raise ValueError(f"linear: unsupported dtype pair {a_dtype} x {b_dtype}")
    return MODE_BF16


def gemm_config(n: int, k: int, mode: int) -> dict:
    """The one config for (N, K, precision mode); deliberately independent of M."""
    if mode == MODE_IEEE:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    if mode in (MODE_SPLIT_A, MODE_SPLIT_B):
        return dict(BLOCK_M=128, BLOCK_N=64 if n <= 512 else 128, BLOCK_K=64, GROUP_M=8,
                    num_warps=8, num_stages=3)
    # bf16: the tile shape never changes a bit (the per-element k16 tensor-core steps do not
    # depend on it: 128x256, 128x128, 64x256, 64x128, 64x64, 128x64 and BK 128 gave the bits
    # of the shipped config on an H200), only the speed; H200 timings (kernels_gpu_h200_tune1.json):
    #   N >= 4096 (qkv 6144, lm_head): 128x256, 4 stages (3 stages: 1-13% slower, by M).
    #   2048 <= N < 4096: 64x256, 4 stages: at M <= 64 10-30% faster than 128x128 with 4 stages
    #   (more programs at small M), within 5% from M = 256 up.
    #   narrower N: 128x128, 4 stages (more N tiles for small M).
    if n >= 4096:
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if n >= 2048:
        return dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor needs a 16-byte aligned base and row stride and unit column stride."""
    return (t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def matmul_nt(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """a [M, K] @ b[N, K]ᵀ -> [M, N] out_dtype through the invariant kernel."""
    m, k = a.shape
    n = b.shape[0]
    mode = precision_mode(a.dtype, b.dtype)
    cfg = dict(config or gemm_config(n, k, mode))
    c = torch.empty((m, n), device=a.device, dtype=out_dtype)
    if m == 0:
        return c
    per_sm = cfg.pop("PROGS_PER_SM", 1)
    tma = cfg.pop("TMA", False)
    flatten = cfg.pop("FLATTEN", False)
    warp_spec = cfg.pop("WARP_SPEC", False)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    dev = a.device.index if a.device.type == "cuda" else 0
    progs = max(1, min(per_sm * num_sms(dev), tiles))
    if tma and mode == MODE_BF16 and _tma_ok(a) and _tma_ok(b):
        a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        b_desc = TensorDescriptor(b, [n, k], [b.stride(0), 1], [cfg["BLOCK_N"], cfg["BLOCK_K"]])
        _gemm_kernel_tma[(progs,)](a_desc, b_desc, c, m, n, k, c.stride(0), c.stride(1), progs,
                                   FLATTEN=flatten, WARP_SPEC=warp_spec, **cfg)
    else:
        _gemm_kernel[(progs,)](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                               c.stride(0), c.stride(1), progs, MODE=mode, FLATTEN=flatten, **cfg)
    return c


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, out_dtype):
        ctx.save_for_backward(x2d, weight)
        return matmul_nt(x2d, weight, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x2d, weight = ctx.saved_tensors
        # same-dtype operands: cuBLAS in that dtype (fp32 accumulate); mixed: fp32
        dt = x2d.dtype if x2d.dtype == weight.dtype else torch.float32
        g = grad.to(dt)
        dx = (g @ weight.to(dt)).to(x2d.dtype) if ctx.needs_input_grad[0] else None
        dw = (g.t() @ x2d.to(dt)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ weightᵀ. x [..., K] (bf16/fp32), weight [N, K] -> [..., N] in `out_dtype` or x.dtype.

    Bitwise invariant to the number of rows, their values and positions (one config per (N, K)).
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    y = _Linear.apply(x2d, weight, out_dtype or x.dtype)
    return y.reshape(*lead, weight.shape[0])
