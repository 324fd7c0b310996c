"""MoE routing and expert compute on the GPU.

Router: fp32 logits from the invariant GEMM (bf16 x bf16 on tensor cores is exact products
with fp32 accumulation, i.e. the fp32 product of the bf16 values; an fp32 weight is split
into three bf16 parts), sigmoid, selection on score + expert_bias with group-limited top-k by
stable top-k (ties -> lower index, one torch.topk on unique integer keys), weights
normalised by an explicit in-order sum.

Experts: the (token, slot) pairs are sorted by expert id (stable, so by token within an
expert) and cut into BLOCK_M-row tiles that never straddle experts; one Triton kernel runs
gate and up projections of a tile together (h = silu(g) * u, g and u rounded to the model
dtype first, as the cpu backend does), a second runs the down projection, each with one
fixed tile config and ascending K blocks, so a pair's row does not depend on how many rows
its expert got or where in the tile it sits. Experts' weights are reached through a table of
pointers, so a list of per-expert parameters needs no stacking copy. A third kernel sums
each token's k expert outputs, weighted, in fp32 in slot order (= ascending expert id).
Gradients (trainer): recomputed through the stock `torch._grouped_mm` implementation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl.kernels.cpu.moe import select_experts
from rl.kernels.triton.autograd import with_reference_grad
from rl.kernels.triton.matmul import MODE_BF16, MODE_IEEE, linear, mm_acc

# 128x128 tiles: 16% faster than 64x128 for 16384 tokens on an H200, same bits (the tile shape
# does not change a row's arithmetic; bench --only moe probes the alternatives)
BLOCK_M = 128
BLOCK_N = 128
BLOCK_K = 64
UP_WARPS, DOWN_WARPS = 8, 4


def stable_topk(x: torch.Tensor, k: int):
    """Top-k along the last dim of fp32 x, ordered by value then lower index first (what a
    stable descending sort gives), via one `torch.topk` on unique int64 keys: the float's
    order-preserving integer image in the high 32 bits, the inverted index in the low 32."""
    if x.dtype != torch.float32:
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k]
    bits = (x + 0.0).contiguous().view(torch.int32)          # + 0.0: -0 and +0 tie, as in a sort
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    idx = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    keys = ordered * (1 << 32) + (0xFFFFFFFF - idx)
    _, indices = torch.topk(keys, k, dim=-1, largest=True, sorted=True)
    return x.gather(-1, indices), indices


def moe_route(x, gate_weight, expert_bias, top_k, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor):
    """x [N, Hd], gate_weight [E, Hd] -> (weights fp32 [N, k], ids int64 [N, k], logits fp32 [N, E])."""
    logits = linear(x, gate_weight, out_dtype=torch.float32)
    scores = torch.sigmoid(logits)
    weights, ids = select_experts(scores, expert_bias, top_k, n_group, topk_group, norm_topk_prob,
                                  routed_scaling_factor, topk=stable_topk)
    return weights, ids, logits


@triton.jit
def _tile_rows(order_ptr, tile_expert_ptr, tile_row_ptr, counts_ptr, estart_ptr, t, BM: tl.constexpr):
    e = tl.load(tile_expert_ptr + t)
    ec = tl.maximum(e, 0)
    local = tl.load(tile_row_ptr + t) + tl.arange(0, BM)
    ok = (local < tl.load(counts_ptr + ec)) & ((local * 0 + e) >= 0)
    srow = tl.load(estart_ptr + ec) + tl.where(ok, local, 0)
    pair = tl.load(order_ptr + srow, mask=ok, other=0)
    return e, ec, ok, srow.to(tl.int64), pair


@triton.jit
def _expert_up_kernel(x_ptr, wg_table, wu_table, h_ptr, order_ptr, tile_expert_ptr, tile_row_ptr,
                      counts_ptr, estart_ptr, TOP_K, HD, INTER, s_xm,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr):
    t = tl.program_id(0)
    e, ec, ok, srow, pair = _tile_rows(order_ptr, tile_expert_ptr, tile_row_ptr, counts_ptr, estart_ptr, t, BM)
    if e >= 0:
        tok = (pair // TOP_K).to(tl.int64)
        wg = tl.multiple_of(tl.load(wg_table + ec).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
        wu = tl.multiple_of(tl.load(wu_table + ec).to(tl.pointer_type(x_ptr.dtype.element_ty)), 16)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        c_ok = cols < INTER
        colc = tl.where(c_ok, cols, 0).to(tl.int64)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, HD, BK):
            kk = k0 + tl.arange(0, BK)
            k_ok = kk < HD
            a = tl.load(x_ptr + tok[:, None] * s_xm + kk[None, :], mask=k_ok[None, :], other=0.0)
            bg = tl.load(wg + colc[None, :] * HD + kk[:, None], mask=k_ok[:, None], other=0.0)
            bu = tl.load(wu + colc[None, :] * HD + kk[:, None], mask=k_ok[:, None], other=0.0)
            acc_g = mm_acc(a, bg, acc_g, MODE)
            acc_u = mm_acc(a, bu, acc_u, MODE)
        g = acc_g.to(x_ptr.dtype.element_ty).to(tl.float32)
        u = acc_u.to(x_ptr.dtype.element_ty).to(tl.float32)
        h = g * (1.0 / (1.0 + tl.exp(-g))) * u
        tl.store(h_ptr + srow[:, None] * INTER + cols[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=ok[:, None] & c_ok[None, :])


@triton.jit
def _expert_down_kernel(h_ptr, wd_table, y_ptr, order_ptr, tile_expert_ptr, tile_row_ptr,
                        counts_ptr, estart_ptr, HD, INTER,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr):
    t = tl.program_id(0)
    e, ec, ok, srow, pair = _tile_rows(order_ptr, tile_expert_ptr, tile_row_ptr, counts_ptr, estart_ptr, t, BM)
    if e >= 0:
        wd = tl.multiple_of(tl.load(wd_table + ec).to(tl.pointer_type(h_ptr.dtype.element_ty)), 16)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        c_ok = cols < HD
        colc = tl.where(c_ok, cols, 0).to(tl.int64)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, INTER, BK):
            kk = k0 + tl.arange(0, BK)
            k_ok = kk < INTER
            a = tl.load(h_ptr + srow[:, None] * INTER + kk[None, :], mask=k_ok[None, :], other=0.0)
            b = tl.load(wd + colc[None, :] * INTER + kk[:, None], mask=k_ok[:, None], other=0.0)
            acc = mm_acc(a, b, acc, MODE)
        tl.store(y_ptr + pair.to(tl.int64)[:, None] * HD + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=ok[:, None] & c_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, w_ptr, out_ptr, HD, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < HD
    acc = tl.load(w_ptr + n * TOP_K) * tl.load(y_ptr + (n * TOP_K) * HD + cols, mask=ok, other=0.0).to(tl.float32)
    for s in tl.static_range(1, TOP_K):
        y = tl.load(y_ptr + (n * TOP_K + s) * HD + cols, mask=ok, other=0.0).to(tl.float32)
        acc = acc + tl.load(w_ptr + n * TOP_K + s) * y
    tl.store(out_ptr + n * HD + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def expert_layout(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort pairs by expert and cut per-expert BLOCK_M tiles, without a host sync.
    -> order [P] (pair ids by expert), counts [E], estart [E], tile_expert [T] (-1: none),
       tile_row [T] (first row of the tile within its expert), T = cdiv(P, BLOCK_M) + E."""
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    tiles = (counts + block_m - 1) // block_m
    tile_cum = torch.cumsum(tiles, 0)
    estart = torch.cumsum(counts, 0) - counts
    max_tiles = triton.cdiv(flat.numel(), block_m) + num_experts
    t = torch.arange(max_tiles, device=flat.device)
    e = torch.searchsorted(tile_cum, t, right=True)
    valid = e < num_experts
    ec = e.clamp(max=num_experts - 1)
    row0 = (t - (tile_cum[ec] - tiles[ec])) * block_m
    return (order.to(torch.int32), counts.to(torch.int32), estart.to(torch.int32),
            torch.where(valid, e, -1).to(torch.int32), row0.to(torch.int32), max_tiles)


