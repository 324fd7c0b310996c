"""Causal GQA softmax attention over a paged KV cache: one kernel for prefill and decode.

Every query row walks its sequence's keys in fixed blocks of BLOCK_K logical positions,
starting at position 0, whatever the call shape:
  1. scores = (q · k) * scale per (TILE_Q-row tile, BLOCK_K block) via `rows.bmm_rows` (each
     element one sum in increasing d, whatever the shapes); a tile holds the query rows of one
     sequence and KV head in (position, head-in-group) order;
  2. the row max over all visible keys (a max is exact in any order);
  3. p = exp(s - max), zero where masked; each block's row sum from +0 in position order
     (`_sums_in_order`), accumulated block by block, in order;
  4. o = Σ_blocks p_b @ v_b, accumulated block by block, in order; o / sum.
Masked keys contribute exactly +0.0, so a row's bits do not depend on how many padded rows or
blocks share the call: a decode row equals the same row inside a full prefill, chunked prefill
at any split, or a recompute after preemption. K/V are written to the cache (in the cache
dtype) before attention reads them; without a cache (the trainer), K/V are used as given,
which is the same values because the cache dtype is the model dtype. Calls with a cache of
pages of whole key blocks (vLLM's: every rollout forward, prefill and decode) take
`_paged_rows`: the same per-block arithmetic on each new token's query rows and its own
visible key blocks only, read in place in the cache, summed as here, in two C calls
(csrc/attention_rows.c) around ATen's exp.
"""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from rl.kernels.batch import BatchMeta
from rl.kernels.cpu.native import library
from rl.kernels.cpu.rows import bmm_rows

TILE_Q = 16
BLOCK_K = 64          # csrc/attention_rows.c's BK
Z_FLOATS = 1 << 23    # scores held at once by `_paged_rows` (32 MB)
_C_DTYPES = (torch.bfloat16, torch.float32)


