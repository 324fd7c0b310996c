"""Lightning (linear) attention with per-head decay on the GPU, chunk form everywhere
(DESIGN.md §2 design (a)).

Recurrence: S_t = λ_h S_{t-1} + k_tᵀ v_t, o_t = (q_t · D^-0.5) S_t, fp32 state. Tokens are
grouped into windows of C positions aligned to absolute position 0. For token t at offset j
in its window, with S the state at the window start:
    o_t = λ^{j+1}·scale·(q_t S) + Σ_{s<=j} (q_t·k_s)·λ^{j-s}·scale · v_s
and at the end of a full window S ← λ^C S + Σ_s kᵀ_s (λ^{C-1-s} v_s).

One kernel, grid (sequence, head, V-block): a program walks its sequence's windows in order,
holding S[:, V-block] in fp32 registers. Decode and chunked prefill are the same kernel: the
per-request state holds S at the last window boundary plus the fp32 k/v of the ≤C-1 tokens
since (`pending`); the program rebuilds the partial window from them and computes every row
with the same [C, C] / [C, D] tiles, so a token's bits are the same from a full forward,
prefill + decode, chunked prefill at any split, or a recompute. Rows of a window that are not
(yet) there are zero and contribute exact zeros.

Precision: q·kᵀ on bf16 tensor cores (exact products, fp32 accumulate); products with an
fp32 operand (the state S, the decayed scores P, the decayed values λ^{C-1-s} v_s) split that
operand into SPLIT_PARTS bf16 parts (3 = fp32-accurate). fp32 model inputs use IEEE fp32 dots.
Gradients (trainer, no state): fla's `chunk_simple_gla` with `g_gamma` when installed, else a
torch chunk-form reference; correct, not bit-identical.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rl.kernels.batch import BatchMeta
from rl.kernels.cpu.lightning import decay_tables as cpu_decay_tables
from rl.kernels.triton.autograd import with_reference_grad
from rl.kernels.triton.matmul import MODE_BF16, MODE_IEEE, split_dot_a, split_dot_b

BLOCK_V = 64
SPLIT_PARTS = 3
NUM_WARPS = 4     # 8 warps: 1 program an SM at 255 registers; 4: 2 programs, 35% faster (H200)
NUM_STAGES = 1


@triton.jit
def _mm_f32a(a, b, acc, MODE: tl.constexpr, PARTS: tl.constexpr):
    if MODE == 3:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = split_dot_a(a, b, acc, PARTS)
    return acc


@triton.jit
def _mm_f32b(a, b, acc, MODE: tl.constexpr, PARTS: tl.constexpr):
    if MODE == 3:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = split_dot_b(a, b, acc, PARTS)
    return acc


@triton.jit
def _lightning_kernel(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, pend_ptr, sidx_ptr, qsl_ptr, ctx_ptr,
                      qdec_ptr, kdec_ptr, intra_ptr, wdec_ptr,
                      s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, H,
                      D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr,
                      MODE: tl.constexpr, PARTS: tl.constexpr):
    seq = tl.program_id(0)
    h = tl.program_id(1)
    vb = tl.program_id(2)
    start = tl.load(qsl_ptr + seq)
    qlen = tl.load(qsl_ptr + seq + 1) - start
    if HAS_STATE:
        ctx = tl.load(ctx_ptr + seq)
    else:
        ctx = start * 0
    if qlen > 0:
        pend = ctx % C
        used = pend + qlen
        n_win = tl.cdiv(used, C)
        n_full = used // C
        ci = tl.arange(0, C)
        di = tl.arange(0, D)
        vi = vb * BV + tl.arange(0, BV)
        q_decay = tl.load(qdec_ptr + h * C + ci)                    # λ^{j+1}·scale
        k_decay = tl.load(kdec_ptr + h * C + ci)                    # λ^{C-1-s}
        w_decay = tl.load(wdec_ptr + h)                             # λ^C
        if HAS_STATE:
            slot = tl.load(sidx_ptr + seq).to(tl.int64)
            s_base = s_ptr + (slot * H + h) * D * D
            p_base = pend_ptr + (slot * H + h) * C * 2 * D
            S = tl.load(s_base + di[:, None] * D + vi[None, :], mask=(di[:, None] * 0 + vi[None, :] * 0 + ctx) > 0, other=0.0)
        else:
            S = tl.zeros((D, BV), dtype=tl.float32)
        for w in range(0, n_win):
            p = w * C + ci
            is_new = (p >= pend) & (p < used)
            tok = tl.where(is_new, start + p - pend, 0).to(tl.int64)
            q = tl.load(q_ptr + tok[:, None] * s_qn + h * s_qh + di[None, :], mask=is_new[:, None], other=0.0)
            k = tl.load(k_ptr + tok[:, None] * s_kn + h * s_kh + di[None, :], mask=is_new[:, None], other=0.0)
            v = tl.load(v_ptr + tok[:, None] * s_vn + h * s_vh + vi[None, :], mask=is_new[:, None], other=0.0)
            if HAS_STATE:
                is_pend = p < pend
                kp = tl.load(p_base + p[:, None] * 2 * D + di[None, :], mask=is_pend[:, None], other=0.0)
                vp = tl.load(p_base + p[:, None] * 2 * D + D + vi[None, :], mask=is_pend[:, None], other=0.0)
                k = tl.where(is_pend[:, None], kp.to(k.dtype), k)
                v = tl.where(is_pend[:, None], vp.to(v.dtype), v)
            if MODE == 3:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = scores * tl.load(intra_ptr + h * C * C + ci[:, None] * C + ci[None, :])   # λ^{j-s}·scale, s<=j
            inter = _mm_f32b(q, S, tl.zeros((C, BV), dtype=tl.float32), MODE, PARTS)
            out = _mm_f32a(scores, v, inter * q_decay[:, None], MODE, PARTS)
            tl.store(o_ptr + (tok[:, None] * H + h) * D + vi[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=is_new[:, None])
            if w < n_full:
                v_dec = v.to(tl.float32) * k_decay[:, None]
                S = _mm_f32b(tl.trans(k), v_dec, S * w_decay, MODE, PARTS)
        if HAS_STATE:
            if (n_full > 0) | (ctx == 0):
                tl.store(s_base + di[:, None] * D + vi[None, :], S)


@triton.jit
def _pending_kernel(k_ptr, v_ptr, pend_ptr, sidx_ptr, qsl_ptr, ctx_ptr, s_kn, s_kh, s_vn, s_vh, H,
                    D: tl.constexpr, C: tl.constexpr):
    """After `_lightning_kernel`: the new rows of each sequence's partial last window join
    `pending` at their window offsets. A separate launch, because the main kernel's V-block
    programs read old pending rows that these writes may overwrite."""
    seq = tl.program_id(0)
    h = tl.program_id(1)
    start = tl.load(qsl_ptr + seq)
    qlen = tl.load(qsl_ptr + seq + 1) - start
    pend = tl.load(ctx_ptr + seq) % C
    used = pend + qlen
    if (qlen > 0) & (used % C > 0):
        ci = tl.arange(0, C)
        di = tl.arange(0, D)
        p = (used // C) * C + ci
        is_new = (p >= pend) & (p < used)
        tok = tl.where(is_new, start + p - pend, 0).to(tl.int64)
        k = tl.load(k_ptr + tok[:, None] * s_kn + h * s_kh + di[None, :], mask=is_new[:, None], other=0.0)
        v = tl.load(v_ptr + tok[:, None] * s_vn + h * s_vh + di[None, :], mask=is_new[:, None], other=0.0)
        slot = tl.load(sidx_ptr + seq).to(tl.int64)
        p_base = pend_ptr + (slot * H + h) * C * 2 * D
        tl.store(p_base + ci[:, None] * 2 * D + di[None, :], k.to(tl.float32), mask=is_new[:, None])
        tl.store(p_base + ci[:, None] * 2 * D + D + di[None, :], v.to(tl.float32), mask=is_new[:, None])


def decay_tables(log_decay: torch.Tensor, chunk: int, scale: float):
    """The cpu backend's fp32 tables (`rl.kernels.cpu.lightning.decay_tables`) with the score
    scale folded in: q-decay·scale [H, C], k-decay [H, C], intra·scale [H, C, C], window [H]."""
    q_decay, k_decay, intra, window = cpu_decay_tables(log_decay, chunk)
    return (q_decay * scale).contiguous(), k_decay.contiguous(), (intra * scale).contiguous(), window.contiguous()


def _lightning_fast(q, k, v, log_decay, batch: BatchMeta, state, chunk_size):
    n, h, d = q.shape
    if d & (d - 1) or chunk_size & (chunk_size - 1) or chunk_size < 16:
        raise ValueError(f"lightning_attention: head_dim {d} and chunk {chunk_size} must be powers of two >= 16")
    o = torch.empty((n, h, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return o
    q_dec, k_dec, intra, w_dec = decay_tables(log_decay, chunk_size, d ** -0.5)
    has_state = state is not None
    if has_state:
        s_pool, pend_pool = state
        if not (s_pool.is_contiguous() and pend_pool.is_contiguous() and s_pool.dtype == torch.float32
                and pend_pool.dtype == torch.float32):
            raise ValueError("lightning_attention: state tensors must be contiguous fp32")
        sidx = batch.state_indices
    else:
        if int(batch.context_lens.max()) != 0:
            raise ValueError("lightning_attention: context_lens > 0 needs a state")
        s_pool = pend_pool = q_dec
        sidx = batch.query_start_loc
    bv = min(BLOCK_V, d)
    mode = MODE_IEEE if q.dtype == torch.float32 else MODE_BF16
    _lightning_kernel[(batch.num_seqs, h, d // bv)](
        q, k, v, o, s_pool, pend_pool, sidx, batch.query_start_loc, batch.context_lens,
        q_dec, k_dec, intra, w_dec, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), h, D=d, C=chunk_size, BV=bv, HAS_STATE=has_state, MODE=mode,
        PARTS=SPLIT_PARTS, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if has_state:
        _pending_kernel[(batch.num_seqs, h)](
            k, v, pend_pool, sidx, batch.query_start_loc, batch.context_lens,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), h, D=d, C=chunk_size, num_warps=4)
    return o


def torch_chunk_reference(q, k, v, log_decay, batch: BatchMeta, state, chunk_size):
    """Differentiable fp32 chunk form over padded sequences (no state): o [N, H, D] q.dtype."""
    n, h, d = q.shape
    c = chunk_size
    num_seqs = batch.num_seqs
    q_lens = batch.query_lens
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), q_lens)
    local = torch.arange(n, device=q.device) - batch.query_start_loc[:-1][seq_idx]
    num_windows = max(1, -(-int(q_lens.max()) // c))
    length = num_windows * c

    def pad(x):
        out = x.new_zeros((num_seqs, length, h, d), dtype=torch.float32)
        out = out.index_put((seq_idx, local), x.float())
        return out.view(num_seqs, num_windows, c, h, d).permute(0, 3, 1, 2, 4)    # [B, H, W, C, D]

    qw, kw, vw = pad(q), pad(k), pad(v)
    q_dec, k_dec, intra, w_dec = decay_tables(log_decay, c, d ** -0.5)
    scores = (qw @ kw.transpose(-1, -2)) * intra[None, :, None]
    out = scores @ vw
    updates = kw.transpose(-1, -2) @ (vw * k_dec[None, :, None, :, None])       # [B, H, W, D, D]
    s = q.new_zeros((num_seqs, h, d, d), dtype=torch.float32)
    starts = []
    for w in range(num_windows):
        starts.append(s)
        s = w_dec[None, :, None, None] * s + updates[:, :, w]
    inter = (qw @ torch.stack(starts, 2)) * q_dec[None, :, None, :, None]
    out = (out + inter).permute(0, 2, 3, 1, 4).reshape(num_seqs, length, h, d)
    return out[seq_idx, local].to(q.dtype)


def _fla_reference(q, k, v, log_decay, batch: BatchMeta, state, chunk_size):
    from fla.ops.simple_gla import chunk_simple_gla
    o, _ = chunk_simple_gla(q[None], k[None], v[None], g_gamma=log_decay.float(),
                            scale=q.shape[-1] ** -0.5, cu_seqlens=batch.query_start_loc)
    return o[0]


@functools.lru_cache(maxsize=None)
def _has_fla() -> bool:
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
        return True
    except Exception:
        return False


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        batch: BatchMeta, state=None, chunk_size: int = 64) -> torch.Tensor:
    """q, k, v [N, H, D] for the new tokens; log_decay [H] (log λ_h, fp32) -> o [N, H, D] q.dtype.

    `state`: None (no context: the trainer) or a pair (S [slots, H, D, D] fp32,
    pending [slots, H, C, 2D] fp32) indexed by `batch.state_indices`, read and updated in
    place. A sequence with `context_lens == 0` starts from a zero state whatever its slot
    holds. Bitwise invariant to batch composition and to how a sequence is split into calls.
    """
    if state is not None:
        return _lightning_fast(q, k, v, log_decay, batch, state, chunk_size)
    reference = _fla_reference if (q.is_cuda and q.dtype != torch.float32 and _has_fla()) else torch_chunk_reference
    return with_reference_grad(_lightning_fast, reference, (q, k, v, log_decay), (batch, None, chunk_size))
