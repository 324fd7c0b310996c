"""Batch-invariant matrix products on CPU: `linear` (y = x @ wᵀ), whose every row's bits
depend on that row alone (not on M, the other rows, the row's position or the thread count).

Products of bf16 operands (every projection and expert, bf16 out; lm_head, router and value
head, fp32 out):
- on a CPU with AMX (this project's machines): `tiles.product`, our own AMX kernel, in which
  every element is one fixed chain of tile ops over k by construction, at every M; the
  trainer packs the weight per call, an inference engine keeps packed copies (`prepack`,
  `prepack_fused`).
- otherwise: plain `torch.mm` calls over fixed 32-row tiles, which oneDNN runs with fp32
  accumulation (measured: a 32-row tile gives the same bits with 1 to 16 threads at K up to
  4096; for K <= 256 oneDNN does not block K and every M gives a 32-row tile's bits, so there
  the rows go in one call); fp32 output through `matmul_rows` on the exactly widened weight.
Everything else (fp32 inputs): `matmul_rows`, 16-row fp32 tiles (512-column blocks when N is
larger) through `bmm_fixed(a [G, m, k], b [G, k, n])`, whose callers give fixed per-matrix
shapes; it pads G to at least 2 so ATen runs the matrices in parallel with a single-threaded
GEMM each, so each element is reduced over k by the same micro-kernel in the same order.
tests/test_kernels_invariance.py re-checks all of it on the machine it runs on. (The attention
kernels use `rows.bmm_rows`, whose per-element order is defined by its own code.)
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from rl.kernels.cpu import tiles

TILE_M = 32


def bmm_fixed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[G, m, k] @ [G, k, n] -> [G, m, n] in a's dtype; G >= 2 is enforced by padding."""
    g = a.shape[0]
    if g == 1:
        a = torch.cat([a, torch.zeros_like(a)])
        b = b.expand(2, -1, -1)
    out = torch.bmm(a, b)
    return out[:g] if g == 1 else out


