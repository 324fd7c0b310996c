"""bf16 products on AMX tiles with one defined order per element (csrc/tiles.c).

    out[i, j] = Σ over 32-wide k blocks, in increasing k, of TDPBF16PS(x[i, block], w[j, block])
    in an fp32 accumulator from +0; out in fp32, or rounded to bf16.

An element's bits depend on its own row of x, its own row of w and K, by construction: not on
how many rows share the call, where the row sits, the column tiling or the thread count (the
kernel is single-threaded). This is `linear`'s product for bf16 operands wherever the process
has AMX (`available`): projections and experts (bf16 out) and the fp32-output products of bf16
operands (lm_head, router, value head) — the trainer and the rollout engine run the same
kernel at every M. The weight is packed into VNNI tiles first (`pack`: the rollout engine keeps
the packed copy, the trainer packs per call). The weight is read from memory once per call, in
chunks of column groups that stay in L2 while every 16-row block of x passes them: decode
steps stream their weights at memory speed, prefill and training reuse each chunk from cache.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from rl.kernels.cpu import amx
from rl.kernels.cpu.malloc import huge_pages
from rl.kernels.cpu.native import library

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class Packed:
    """A bf16 weight [n, k] in the kernel's tile layout (uint16 storage, `tiles_pack`)."""
    __slots__ = ("data", "n", "k")

    def __init__(self, data: torch.Tensor, n: int, k: int):
        self.data, self.n, self.k = data, n, k


@functools.lru_cache(maxsize=1)
def _functions():
    lib = library()
    size, pack_fn, product, groups = lib.tiles_packed_size, lib.tiles_pack, lib.tiles_product, lib.tiles_product_groups
    size.restype, size.argtypes = _I64, [_I64, _I64]
    pack_fn.restype, pack_fn.argtypes = None, [_I64, _I64, _PTR, _I64, _PTR]
    product.restype = ctypes.c_int
    product.argtypes = [_I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, ctypes.c_int]
    groups.restype = ctypes.c_int
    groups.argtypes = [_I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, ctypes.c_int]
    return size, pack_fn, product, groups


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """This process may run the kernel: the CPU has AMX-BF16 and the OS granted AMX (the cpu
    backend asks when it loads). Fixed for the process's life once true."""
    return bool(amx.supported() and amx.permitted())


def pack(weight: torch.Tensor, huge: bool = False) -> Packed:
    """weight [n, k] bf16 (any row stride, unit column stride) -> its packed copy; `huge`: on
    huge pages where the kernel gives them (a copy the engine keeps and streams every step)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError(f"tiles.pack: a 2D bf16 CPU weight, got {weight.dtype} {list(weight.shape)} on {weight.device}")
    w = weight.detach()
    if w.stride(1) != 1:
        w = w.contiguous()
    n, k = w.shape
    size, pack_fn = _functions()[:2]
    with torch.inference_mode(False):          # a plain tensor also under vLLM's inference mode
        data = torch.empty(size(n, k), dtype=torch.int16)
    if huge:
        huge_pages(data)                       # before the first write
    pack_fn(n, k, w.data_ptr(), w.stride(0), data.data_ptr())
    return Packed(data, n, k)


def product(x: torch.Tensor, packed: Packed, out_dtype: torch.dtype) -> torch.Tensor:
    """x [m, k] bf16 @ packed weight [n, k]ᵀ -> [m, n] in out_dtype (bf16 or fp32)."""
    m, k = x.shape
    if x.dtype != torch.bfloat16 or k != packed.k:
        raise ValueError(f"tiles.product: x must be bf16 [M, {packed.k}], got {x.dtype} {list(x.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"tiles.product: out_dtype bf16 or fp32, got {out_dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty((m, packed.n), dtype=out_dtype)
    if m and packed.n:
        if _functions()[2](m, packed.n, k, x.data_ptr(), x.stride(0), packed.data.data_ptr(), out.data_ptr(),
                           out.stride(0), int(out_dtype == torch.float32)) != 0:
            raise MemoryError(f"tiles.product: no scratch memory for a [{m}, {k}] operand")
    return out


PART_ROWS = 64      # a part of a packed weight is itself packed contiguously if its rows are a multiple


def product_groups(x: torch.Tensor, counts: list[int], packed: Packed, parts: int,
                   out_dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
    """x [sum(counts), k] bf16, rows grouped: rows of group g times part g of the packed weight
    (its rows split into `parts` equal parts, e.g. a MoE layer's stacked experts) -> [rows,
    n / parts], the same bits as `product` of each group with its part, in one call. With
    `rows` (int64 [sum(counts)]), output row r is the product of x's row rows[r] (x [T, k]):
    the gather `x[rows]` done on the way."""
    n, k = packed.n // parts, packed.k
    total = sum(counts)
    if packed.n != n * parts or n % PART_ROWS or len(counts) != parts:
        raise ValueError(f"tiles.product_groups: {packed.n} weight rows in {parts} parts of a multiple of "
                         f"{PART_ROWS} rows, {len(counts)} counts")
    if (x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != k or (rows is None and x.shape[0] != total)
            or out_dtype not in (torch.bfloat16, torch.float32)):
        raise ValueError(f"tiles.product_groups: x must be bf16 [{total}, {k}], got {x.dtype} {list(x.shape)}")
    if rows is not None:
        if rows.dtype != torch.int64 or rows.shape != (total,):
            raise ValueError(f"tiles.product_groups: rows must be int64 [{total}], got {rows.dtype} {list(rows.shape)}")
        rows = rows.contiguous()
        if total:                          # the C call reads x's rows without bounds checks
            low, high = torch.aminmax(rows)
            if int(low) < 0 or int(high) >= x.shape[0]:
                raise ValueError(f"tiles.product_groups: rows [{int(low)}, {int(high)}] outside x's {x.shape[0]} rows")
    if x.stride(1) != 1:
        x = x.contiguous()
    sizes = torch.tensor(counts, dtype=torch.int64)
    out = torch.empty((total, n), dtype=out_dtype)
    if total and _functions()[3](parts, sizes.data_ptr(), n, k, x.data_ptr(), x.stride(0),
                                 None if rows is None else rows.data_ptr(), packed.data.data_ptr(),
                                 out.data_ptr(), out.stride(0), int(out_dtype == torch.float32)) != 0:
        raise MemoryError("tiles.product_groups: no scratch memory")
    return out