def _ceil_to(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store K/V of new tokens. kv_cache [blocks, Hkv, block_size, 2D] (K in [..., :D], V after)."""
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    kv = torch.cat([k[keep], v[keep]], dim=-1).to(kv_cache.dtype)
    kv_cache[slots // block_size, :, slots % block_size] = kv


def _gather_pages(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  length: int) -> torch.Tensor:
    """Logical K/V [B, Hkv, length, 2D] in the cache dtype from pages; values at positions >=
    seq_len are zero, keys there are whatever the pages hold (attention masks them). Reads only
    the `length` positions, not whole pages (vLLM's pages can be 1024 tokens): when a page holds
    whole BLOCK_K-position blocks, one gather of BLOCK_K-row runs, else one row gather."""
    blocks_total, hkv, block_size, d2 = kv_cache.shape
    num_seqs = block_table.shape[0]
    if kv_cache.is_contiguous() and block_size % BLOCK_K == 0 and length % BLOCK_K == 0:
        runs_per_page = block_size // BLOCK_K
        start = torch.arange(0, length, BLOCK_K, device=kv_cache.device)
        page = torch.clamp(start // block_size, max=block_table.shape[1] - 1)
        blocks = block_table[:, page].long()                          # [B, n_blocks]
        heads = torch.arange(hkv, device=kv_cache.device)
        runs = ((blocks[:, None, :] * hkv + heads[None, :, None]) * runs_per_page
                + (start % block_size // BLOCK_K)[None, None, :])     # [B, Hkv, n_blocks]
        kv = kv_cache.view(-1, BLOCK_K * d2).index_select(0, runs.reshape(-1))
    elif kv_cache.is_contiguous():
        t = torch.arange(length, device=kv_cache.device)
        page = torch.clamp(t // block_size, max=block_table.shape[1] - 1)
        blocks = block_table[:, page].long()                          # [B, length]
        heads = torch.arange(hkv, device=kv_cache.device)
        rows = (blocks[:, None, :] * hkv + heads[None, :, None]) * block_size + (t % block_size)[None, None, :]
        kv = kv_cache.view(blocks_total * hkv * block_size, d2).index_select(0, rows.reshape(-1))
    else:
        t = torch.arange(length, device=kv_cache.device)
        page = torch.clamp(t // block_size, max=block_table.shape[1] - 1)
        kv = kv_cache[block_table[:, page].long(), :, t % block_size].transpose(1, 2)
    kv = kv.reshape(num_seqs, hkv, length, d2)
    # p = 0 at positions past seq_len, and 0 * garbage could be NaN: zero those values (in the
    # cache dtype, before widening; only from the shortest sequence's length on). The mask
    # selects whole (sequence, position) rows of the contiguous buffer, so the fill runs
    # over rows instead of a strided, broadcast element mask.
    first = min(int(seq_lens.min()), length)
    if first < length:
        t_tail = torch.arange(first, length, device=kv_cache.device)
        past = t_tail[None, :] >= seq_lens[:, None]                  # [B, length - first]
        if kv.is_contiguous():      # fill whole (sequence, head, position) rows by index:
            seq, pos = past.nonzero(as_tuple=True)                   # ~2x faster than the mask
            heads = torch.arange(hkv, device=kv.device)
            rows = (seq[:, None] * hkv + heads[None, :]) * length + (pos + first)[:, None]
            kv.view(-1, d2)[:, d2 // 2:].index_fill_(0, rows.reshape(-1), 0.0)
        else:
            kv[:, :, first:, d2 // 2:].masked_fill_(past[:, None, :, None], 0.0)
    return kv


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, length: int):
    """Logical K/V [B, Hkv, length, D] in fp32 from pages (see `_gather_pages`)."""
    kv = _gather_pages(kv_cache, block_table, seq_lens, length).float()
    d2 = kv.shape[-1]
    return kv[..., : d2 // 2], kv[..., d2 // 2:]


def _key_blocks(kv: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hkv, L, 2D] (cache dtype) -> keys transposed per block [B*Hkv, n_blocks, D, BLOCK_K]
    and values [B*Hkv, n_blocks, BLOCK_K, D], both fp32 and contiguous: the products' operands,
    each made by one widening copy."""
    b, hkv, length, d2 = kv.shape
    d = d2 // 2
    blocks = kv.view(b * hkv, n_blocks, BLOCK_K, d2)
    k_t = torch.empty((b * hkv, n_blocks, d, BLOCK_K), dtype=torch.float32, device=kv.device)
    k_t.copy_(blocks[..., :d].transpose(-1, -2))
    v = torch.empty((b * hkv, n_blocks, BLOCK_K, d), dtype=torch.float32, device=kv.device)
    v.copy_(blocks[..., d:])
    return k_t, v


def _paged_row_indices(batch: BatchMeta, hkv: int, hq: int, block_size: int, d2: int):
    """What `_paged_rows` derives from the split and the block table alone, the same for every
    softmax layer of a call (same heads, page size and head size): per (sequence, key block)
    pair and KV head the element offset of its BLOCK_K-position run in the cache [P*Hkv]; per
    query token its first pair, its key-block count, its position and position + 1 [N] each;
    and the token ranges of the calls, (start, end, most key blocks), each with a z buffer of
    at most Z_FLOATS (a long prefill's scores are not held all at once)."""
    dev = batch.context_lens.device
    have = (batch.seq_lens + BLOCK_K - 1) // BLOCK_K           # key blocks per sequence
    n_blocks = int(have.max())
    seq_of, blk_of = (torch.arange(n_blocks, device=dev)[None, :] < have[:, None]).nonzero(as_tuple=True)
    start = blk_of * BLOCK_K
    page = batch.block_table[seq_of, start // block_size].long()
    heads = torch.arange(hkv, device=dev)
    runs = (page[:, None] * hkv + heads[None, :]) * (block_size // BLOCK_K) + (start % block_size // BLOCK_K)[:, None]
    seq_first = have.cumsum(0) - have
    pos = batch.positions()
    first = torch.repeat_interleave(seq_first, batch.query_lens)
    count = pos // BLOCK_K + 1
    rows_per_call = max(1, Z_FLOATS // (hq * n_blocks * BLOCK_K))
    calls = [(r0, min(r0 + rows_per_call, pos.numel())) for r0 in range(0, pos.numel(), rows_per_call)]
    calls = [(r0, r1, int(count[r0:r1].max())) for r0, r1 in calls]
    return ((runs * (BLOCK_K * d2)).reshape(-1).contiguous(), first.contiguous(), count.contiguous(),
            pos.contiguous(), (pos + 1).contiguous(), calls)


def _check_runs(run_at: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """The C kernels read the cache by these offsets without bounds checks: every run must lie
    inside it (a block table naming a page the cache does not have is an error, not a read)."""
    low, high = torch.aminmax(run_at)
    if int(low) < 0 or int(high) + BLOCK_K * kv_cache.shape[-1] > kv_cache.numel():
        raise ValueError(f"softmax_attention: the block table names pages outside the KV cache "
                         f"({kv_cache.shape[0]} pages of {kv_cache.shape[2]} positions)")


@functools.lru_cache(maxsize=1)
def _row_kernels():
    lib = library()
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    scores, combine = lib.attn_rows_scores, lib.attn_rows_combine
    scores.restype = combine.restype = None
    scores.argtypes = [i64] * 5 + [ptr, i64, i64, i32, ptr, i32, ptr, ptr, ptr, ptr, ctypes.c_float, ptr]
    combine.argtypes = [i64] * 5 + [ptr, ptr, i32, ptr, ptr, ptr, ptr, i32, ptr]
    return scores, combine


def _paged_rows(q: torch.Tensor, batch: BatchMeta, kv_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """Every new token's query rows (its K/V and its sequence's context already in the cache)
    with the general path's arithmetic, computed on that token's rows and its own visible key
    blocks only, read in place in the cache, in two C calls (csrc/attention_rows.c) around
    ATen's exp: scores minus the row max, p = exp, then the block sums and PV products summed
    block by block in the general path's order (with the +0.0 of the blocks a row lacks)."""
    n, hq, d = q.shape
    _, hkv, block_size, d2 = kv_cache.shape
    group = hq // hkv
    run_at, first, count, pos, lens, calls = batch.derived(
        ("paged_rows", hkv, hq, block_size, d2), lambda: _paged_row_indices(batch, hkv, hq, block_size, d2))
    _check_runs(run_at, kv_cache)
    q = q if q.stride(-1) == 1 else q.contiguous()
    cache_fp32, io_fp32 = int(kv_cache.dtype == torch.float32), int(q.dtype == torch.float32)
    scores_fn, combine_fn = _row_kernels()
    out = torch.empty((n, hq, d), dtype=q.dtype)
    for r0, r1, n_blocks in calls:
        z = torch.empty((r1 - r0, hq, n_blocks * BLOCK_K), dtype=torch.float32)
        scores_fn(r1 - r0, hkv, group, d, n_blocks, q[r0:].data_ptr(), q.stride(0), q.stride(1), io_fp32,
                  kv_cache.data_ptr(), cache_fp32, run_at.data_ptr(), first[r0:].data_ptr(), count[r0:].data_ptr(),
                  pos[r0:].data_ptr(), scale, z.data_ptr())
        p = z.exp_()
        combine_fn(r1 - r0, hkv, group, d, n_blocks, p.data_ptr(), kv_cache.data_ptr(), cache_fp32, run_at.data_ptr(),
                   first[r0:].data_ptr(), count[r0:].data_ptr(), lens[r0:].data_ptr(), io_fp32, out[r0:].data_ptr())
    return out


def _sums_in_order(p: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of fp32 p [..., K] -> [...]: each row summed from +0 in increasing
    order (`bmm_rows` with a ones column), the sums `_paged_rows` computes."""
    k = p.shape[-1]
    ones = torch.ones((1, k, 1), dtype=torch.float32, device=p.device)
    return bmm_rows(p.reshape(1, -1, k), ones).reshape(p.shape[:-1])


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: BatchMeta,
                      kv_cache: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] for the new tokens -> o [N, Hq, D] in q.dtype.

    With `kv_cache` ([blocks, Hkv, block_size, 2D]) new K/V are written at
    `batch.slot_mapping` and keys are read through `batch.block_table`; without it the
    sequences have no context (`context_lens == 0`) and k/v are all their keys.
    Bitwise invariant to batch composition, row position, prefill/decode split, page layout.
    """
    n, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    q_lens, seq_lens = batch.query_lens, batch.seq_lens
    num_seqs = batch.num_seqs
    if (kv_cache is not None and kv_cache.is_contiguous() and kv_cache.shape[2] % BLOCK_K == 0
            and q.dtype in _C_DTYPES and kv_cache.dtype in _C_DTYPES):     # the rollout's calls
        write_kv(kv_cache, k, v, batch.slot_mapping)
        return _paged_rows(q, batch, kv_cache, scale)
    # one new token per sequence (decode): the rows need no scatter; same operands, same bits
    decode = kv_cache is not None and n == num_seqs and batch.is_decode()
    len_k = _ceil_to(int(seq_lens.max()), BLOCK_K)
    n_blocks = len_k // BLOCK_K
    len_q = 1 if decode else int(q_lens.max())
    rows = _ceil_to(len_q * group, TILE_Q)       # query rows per (sequence, kv head), (t, g) order
    if not decode:
        seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), q_lens)
        local = torch.arange(n, device=q.device) - batch.query_start_loc[:-1][seq_idx]
    if kv_cache is not None:
        write_kv(kv_cache, k, v, batch.slot_mapping)
        k_t, v_blocks = _key_blocks(_gather_pages(kv_cache, batch.block_table, seq_lens, len_k), n_blocks)
    else:
        if int(batch.context_lens.max()) != 0:
            raise ValueError("softmax_attention: context_lens > 0 needs a kv_cache")
        kv = q.new_zeros((num_seqs, len_k, hkv, 2 * d), dtype=k.dtype)
        kv = kv.index_put((seq_idx, local), torch.cat([k, v], -1)).transpose(1, 2)
        k_t, v_blocks = _key_blocks(kv.contiguous(), n_blocks)

    # queries: [B, Hkv, rows, D], row r = (t, g) for t < len_q, then zero rows up to a whole
    # tile (a decode step of a GQA group fills one tile instead of `group` mostly empty ones)
    if decode:
        q_pad = F.pad(q.float().view(num_seqs, hkv, group, d), (0, 0, 0, rows - group))
        q_pos = batch.context_lens.view(num_seqs, 1)          # the new token's position
    else:
        q_pad = q.new_zeros((num_seqs, len_q, hq, d), dtype=torch.float32)
        q_pad = q_pad.index_put((seq_idx, local), q.float())
        q_pad = q_pad.view(num_seqs, len_q, hkv, group, d).transpose(1, 2).reshape(num_seqs, hkv, len_q * group, d)
        q_pad = F.pad(q_pad, (0, 0, 0, rows - len_q * group))
        q_pos = torch.full((num_seqs, len_q), -1, dtype=torch.int64, device=q.device)
        q_pos[seq_idx, local] = batch.positions()
    n_tiles = rows // TILE_Q
    q_rows = q_pad.reshape(num_seqs * hkv, n_tiles, 1, TILE_Q, d)

    g = num_seqs * hkv * n_tiles * n_blocks
    a = q_rows.expand(-1, -1, n_blocks, -1, -1).reshape(g, TILE_Q, d)
    b = k_t[:, None].expand(-1, n_tiles, -1, -1, -1).reshape(g, d, BLOCK_K)
    scores = bmm_rows(a, b).view(num_seqs, hkv, n_tiles, n_blocks, TILE_Q, BLOCK_K)
    # element-wise steps only on the tile rows that hold queries (a decode tile holds `group`
    # of TILE_Q): per element the arithmetic is the same, so the bits are too
    live = min(TILE_Q, len_q * group)
    scores = scores[..., :live, :] * scale

    # mask: key position <= query position (and the row is a real query)
    row_pos = F.pad(q_pos[:, :, None].expand(-1, -1, group).reshape(num_seqs, len_q * group),
                    (0, rows - len_q * group), value=-1).view(num_seqs, 1, n_tiles, 1, TILE_Q, 1)
    key_pos = torch.arange(len_k, device=q.device).view(1, 1, 1, n_blocks, 1, BLOCK_K)
    visible = key_pos <= row_pos[..., :live, :]
    neg_inf = torch.tensor(float("-inf"), device=q.device)
    scores = torch.where(visible, scores, neg_inf)
    row_max = scores.amax(dim=(3, 5), keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros((), device=q.device))
    p = torch.where(visible, torch.exp(scores - row_max), torch.zeros((), device=q.device))

    block_sums = _sums_in_order(p)                             # [B, Hkv, tiles, blocks, live]
    pv = bmm_rows(F.pad(p, (0, 0, 0, TILE_Q - live)).reshape(g, TILE_Q, BLOCK_K),
                   v_blocks[:, None].expand(-1, n_tiles, -1, -1, -1).reshape(g, BLOCK_K, d))
    pv = pv.view(num_seqs, hkv, n_tiles, n_blocks, TILE_Q, d)[..., :live, :]
    denom, out = block_sums[:, :, :, 0], pv[:, :, :, 0]
    for blk in range(1, n_blocks):                             # fixed order: block 0, 1, 2...
        denom = denom + block_sums[:, :, :, blk]
        out = out + pv[:, :, :, blk]
    denom = torch.where(denom > 0, denom, torch.ones((), device=q.device))
    out = out / denom[..., None]                               # [B, Hkv, tiles, live, D]
    out = out.reshape(num_seqs, hkv, n_tiles * live, d)[:, :, :len_q * group]
    if decode:
        return out.reshape(num_seqs, hq, d).to(q.dtype)
    out = out.reshape(num_seqs, hkv, len_q, group, d).transpose(1, 2).reshape(num_seqs, len_q, hq, d)
    return out[seq_idx, local].to(q.dtype)