def _whole_tiles(x: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] as `rows` (>= M) contiguous rows of `dtype`, zero rows appended; no copy when
    x already is that."""
    m = x.shape[0]
    if x.requires_grad and torch.is_grad_enabled():      # keep the autograd graph
        return F.pad(x.to(dtype), (0, 0, 0, rows - m))
    if m == rows and x.dtype == dtype and x.is_contiguous():
        return x
    xp = x.new_zeros((rows, x.shape[1]), dtype=dtype)     # one copy: convert into the padded buffer
    xp[:m] = x
    return xp


FP32_TILE_M = 16      # rows per fp32 product
COL_BLOCK = 512       # columns per fp32 product when N is larger (the lm_head's vocab)


def matmul_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ weight [N, K]ᵀ fp32 -> [M, N] fp32; batch-invariant in M.

    Every output element comes from one [FP32_TILE_M, K] x [K, COL_BLOCK] product (or
    [.., K] x [K, N] when N <= COL_BLOCK; the last N % COL_BLOCK columns from their own
    fixed-shape product), computed as one single-threaded GEMM inside a bmm of >= 2 matrices."""
    m, k = x.shape
    n = weight.shape[0]
    n_tiles = max(1, -(-m // FP32_TILE_M))
    xp = _whole_tiles(x, n_tiles * FP32_TILE_M, torch.float32).view(n_tiles, FP32_TILE_M, k)
    full = n // COL_BLOCK * COL_BLOCK if n > COL_BLOCK else 0
    parts = []
    if full:
        nb = full // COL_BLOCK
        blocks = weight[:full].view(nb, COL_BLOCK, k).transpose(1, 2)          # [nb, K, CB]
        if n_tiles == 1:             # decode: the column blocks are the bmm's matrices
            y = bmm_fixed(xp.expand(nb, -1, -1), blocks)                     # [nb, TM, CB]
            parts.append(y.transpose(0, 1).reshape(1, FP32_TILE_M, full))
        else:
            y = xp.new_empty((n_tiles, FP32_TILE_M, full))
            for j in range(nb):
                y[:, :, j * COL_BLOCK:(j + 1) * COL_BLOCK] = bmm_fixed(
                    xp, blocks[j].expand(n_tiles, -1, -1))
            parts.append(y)
    if full < n:
        parts.append(bmm_fixed(xp, weight[full:].t().expand(n_tiles, -1, -1)))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    return out.reshape(n_tiles * FP32_TILE_M, n)[:m]


ONE_CALL_MAX_K = 256


def bf16_tile_rows(m: int, k: int) -> int:
    """Rows per oneDNN call for a bf16 product of m rows with inner size k (see module doc)."""
    return max(1, -(-m // TILE_M)) * TILE_M if k <= ONE_CALL_MAX_K else TILE_M


def matmul_rows_bf16(x: torch.Tensor, weight: torch.Tensor | None, packed=None,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] bf16 @ weight [N, K]ᵀ bf16 -> [M, N] in out_dtype, batch-invariant in M and
    in the thread count. `packed`: the weight's packed form (then `weight` may be None); by
    default the weight's own current pack, if any. With AMX: `tiles.product` (bf16 or fp32
    out); else one fixed-shape oneDNN mm per row tile (bf16 out only)."""
    if packed is None:
        packed = _packed(weight)
    if tiles.available():
        return tiles.product(x, packed if packed is not None else tiles.pack(weight), out_dtype)
    m, k = x.shape
    tile = bf16_tile_rows(m, k)
    n_tiles = max(1, -(-m // tile))
    xp = _whole_tiles(x, n_tiles * tile, torch.bfloat16)
    if packed is not None:
        if n_tiles == 1:                 # decode: one call on the whole (padded) input
            y = _packed_linear(xp, packed, None, "none", [], "")
            return y if m == xp.shape[0] else y[:m]
        parts = [_packed_linear(xp[i * tile:(i + 1) * tile], packed, None, "none", [], "")
                 for i in range(n_tiles)]
        return torch.cat(parts)[:m]
    out = x.new_empty((n_tiles * tile, weight.shape[0]))
    w_t = weight.t()
    for i in range(n_tiles):
        rows = slice(i * tile, (i + 1) * tile)
        torch.mm(xp[rows], w_t, out=out[rows])
    return out[:m]


# -- copies derived from weights, kept for inference -------------------------------------------
# One freshness rule for every such copy (weight packs here, stacked experts in moe.py): a copy
# records the very tensors it was made from and their version counters, and is used only while
# each source is the same object at the same version. It is built only where an inference
# engine asks (`prepack`, `moe.prepack_experts`), never lazily in a forward: a trainer's weights
# change through `.data` (DeepSpeed, no version bump) or get new storage (ZeRO-3).

def keep_derived(holder: torch.Tensor, key: str, sources, value) -> None:
    """Keep `value`, made from the tensors `sources`, on `holder` under attribute `key`."""
    sources = tuple(sources)
    setattr(holder, key, (tuple(weakref.ref(t) for t in sources), tuple(t._version for t in sources), value))


def current_derived(holder: torch.Tensor, key: str, sources):
    """The value `keep_derived` left on `holder` under `key` if it was made from exactly
    `sources` (same objects, same versions now); else None (none, or stale)."""
    entry = getattr(holder, key, None)
    if entry is None:
        return None
    refs, versions, value = entry
    if len(refs) != len(sources):
        return None
    for ref, version, t in zip(refs, versions, sources):
        if ref() is not t or t._version != version:
            return None
    return value


# Both bf16 products read the weight in a re-ordered layout: the tile kernel in its VNNI tiles
# (`tiles.pack`), oneDNN in its own (re-ordered on every `torch.mm`). For a weight that does not
# change (the rollout engine between weight updates) the re-ordered copy can be kept. The
# product is the same kernel on the same tiles, so the bits are the unpacked product's
# (tests/test_kernels_invariance.py checks every model shape, 1/2/4 threads); the trainer never
# packs (the tile kernel packs per call).
_PACK_ATTR = "_lockstep_weight_pack"
# the resolved overloads: calling through the op packet costs ~20 us of Python per call
try:
    _packed_linear = torch.ops.mkldnn._linear_pointwise.default
    _pack = torch.ops.mkldnn._reorder_linear_weight.default
except (AttributeError, RuntimeError):       # a torch build without oneDNN: never pack
    _packed_linear = _pack = None


def prepack(weights) -> int:
    """Keep a packed copy (tile kernel's layout with AMX, else oneDNN's) of each 2D bf16 CPU
    weight for `linear`; returns how many. Call again after the weights change (a stale pack
    is never used, only wasted)."""
    if not _can_pack():
        return 0
    count = 0
    for w in weights:
        if w.dtype == torch.bfloat16 and w.dim() == 2 and w.device.type == "cpu":
            keep_derived(w, _PACK_ATTR, (w,), _pack_weight(w.detach()))
            count += 1
    return count


def _can_pack() -> bool:
    return tiles.available() or (_pack is not None and torch.backends.mkldnn.is_available())


def _pack_weight(w: torch.Tensor):
    """The packed form `matmul_rows_bf16` takes (tiles' layout with AMX, else oneDNN's), kept
    by the engine and read at every step: on huge pages where the kernel gives them."""
    return tiles.pack(w, huge=True) if tiles.available() else _pack(w, TILE_M)


def _packed(weight: torch.Tensor):
    if weight.requires_grad and torch.is_grad_enabled():
        return None
    return current_derived(weight, _PACK_ATTR, (weight,))


# Weights that multiply the same input (a layer's q/k/v and gate projections, an MLP's gate and
# up) can run as one product over their rows stacked: an output element does not depend on the
# weight rows beside it in the call (the same tiles over the same K; tested at the model shapes,
# 1/2 threads, packed or not), so each part's columns carry its own product's bits. The engine
# asks for it after a weight load (`prepack_fused`); only the group's packed copy is kept.
_FUSED_ATTR = "_lockstep_fused_pack"


def prepack_fused(groups) -> list[bool]:
    """Inference only: for each group of 2D bf16 CPU weights [N_i, K] (same K), keep one
    packed copy of the group stacked by rows, for `fused_linear`. Returns, per group,
    whether it was kept (the caller need not pack those weights one by one)."""
    kept = []
    for group in groups:
        group = tuple(group)
        ok = (_can_pack() and len(group) >= 1
              and all(w.dtype == torch.bfloat16 and w.dim() == 2 and w.device.type == "cpu"
                      and w.shape[1] == group[0].shape[1] for w in group))
        if ok:
            with torch.inference_mode(False):
                stacked = torch.cat([w.detach() for w in group])
            keep_derived(group[0], _FUSED_ATTR, group, _pack_weight(stacked))
        kept.append(ok)
    return kept


def fused_linear(x: torch.Tensor, weights) -> list[torch.Tensor] | None:
    """[x @ w.T for w in weights] (bf16) as one product where `prepack_fused` left a current
    packed copy of exactly this group and no gradient is needed; else None (the caller runs its
    projections one by one). The parts are column slices of one output."""
    if x.dtype != torch.bfloat16 or (torch.is_grad_enabled()
                                     and (x.requires_grad or any(w.requires_grad for w in weights))):
        return None
    packed = current_derived(weights[0], _FUSED_ATTR, weights)
    if packed is None:
        return None
    lead = x.shape[:-1]
    y = matmul_rows_bf16(x.reshape(-1, x.shape[-1]), None, packed)
    y = y.reshape(*lead, y.shape[-1])
    parts, start = [], 0
    for w in weights:
        parts.append(y[..., start:start + w.shape[0]])
        start += w.shape[0]
    return parts


def _forward(x2d: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if x2d.dtype == weight.dtype == torch.bfloat16 and tiles.available():
        y = matmul_rows_bf16(x2d, weight, out_dtype=torch.float32 if out_dtype != torch.bfloat16 else out_dtype)
        return y.to(out_dtype)
    if x2d.dtype == weight.dtype == out_dtype == torch.bfloat16:
        return matmul_rows_bf16(x2d, weight)
    return matmul_rows(x2d, _fp32_weight(weight)).to(out_dtype)


_WIDE_ATTR = "_lockstep_fp32_copy"


def _fp32_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in fp32 for `matmul_rows` (exact widening). For a weight an inference engine
    prepacked (it changes only through a new load and `prepack`), the widened copy is kept
    instead of made at every call (the small model's lm_head: ~130 MB per decode step)."""
    if weight.dtype == torch.float32:
        return weight
    wide = current_derived(weight, _WIDE_ATTR, (weight,))
    if wide is None:
        wide = weight.float()
        if _packed(weight) is not None:
            keep_derived(weight, _WIDE_ATTR, (weight,), wide)
    return wide


class _InvariantLinear(torch.autograd.Function):
    """Forward: the invariant tiled product. Backward: plain GEMMs in the input dtype —
    gradients must be correct, not bit-identical (contract 6), and the plain path is several
    times faster (AMX bf16 on this CPU)."""

    @staticmethod
    def forward(ctx, x2d, weight, out_dtype):
        ctx.save_for_backward(x2d, weight)
        with torch.no_grad():
            return _forward(x2d, weight, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out.to(x2d.dtype) @ weight.to(x2d.dtype)).to(x2d.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out.to(weight.dtype).t() @ x2d.to(weight.dtype)).to(weight.dtype)
        return grad_x, grad_w, None


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ weightᵀ. x [..., K] (bf16/fp32), weight [N, K]; fp32 accumulate.

    Bitwise invariant to the number of rows, their values and positions, and the thread
    count (1, 2 and 4 threads, tested). Output dtype: `out_dtype` or x.dtype.
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    out_dtype = out_dtype or x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        y = _InvariantLinear.apply(x2d, weight, out_dtype)
    else:
        y = _forward(x2d, weight, out_dtype)
    return y.reshape(*lead, weight.shape[0])