def pointer_table(weights, device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 data pointers of each expert's matrix and one of the matrices (for shape/dtype).
    `weights`: a stacked [E, out, in] tensor or a sequence of contiguous [out, in] tensors.
    Every pointer must be 16-byte aligned: the kernels declare it (`tl.multiple_of`), which is
    what lets them stream weight tiles with 16-byte async copies instead of 2-byte loads."""
    if isinstance(weights, torch.Tensor):
        if not weights[0].is_contiguous():
            raise ValueError("moe_experts: stacked expert weights must be contiguous per expert")
        e = weights.shape[0]
        step = weights.stride(0) * weights.element_size()
        if weights.data_ptr() % 16 or step % 16:
            raise ValueError("moe_experts: expert weight matrices must start on 16-byte boundaries")
        return weights.data_ptr() + torch.arange(e, device=device, dtype=torch.int64) * step, weights[0]
    first = weights[0]
    for w in weights:
        if not w.is_contiguous() or w.shape != first.shape or w.dtype != first.dtype:
            raise ValueError("moe_experts: expert weights must be contiguous with one shape and dtype")
        if w.data_ptr() % 16:
            raise ValueError("moe_experts: expert weight matrices must start on 16-byte boundaries")
    ptrs = torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64)
    return ptrs.to(device, non_blocking=True), first


def _experts_fast(x, topk_ids, topk_weights, gate_w, up_w, down_w):
    num_tokens, top_k = topk_ids.shape
    hd = x.shape[1]
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    wg_t, wg0 = pointer_table(gate_w, x.device)
    wu_t, _ = pointer_table(up_w, x.device)
    wd_t, _ = pointer_table(down_w, x.device)
    if wg0.dtype != x.dtype:
        raise ValueError(f"moe_experts: expert weights {wg0.dtype} must match x {x.dtype}")
    inter = wg0.shape[0]
    num_experts = wg_t.shape[0]
    order, counts, estart, tile_e, tile_r, max_tiles = expert_layout(topk_ids, num_experts, BLOCK_M)
    pairs = topk_ids.numel()
    mode = MODE_IEEE if x.dtype == torch.float32 else MODE_BF16
    h = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((pairs, hd), dtype=x.dtype, device=x.device)
    _expert_up_kernel[(max_tiles, triton.cdiv(inter, BLOCK_N))](
        x, wg_t, wu_t, h, order, tile_e, tile_r, counts, estart, top_k, hd, inter, x.stride(0),
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, MODE=mode, num_warps=UP_WARPS, num_stages=3)
    _expert_down_kernel[(max_tiles, triton.cdiv(hd, BLOCK_N))](
        h, wd_t, y, order, tile_e, tile_r, counts, estart, hd, inter,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, MODE=mode, num_warps=DOWN_WARPS, num_stages=3)
    w = topk_weights.float().contiguous()
    _combine_kernel[(num_tokens, triton.cdiv(hd, 1024))](y, w, out, hd, TOP_K=top_k, BLOCK=1024, num_warps=4)
    return out


def moe_experts(x, topk_ids, topk_weights, gate_w, up_w, down_w):
    """x [N, Hd]; topk_ids/topk_weights [N, k] (ids ascending); per-expert weights: stacked
    [E, I, Hd] / [E, Hd, I] tensors or sequences of [I, Hd] / [Hd, I] -> [N, Hd] in x.dtype.

    Bitwise invariant: a pair's expert rows run through fixed-shape tiles in fixed K order, and
    each token combines its k outputs in slot (= ascending expert) order in fp32."""
    grad = torch.is_grad_enabled() and (
        x.requires_grad or topk_weights.requires_grad
        or any(w.requires_grad for ws in (gate_w, up_w, down_w) for w in (ws if not isinstance(ws, torch.Tensor) else [ws])))
    if not grad:
        return _experts_fast(x, topk_ids, topk_weights, gate_w, up_w, down_w)
    from rl.kernels.stock import grouped_mm_experts
    if all(isinstance(ws, torch.Tensor) for ws in (gate_w, up_w, down_w)):
        return with_reference_grad(_experts_fast, grouped_mm_experts,
                                   (x, topk_ids, topk_weights, gate_w, up_w, down_w))
    lists = [list(ws) if not isinstance(ws, torch.Tensor) else list(ws.unbind(0)) for ws in (gate_w, up_w, down_w)]
    n_g = len(lists[0])

    def fast(x_, ids_, w_, *rest):
        ts = rest[:-1]
        return _experts_fast(x_, ids_, w_, list(ts[:n_g]), list(ts[n_g:2 * n_g]), list(ts[2 * n_g:]))

    def ref(x_, ids_, w_, *rest):
        ts = rest[:-1]
        return grouped_mm_experts(x_, ids_, w_, list(ts[:n_g]), list(ts[n_g:2 * n_g]), list(ts[2 * n_g:]))

    tensors = (x, topk_ids, topk_weights, *lists[0], *lists[1], *lists[2])
    return with_reference_grad(fast, ref, tensors, (n_g,))
