"""Lightning (linear) attention with per-head decay, chunk form everywhere (DESIGN.md §2 (a)).

Recurrence: S_t = λ_h S_{t-1} + k_tᵀ v_t,  o_t = (q_t · D^-0.5) S_t, with an fp32 state.
Tokens are grouped into windows of C positions aligned to absolute position 0 (window w
covers [wC, (w+1)C)). For token t at offset j in its window, with S the state at the window
start:
    o_t = ((q_t λ^{j+1}) S) + Σ_{s<=j} (q_t · k_s) λ^{j-s} v_s          (inter + intra)
and at the end of a full window  S ← λ^C S + Σ_s λ^{C-1-s} k_sᵀ v_s.
Decode keeps exactly this: the per-request state holds S at the last window boundary plus
the k/v of the ≤C-1 tokens since (fp32), and computes o_t as the window form does. Every
product is `rows.bmm_rows` (each element one sum in increasing k, whatever the shapes), over
a window's full C rows: q·kᵀ [., D] x [D, C], scores·v [., C] x [C, D], (q λ^{j+1})·S
[., D] x [D, D], and the window's state update [D, C] x [C, D]. Two forms compute this:
  - the general path (no state: the trainer's full forward, differentiable) takes query tiles
    of Q_TILE rows of a window (only the tiles that hold tokens, only full windows' state
    updates) through `bmm_rows`;
  - with a state (every rollout forward: prefill, chunked prefill, decode) one C call
    (csrc/lightning_steps.c) steps through each sequence's new tokens in order, computing a
    token's own row with the same sums, and reads and updates S and the pending k/v in place
    in the pools.
So a token's bits are the same from a full forward, prefill + decode, chunked prefill at any
split, or a recompute (tests/test_parity_prefill_decode.py).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from rl.kernels.batch import BatchMeta
from rl.kernels.cpu.native import library
from rl.kernels.cpu.rows import bmm_rows

Q_TILE = 16      # query rows per product (a window's C rows are C / Q_TILE tiles)


def decay_tables(log_decay: torch.Tensor, chunk: int):
    """fp32 tables from log λ [H]: q-decay [H, C] (λ^{j+1}), k-decay [H, C] (λ^{C-1-j}),
    intra mask [H, C, C] (λ^{j-s} for s <= j else 0), window decay [H] (λ^C)."""
    ld = log_decay.float()
    j = torch.arange(chunk, device=ld.device, dtype=torch.float32)
    q_decay = torch.exp(ld[:, None] * (j + 1.0)[None, :])
    k_decay = torch.exp(ld[:, None] * (chunk - 1.0 - j)[None, :])
    diff = j[:, None] - j[None, :]
    causal = diff >= 0
    intra = torch.where(causal[None], torch.exp(ld[:, None, None] * torch.where(causal, diff, 0.0)[None]),
                        torch.zeros((), device=ld.device))
    window = torch.exp(ld * float(chunk))
    return q_decay, k_decay, intra, window


@functools.lru_cache(maxsize=256)
def _tables(log_decay_values: tuple[float, ...], chunk: int):
    """decay_tables of a layer's (constant) decays, computed once."""
    return decay_tables(torch.tensor(log_decay_values, dtype=torch.float32), chunk)


@functools.lru_cache(maxsize=1)
def _steps_kernel():
    fn = library().lightning_steps
    fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = ([i64, ptr] + [i64] * 3 + [ptr, i64, i64] * 3 + [ptr, i64, i64, i64] * 2 + [ptr] * 6
                   + [ctypes.c_float, ctypes.c_int, ptr])
    return fn


