"""Causal GQA softmax attention over a paged KV cache: one Triton kernel for prefill and decode.

A program owns one tile of BLOCK_M query rows of one sequence and one KV head; the rows are
(token, q-head-of-the-group) pairs, so a decode step packs the GROUP query heads of a KV head
into one tile. Every row walks its sequence's keys in blocks of BLOCK_N logical positions
starting at position 0, in order, with the same online-softmax update (running max, rescale,
sum, P·V accumulate in fp32). A block that is wholly masked for a row leaves that row's
state exactly unchanged (max unchanged, alpha = exp(0) = 1, p = 0), so a row's bits do not
depend on which other rows share its tile, how far the tile walks, the batch, the
prefill/decode split, chunked-prefill boundaries or the page layout. No split-KV. The tile
and block shapes are constants of the module; the kernel is compiled without FMA
contraction, so the masked and unmasked block paths and the paged and unpaged variants
compute with identical roundings. New K/V are written to the cache (cache dtype =
model dtype) before the kernel reads them; without a cache (the trainer) K/V are read from
the inputs, which are the same values.

Tiles are launched longest-walk first (scheduling only). Scores are kept in log2 units
(`EXP2`), the same for every row of every call.

Gradients (trainer, no cache): recomputed through torch SDPA on padded sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rl.kernels.batch import BatchMeta
from rl.kernels.triton.autograd import with_reference_grad
from rl.kernels.triton.matmul import MODE_BF16, MODE_IEEE, mm_acc

LOG2E = 1.4426950408889634
BLOCK_M = 64     # query rows (token x head-in-group) per tile
BLOCK_N = 64     # keys per block, aligned to position 0
NUM_WARPS = 4
NUM_STAGES = 3
# Scores pre-scaled by log2(e) and exp2 instead of exp: one multiply less per score, which
# without FMA contraction is a separate instruction; -23% prefill time on an H200 (3 stages:
# another -15% prefill, -7% decode; bench --only tune). Same bits for prefill and decode, as
# both run this kernel.
EXP2 = True


@triton.jit
def _attn_block(acc, m_i, l_i, q, k, v, p, qpos, scale, MASKED: tl.constexpr, MODE: tl.constexpr,
                USE_EXP2: tl.constexpr):
    s = mm_acc(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), dtype=tl.float32), MODE) * scale
    if MASKED:
        s = tl.where(p[None, :] <= qpos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if USE_EXP2:
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
    else:
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    acc = mm_acc(pr.to(v.dtype), v, acc * alpha[:, None], MODE)
    return acc, m_new, l_i


@triton.jit
def _load_kv(k_ptr, v_ptr, cache_ptr, bt_ptr, seq, start, kvh, p, kv_end, d,
             s_kn, s_kh, s_vn, s_vh, s_cb, s_ch, s_cs, s_bt,
             D: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr):
    p_ok = p < kv_end
    if PAGED:
        page = tl.load(bt_ptr + seq * s_bt + p // PAGE, mask=p_ok, other=0).to(tl.int64)
        base = cache_ptr + page * s_cb + kvh * s_ch + (p % PAGE).to(tl.int64) * s_cs
        k = tl.load(base[:, None] + d[None, :], mask=p_ok[:, None], other=0.0)
        v = tl.load(base[:, None] + D + d[None, :], mask=p_ok[:, None], other=0.0)
    else:
        row = (start + tl.where(p_ok, p, 0)).to(tl.int64)
        k = tl.load(k_ptr + row[:, None] * s_kn + kvh * s_kh + d[None, :], mask=p_ok[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] * s_vn + kvh * s_vh + d[None, :], mask=p_ok[:, None], other=0.0)
    return k, v


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, cache_ptr, o_ptr, tile_seq_ptr, tile_tok_ptr, qsl_ptr, ctx_ptr, bt_ptr,
                 s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, s_on, s_oh, s_cb, s_ch, s_cs, s_bt, scale,
                 GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PAGE: tl.constexpr, PAGED: tl.constexpr, MODE: tl.constexpr, USE_EXP2: tl.constexpr):
    # Tiles run last-first: a sequence's late tiles walk the most keys, so starting them first
    # leaves short tiles for the tail of the launch (scheduling only; no arithmetic changes).
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    if seq >= 0:
        tok0 = tl.load(tile_tok_ptr + tile)
        start = tl.load(qsl_ptr + seq)
        qlen = tl.load(qsl_ptr + seq + 1) - start
        ctx = tl.load(ctx_ptr + seq)
        TOKS: tl.constexpr = BLOCK_M // GROUP
        r = tl.arange(0, BLOCK_M)
        tok = tok0 + r // GROUP
        head = kvh * GROUP + r % GROUP
        row_ok = (tok < qlen) & (r < TOKS * GROUP)
        last_tok = tl.minimum(tok0 + TOKS, qlen) - 1
        tok = tl.where(row_ok, tok, last_tok)          # padding rows repeat a real row
        qpos = ctx + tok
        d = tl.arange(0, D)
        q_rows = (start + tok).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * s_qn + head[:, None] * s_qh + d[None, :])
        kv_end = ctx + last_tok + 1
        n_open = (ctx + tok0 + 1) // BLOCK_N            # blocks visible to every row of the tile
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
        # Fully visible blocks skip the mask. A block can be fully visible in one tile and
        # partly masked in another; both paths compute identically only because the kernel is
        # compiled without FMA contraction (with it, the unmasked path fused the score scale
        # into the exp argument and 1 element in 10^6 differed on an H200).
        for blk in range(0, n_open):
            p = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            k, v = _load_kv(k_ptr, v_ptr, cache_ptr, bt_ptr, seq, start, kvh, p, kv_end, d,
                            s_kn, s_kh, s_vn, s_vh, s_cb, s_ch, s_cs, s_bt, D, PAGE, PAGED)
            acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, k, v, p, qpos, scale, False, MODE, USE_EXP2)
        for blk in range(n_open, tl.cdiv(kv_end, BLOCK_N)):
            p = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            k, v = _load_kv(k_ptr, v_ptr, cache_ptr, bt_ptr, seq, start, kvh, p, kv_end, d,
                            s_kn, s_kh, s_vn, s_vh, s_cb, s_ch, s_cs, s_bt, D, PAGE, PAGED)
            acc, m_i, l_i = _attn_block(acc, m_i, l_i, q, k, v, p, qpos, scale, True, MODE, USE_EXP2)
        out = acc / l_i[:, None]
        tl.store(o_ptr + q_rows[:, None] * s_on + head[:, None] * s_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, s_kn, s_kh, s_vn, s_vh, s_cb, s_ch, s_cs,
                     PAGE: tl.constexpr, D: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + n)
    if slot >= 0:
        d = tl.arange(0, D)
        base = cache_ptr + (slot // PAGE) * s_cb + h * s_ch + (slot % PAGE) * s_cs
        k = tl.load(k_ptr + n.to(tl.int64) * s_kn + h * s_kh + d)
        v = tl.load(v_ptr + n.to(tl.int64) * s_vn + h * s_vh + d)
        tl.store(base + d, k.to(cache_ptr.dtype.element_ty))
        tl.store(base + D + d, v.to(cache_ptr.dtype.element_ty))


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store K/V of new tokens at their slots. kv_cache [blocks, Hkv, block_size, 2D]."""
    n, hkv, d = k.shape
    if n:
        _write_kv_kernel[(n, hkv)](k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0),
                                   v.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
                                   PAGE=kv_cache.shape[2], D=d)


