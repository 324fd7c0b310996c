"""Lightning (linear) attention with per-head decay, chunk form everywhere (DESIGN.md §2 (a)).

Recurrence: S_t = λ_h S_{t-1} + k_tᵀ v_t,  o_t = (q_t · D^-0.5) S_t, with an fp32 state.
Tokens are grouped into windows of C positions aligned to absolute position 0 (window w
covers [wC, (w+1)C)). For token t at offset j in its window, with S the state at the window
start:
    o_t = ((q_t λ^{j+1}) S) + Σ_{s<=j} (q_t · k_s) λ^{j-s} v_s          (inter + intra)
and at the end of a full window  S ← λ^C S + Σ_s λ^{C-1-s} k_sᵀ v_s.
Decode keeps exactly this: the per-request state holds S at the last window boundary plus
the k/v of the ≤C-1 tokens since (fp32), and computes o_t as the window form does, with the
same fixed-shape products (`bmm_fixed` over [C, D] tiles). So a token's bits are the same
from a full forward, prefill + decode, chunked prefill at any split, or a recompute.
"""
from __future__ import annotations

import torch

from rl.kernels.batch import BatchMeta
from rl.kernels.cpu.matmul import bmm_fixed


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


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        batch: BatchMeta, state=None, chunk_size: int = 64) -> torch.Tensor:
    """q, k, v [N, H, D] for the new tokens; log_decay [H] (log λ_h, fp32) -> o [N, H, D] q.dtype.

    `state`: None (no context: the trainer) or a pair (S [slots, H, D, D] fp32,
    pending [slots, H, C, 2D] fp32) indexed by `batch.state_indices`, read and updated in
    place. A sequence with `context_lens == 0` starts from a zero state whatever its slot
    holds. Bitwise invariant to batch composition and to how a sequence is split into calls.
    """
    n, h, d = q.shape
    c = chunk_size
    dev = q.device
    num_seqs = batch.num_seqs
    q_lens, ctx = batch.query_lens, batch.context_lens
    pend_lens = ctx % c
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=dev), q_lens)
    local = torch.arange(n, device=dev) - batch.query_start_loc[:-1][seq_idx]
    offset = local + pend_lens[seq_idx]                       # position inside the windows
    used = pend_lens + q_lens                                 # window positions in use
    num_windows = max(1, -(-int(used.max()) // c))
    length = num_windows * c

    zeros_state = q.new_zeros((num_seqs, h, d, d), dtype=torch.float32)
    if state is None:
        if int(ctx.max()) != 0:
            raise ValueError("lightning_attention: context_lens > 0 needs a state")
        s0 = zeros_state
        kw = q.new_zeros((num_seqs, length, h, d), dtype=torch.float32)
        vw = torch.zeros_like(kw)
    else:
        s_pool, pend_pool = state
        fresh = (ctx == 0)[:, None, None, None]
        s0 = torch.where(fresh, zeros_state, s_pool[batch.state_indices])
        pend = pend_pool[batch.state_indices]                  # [B, H, C, 2D]
        keep = torch.arange(c, device=dev)[None, :] < pend_lens[:, None]
        pend = torch.where(keep[:, None, :, None], pend, torch.zeros((), device=dev))
        kw = q.new_zeros((num_seqs, length, h, d), dtype=torch.float32)
        vw = torch.zeros_like(kw)
        kw[:, :c] = pend[..., :d].transpose(1, 2)
        vw[:, :c] = pend[..., d:].transpose(1, 2)
    kw = kw.index_put((seq_idx, offset), k.float())
    vw = vw.index_put((seq_idx, offset), v.float())
    qw = q.new_zeros((num_seqs, length, h, d), dtype=torch.float32)
    qw = qw.index_put((seq_idx, offset), q.float() * (d ** -0.5))

    q_decay, k_decay, intra_mask, window_decay = decay_tables(log_decay, c)
    # [B, H, W, C, D]
    qw, kw, vw = (t.view(num_seqs, num_windows, c, h, d).permute(0, 3, 1, 2, 4) for t in (qw, kw, vw))
    g = num_seqs * h * num_windows
    scores = bmm_fixed(qw.reshape(g, c, d), kw.transpose(-1, -2).reshape(g, d, c))
    scores = scores.view(num_seqs, h, num_windows, c, c) * intra_mask[None, :, None]
    intra = bmm_fixed(scores.reshape(g, c, c), vw.reshape(g, c, d)).view(num_seqs, h, num_windows, c, d)

    # state at the start of each window, sequentially; only full windows advance it
    kv_update = bmm_fixed((kw * k_decay[None, :, None, :, None]).transpose(-1, -2).reshape(g, d, c),
                          vw.reshape(g, c, d)).view(num_seqs, h, num_windows, d, d)
    window_full = ((torch.arange(num_windows, device=dev)[None, :] + 1) * c) <= used[:, None]
    starts, s = [], s0
    for w in range(num_windows):
        starts.append(s)
        advanced = window_decay[None, :, None, None] * s + kv_update[:, :, w]
        s = torch.where(window_full[:, w, None, None, None], advanced, s)
    s_start = torch.stack(starts, dim=2)                       # [B, H, W, D, D]
    inter = bmm_fixed((qw * q_decay[None, :, None, :, None]).reshape(g, c, d), s_start.reshape(g, d, d))
    out = inter.view(num_seqs, h, num_windows, c, d) + intra
    out = out.permute(0, 2, 3, 1, 4).reshape(num_seqs, length, h, d)

    if state is not None:
        with torch.no_grad():
            rem = used % c
            last = torch.clamp(used - rem, max=length - c)      # start of the partial window
            idx = last[:, None] + torch.arange(c, device=dev)[None, :]
            kw_flat = kw.permute(0, 2, 3, 1, 4).reshape(num_seqs, length, h, d)
            vw_flat = vw.permute(0, 2, 3, 1, 4).reshape(num_seqs, length, h, d)
            new_pend = torch.cat([kw_flat[torch.arange(num_seqs)[:, None], idx],
                                  vw_flat[torch.arange(num_seqs)[:, None], idx]], -1)  # [B, C, H, 2D]
            live = torch.arange(c, device=dev)[None, :] < rem[:, None]
            new_pend = torch.where(live[:, :, None, None], new_pend, torch.zeros((), device=dev))
            s_pool[batch.state_indices] = s
            pend_pool[batch.state_indices] = new_pend.transpose(1, 2).contiguous()
    return out[seq_idx, offset].to(q.dtype)