def _token_steps(q, k, v, log_decay, batch: BatchMeta, state, c: int) -> torch.Tensor:
    """Every new token of every sequence with a state (prefill, chunked prefill, decode), one
    token after another per sequence, in one C call (csrc/lightning_steps.c): for each token the
    general path's arithmetic on its own query row (the same products, each element the sum
    `bmm_rows` defines, and the same element-wise steps), reading and updating S and the
    pending k/v in place in the pools."""
    n, h, d = q.shape
    s_pool, pend_pool = state
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("lightning_attention: a forward with a state (rollout) takes no gradients")
    for name, pool, shape in (("S", s_pool, (h, d, d)), ("pending", pend_pool, (h, c, 2 * d))):
        if pool.dtype != torch.float32 or pool.dim() != 4 or tuple(pool.shape[1:]) != shape or pool.stride(-1) != 1:
            raise ValueError(f"lightning_attention: state {name} must be float32 [slots, {', '.join(map(str, shape))}] "
                             f"with unit last stride, got {pool.dtype} {list(pool.shape)} strides {pool.stride()}")
    io = q.dtype if q.dtype in (torch.bfloat16, torch.float32) else torch.float32   # others: fp32, exact
    q, k, v = (t.to(io) if t.dtype != io else t for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q_decay, k_decay, intra_mask, window_decay = _tables(tuple(log_decay.tolist()), c)
    slots, ctx, starts = (t.to(torch.int64).contiguous()
                          for t in (batch.state_indices, batch.context_lens, batch.query_start_loc))
    low, high = torch.aminmax(slots)          # the C call writes the pools without bounds checks
    if int(low) < 0 or int(high) >= min(s_pool.shape[0], pend_pool.shape[0]):
        raise ValueError(f"lightning_attention: state slots [{int(low)}, {int(high)}] outside the "
                         f"pools ({s_pool.shape[0]} slots)")
    if int(starts[-1]) != n:
        raise ValueError(f"lightning_attention: query_start_loc ends at {int(starts[-1])}, q has {n} tokens")
    out = torch.empty((n, h, d), dtype=io)
    _steps_kernel()(batch.num_seqs, starts.data_ptr(), h, d, c,
                    q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                    v.data_ptr(), v.stride(0), v.stride(1), s_pool.data_ptr(), *s_pool.stride()[:3],
                    pend_pool.data_ptr(), *pend_pool.stride()[:3], slots.data_ptr(), ctx.data_ptr(),
                    q_decay.data_ptr(), k_decay.data_ptr(), intra_mask.data_ptr(), window_decay.data_ptr(),
                    d ** -0.5, int(io == torch.float32), out.data_ptr())
    return out


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        batch: BatchMeta, state=None, chunk_size: int = 64) -> torch.Tensor:
    """q, k, v [N, H, D] for the new tokens; log_decay [H] (log λ_h, fp32) -> o [N, H, D] q.dtype.

    `state`: None (no context: the trainer, differentiable) or a pair (S [slots, H, D, D] fp32,
    pending [slots, H, C, 2D] fp32) indexed by `batch.state_indices`, read and updated in
    place (the rollout: no gradients). A sequence with `context_lens == 0` starts from a zero
    state whatever its slot holds. Bitwise invariant to batch composition and to how a sequence
    is split into calls.
    """
    c = chunk_size
    if state is not None:
        return _token_steps(q, k, v, log_decay, batch, state, c).to(q.dtype)
    n, h, d = q.shape
    tq = Q_TILE if c % Q_TILE == 0 else c
    dev = q.device
    num_seqs = batch.num_seqs
    q_lens = batch.query_lens
    if int(batch.context_lens.max()) != 0:
        raise ValueError("lightning_attention: context_lens > 0 needs a state")
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=dev), q_lens)
    offset = torch.arange(n, device=dev) - batch.query_start_loc[:-1][seq_idx]   # position in the windows
    num_windows = max(1, -(-int(q_lens.max()) // c))
    length = num_windows * c
    heads = torch.arange(h, device=dev)[None, :]

    # k/v of each sequence's windows [B, H, length, D] fp32; positions past a sequence's last
    # token are zero
    where = (seq_idx[:, None], heads, offset[:, None])
    kw = q.new_zeros((num_seqs, h, length, d), dtype=torch.float32).index_put(where, k.float())
    vw = q.new_zeros((num_seqs, h, length, d), dtype=torch.float32).index_put(where, v.float())
    kwin = kw.unflatten(2, (num_windows, c))                   # [B, H, W, C, D]
    vwin = vw.unflatten(2, (num_windows, c))
    q_decay, k_decay, intra_mask, window_decay = _tables(tuple(log_decay.tolist()), c)

    # the state at each window start (zero at the first); a full window advances it by its k/v
    # product, computed only for full windows
    window_full = ((torch.arange(num_windows, device=dev)[None, :] + 1) * c) <= q_lens[:, None]
    full_seq, full_win = window_full.nonzero(as_tuple=True)
    if full_seq.numel():
        kf = kwin[full_seq, :, full_win] * k_decay[None, :, :, None]             # [F, H, C, D]
        kv = bmm_rows(kf.transpose(-1, -2).reshape(-1, d, c),
                       vwin[full_seq, :, full_win].reshape(-1, c, d)).view(-1, h, d, d)
    starts, s = [], q.new_zeros((num_seqs, h, d, d), dtype=torch.float32)
    for w in range(num_windows):
        starts.append(s)
        sel = (full_win == w).nonzero()[:, 0]
        if sel.numel():
            rows = full_seq[sel]
            s = s.index_put((rows,), window_decay[None, :, None, None] * s[rows] + kv[sel])

    # outputs only for the query tiles (tq rows of a window) that hold tokens
    tiles_per_window, tiles_per_seq = c // tq, length // tq
    tiles, token_tile = torch.unique(seq_idx * tiles_per_seq + offset // tq, return_inverse=True)
    t_seq, t_idx = tiles // tiles_per_seq, tiles % tiles_per_seq
    t_win, t_in = t_idx // tiles_per_window, t_idx % tiles_per_window
    u = tiles.numel()
    row = (offset % tq)[:, None]
    qt = q.new_zeros((u, h, tq, d), dtype=torch.float32)
    qt = qt.index_put((token_tile[:, None], heads, row), q.float() * (d ** -0.5))       # [U, H, tq, D]
    kt, vt = kwin[t_seq, :, t_win], vwin[t_seq, :, t_win]                               # [U, H, C, D]
    s_tiles = starts[0][t_seq] if num_windows == 1 else torch.stack(starts, 1)[t_seq, t_win]
    scores = bmm_rows(qt.reshape(-1, tq, d), kt.transpose(-1, -2).reshape(-1, d, c)).view(u, h, tq, c)
    scores = scores * intra_mask.view(h, tiles_per_window, tq, c)[:, t_in].transpose(0, 1)
    intra = bmm_rows(scores.reshape(-1, tq, c), vt.reshape(-1, c, d)).view(u, h, tq, d)
    q_dec = q_decay.view(h, tiles_per_window, tq)[:, t_in].transpose(0, 1)[..., None]  # [U, H, tq, 1]
    inter = bmm_rows((qt * q_dec).reshape(-1, tq, d), s_tiles.reshape(-1, d, d)).view(u, h, tq, d)
    out = (inter + intra)[token_tile[:, None], heads, row]     # [N, H, D]
    return out.to(q.dtype)