def _tiles(batch: BatchMeta, n_tokens: int, toks: int):
    """Per-tile (sequence or -1, first token) for a grid of cdiv(N, toks) + B tiles, no host sync."""
    q_lens = batch.query_lens
    num_seqs = batch.num_seqs
    per_seq = (q_lens + toks - 1) // toks
    cum = torch.cumsum(per_seq, 0)
    max_tiles = triton.cdiv(n_tokens, toks) + num_seqs
    t = torch.arange(max_tiles, device=q_lens.device)
    seq = torch.searchsorted(cum, t, right=True)
    valid = seq < num_seqs
    seq_c = seq.clamp(max=num_seqs - 1)
    tok0 = (t - (cum[seq_c] - per_seq[seq_c])) * toks
    return torch.where(valid, seq, -1).to(torch.int32), tok0.to(torch.int32), max_tiles


def _attention_fast(q, k, v, batch: BatchMeta, kv_cache, scale):
    n, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if d & (d - 1):
        raise ValueError(f"softmax_attention: head_dim {d} must be a power of two")
    if group > BLOCK_M:
        raise ValueError(f"softmax_attention: {group} query heads per KV head exceed the tile")
    o = torch.empty((n, hq, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return o
    paged = kv_cache is not None
    if paged:
        write_kv(kv_cache, k, v, batch.slot_mapping)
        cache, bt = kv_cache, batch.block_table
        cs = (cache.stride(0), cache.stride(1), cache.stride(2))
        page, s_bt = cache.shape[2], bt.stride(0)
    else:
        if int(batch.context_lens.max()) != 0:
            raise ValueError("softmax_attention: context_lens > 0 needs a kv_cache")
        cache, bt, cs, page, s_bt = q, batch.query_start_loc, (0, 0, 0), 1, 0
    tile_seq, tile_tok, max_tiles = _tiles(batch, n, BLOCK_M // group)
    mode = MODE_IEEE if q.dtype == torch.float32 else MODE_BF16
    _attn_kernel[(max_tiles, hkv)](
        q, k, v, cache, o, tile_seq, tile_tok, batch.query_start_loc, batch.context_lens, bt,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), *cs, s_bt, scale * LOG2E if EXP2 else scale,
        GROUP=group, D=d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PAGE=page, PAGED=paged, MODE=mode, USE_EXP2=EXP2,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=False)
    return o


def _attention_ref(q, k, v, batch: BatchMeta, kv_cache, scale):
    """Differentiable reference (no cache): padded per-sequence causal SDPA."""
    n, hq, d = q.shape
    group = hq // k.shape[1]
    q_lens = batch.query_lens
    num_seqs = batch.num_seqs
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), q_lens)
    local = torch.arange(n, device=q.device) - batch.query_start_loc[:-1][seq_idx]
    t = int(q_lens.max())

    def pad(x):
        out = x.new_zeros((num_seqs, t) + x.shape[1:])
        return out.index_put((seq_idx, local), x).transpose(1, 2)

    qp = pad(q)
    kp = pad(k).repeat_interleave(group, dim=1)
    vp = pad(v).repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale)
    return o.transpose(1, 2)[seq_idx, local]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BatchMeta,
                      kv_cache: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] for the new tokens -> o [N, Hq, D] in q.dtype.

    With `kv_cache` ([blocks, Hkv, block_size, 2D]) new K/V are written at
    `batch.slot_mapping` and keys are read through `batch.block_table`; without it the
    sequences have no context and k/v are all their keys. Bitwise invariant to batch
    composition, row position, prefill/decode split, chunked prefill and page layout.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if kv_cache is not None:
        return _attention_fast(q, k, v, batch, kv_cache, scale)
    return with_reference_grad(_attention_fast, _attention_ref, (q, k, v), (batch, None, scale))
