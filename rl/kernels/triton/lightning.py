"""Lightning (linear) attention with per-head decay on the GPU, chunk form everywhere
(DESIGN.md §2 design (a)).

Recurrence: S_t = λ_h S_{t-1} + k_tᵀ v_t, o_t = (q_t · D^-0.5) S_t, fp32 state. Tokens are
grouped into windows of C positions aligned to absolute position 0. For token t at offset j
in its window, with S the state at the window start:
    o_t = λ^{j+1}·scale·(q_t S) + Σ_{s<=j} (q_t·k_s)·λ^{j-s}·scale · v_s
and at the end of a full window S ← λ^C S + Σ_s kᵀ_s (λ^{C-1-s} v_s).

Two kernels, each work item a (sequence, head, V-block) (the V-blocks of a head adjacent in
launch order), each taking the sequences the other leaves:
  - `_lightning_tile_kernel`: sequences whose new tokens lie in one Q_TILE-row query tile of
    one window (a decode step, a short chunk) compute only that tile: [Q_TILE, D] x [D, R],
    [Q_TILE, R] x [R, BV], [Q_TILE, D] x [D, BV] products, R <= C the window rows up to the
    tile's end (the cpu backend's Q_TILE rows too).
  - `_lightning_kernel`: the rest; an item walks its sequence's windows in order, holding
    S[:, V-block] in fp32 registers, every row of a window at once ([C, .] products). Its grid
    is at most FULL_PROGS_PER_SM programs an SM, each screening its items (item = pid + j·grid)
    32 at a time from their sequences' lengths and running those with work: in a decode batch
    (every item the tile kernel's) that costs a few vector loads instead of thousands of
    launched 255-register programs that exit (run 16: decode 0.31 -> 0.25 ms).
A decode step (host-known `max_query_len` 1: every sequence fits one tile) launches the tile
kernel alone; the decay tables are kept on the layer's log-decay tensor between calls (session
7: decode graph replay 0.219 -> 0.212 ms). The tile kernel works over the window's first 16,
32 or 64 rows, whichever reach the end of its query tile (the rows after it are zeros: their
products are exact zeros, and leaving them out moves no bit; tests/gpu and the bench check
every window offset), and writes the new rows' pending k/v over its 16 query rows (session 9:
decode graph replay 0.212 -> 0.209 -> 0.195 ms).
The per-request state holds S at the last window boundary plus the fp32 k/v of the ≤C-1
tokens since (`pending`); both kernels rebuild the partial window from them. Rows of a window
that are not (yet) there are zero and contribute exact zeros. A row's products are the same
k16 tensor-core steps in the same order in both kernels: the 16-row tile runs on mma.sync
(M = 16), the full window on wgmma (M = 64), and on the H200 (Triton 3.6) the two give the
same bits -- tests/gpu and the bench check it for every window offset. So a token's bits are
the same from a full forward, prefill + decode, chunked prefill at any split, or a recompute.
(A transposed tile form, wgmma with N = 16, gave other bits and faulted at D = 64: not used.)
Output column j and state column j depend only on value column j, and every reduction (over
d_k, over a window's rows) keeps its shape, so the V-block width moves no bit (tests/gpu
checks 32, 64 and 128 columns against each other).

Decay tables (λ^{j+1}·scale, λ^{C-1-s}, λ^{j-s}·scale, λ^C): the cpu backend's formulas
(`rl.kernels.cpu.lightning.decay_tables`), computed on the GPU by one small kernel
(`_decay_tables_kernel`, libdevice expf) instead of ~20 torch ops a call; tests/gpu checks it
gives the bits of the torch formulas on the same device.

Precision: q·kᵀ on bf16 tensor cores (exact products, fp32 accumulate); products with an
fp32 operand (the state S, the decayed scores P, the decayed values λ^{C-1-s} v_s) split that
operand into bf16 parts, smallest part first, the number chosen per product (`PARTS_QS`,
`PARTS_PV`, `PARTS_KV`). Shipped (issue 8, session 10): 2 parts for all three (~16 mantissa
bits of S, P and λ^{C-1-s} v_s in the products; the state itself stays fp32, accumulated in
fp32, and is stored fp32). The split (`_split3`, TRUNC_SPLIT / TRUNC_SPLIT2) truncates: hi = x
with its low 16 bits cleared, mid = the same of x - hi, lo = the rest; both subtractions are
exact and hi + mid + lo == x exactly, so 3 parts are fp32-accurate and 2 leave |x - hi - mid| <
2^-14 |x| (the round-to-nearest split of matmul.py is as accurate in 3 parts and 4x more in 2, but
takes conversions instead of bit-ands and byte permutes: run 16, 3 parts, 0.62 -> 0.59 ms with
truncation; ltune27, 2 parts, 0.497 -> 0.467 ms). Accuracy on the bench's prefill inputs (B8
T4096 H16 D128, Ring slopes) against a float64 chunk recurrence with exact decays
(bench/kernels_gpu.py `lightning_accuracy`; kernels_gpu_h200_ltune26/27.json), shipped / all
3-part / fla chunk_simple_gla: final state max |err| / max |S| 1.0e-5 / 2.6e-6 / 1.7e-3, norm-wise
1.0e-5 / 1.4e-6 / 1.6e-3; output (bf16) elements that differ from the float64 result rounded to
bf16 0.71% / 0.04% / 45%. The middle ground (3 parts for q·S, 2 rounded to nearest for P·v and the
update: state 3.1e-6, output 0.23%) ran 0.494-0.503 ms, prefill ratio 1.219-1.223 (runs 26-27):
not within 1.2. Both kernels use the same splits, so their bits agree. fp32 model inputs use
IEEE fp32 dots (and the full-window kernel only).
Gradients (trainer, no state): fla's `chunk_simple_gla` with `g_gamma` when installed, else a
torch chunk-form reference; correct, not bit-identical.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from rl.kernels.batch import BatchMeta
from rl.kernels.cpu.lightning import decay_tables as cpu_decay_tables
from rl.kernels.cpu.matmul import current_derived, keep_derived
from rl.kernels.triton.autograd import with_reference_grad
from rl.kernels.triton.matmul import MODE_BF16, MODE_IEEE, split3

# full-window kernel (H200 variant tables: bench/results/kernels_gpu_h200_tune4.json, tune5.json)
BLOCK_V = 64      # 32: illegal memory access on the H200 (Triton 3.6, wgmma N = 32), tune1 and tune5
# bf16 parts of the fp32 operand, per product (3: fp32-accurate; 2: ~16 mantissa bits), the
# same in both kernels (so their bits agree). Session 10, one process each (H200; prefill ms,
# final-state max |err| / max |S| against float64): kernels_gpu_h200_ltune27.json: 2/2/2 truncating
# 0.467 (1.0e-5), 2/2/2 round to nearest 0.497 (3.1e-6), 3/2/2 rn 0.494-0.499 (3.1e-6), 3/2/2
# trunc 0.496 (1.0e-5), 3/3/3 0.549 (2.6e-6), fla chunk 0.410 (1.7e-3); ltune26 the same order.
# Only the all-truncating 2-part form meets issue 8's 1.2 (3/2/2 rn: 1.219 / 1.223, runs 26-27).
PARTS_QS = 2      # q · S (the state at the window start)
PARTS_PV = 2      # P · v (P the decayed, scaled scores)
PARTS_KV = 2      # kᵀ · (λ^{C-1-s} v) (the state update)
TRUNC_SPLIT = True   # 3-part splits by truncation (exact: hi + mid + lo == x); False: round to nearest
TRUNC_SPLIT2 = True   # 2-part splits by truncation (|x - hi - mid| < 2^-14 |x|, towards zero); False:
                      # round to nearest (hi = rn(x), mid = rn(x - hi): <= 2^-16 |x|, 6% slower, ltune27)
NUM_WARPS = 4     # 8 warps: 1 program an SM at 255 registers; 4: 2 programs, 35% faster (H200)
NUM_STAGES = 1    # 2 stages: shared memory for 1 program an SM, slower
MAXNREG = None    # register cap (None: the compiler's 255); 8 warps capped at 128: 2.8x slower (spills)
FULL_PROGS_PER_SM = 2   # grid of the full-window kernel: at most this many programs an SM (0: one a work item)
# tile kernel: 64 V-columns a program, 4 warps capped at 168 registers, so 3 programs share
# an SM (run 16: decode 0.236 vs 0.252 ms with 8 warps capped at 128, 2 an SM; tune5/run 9:
# 128 columns / 8 warps / no cap 0.289-0.292; 32 columns / 4 warps capped 0.285-0.291)
Q_TILE = 16       # Q_TILE >= C turns the tile kernel off (every sequence takes the full window)
TILE_BV = 64
TILE_WARPS = 4
TILE_MAXNREG = 168
# session 9 (kernels_gpu_h200_ltune23.json / ltune24.json, graph replay of the B256 decode):
TILE_STORE = True   # the new rows' pending k/v written over the 16-row query tile, not the window: 0.212 -> 0.208 ms
TILE_SKIP = True    # the window's rows after the query tile left out (16/32/64-row forms): 0.210 -> 0.195 ms


@triton.jit
def _split3(x, TRUNC: tl.constexpr):
    """fp32 -> bf16 parts hi, mid, lo. TRUNC: each part is the remainder so far with its low 16
    bits cleared (so both subtractions are exact and hi + mid + lo == x exactly), taken as the
    high half of its bits (two bit-ands, two subtractions, byte permutes to pack); else
    `split3` (round to nearest, matmul.py)."""
    if TRUNC:
        xb = x.to(tl.uint32, bitcast=True)
        r = x - (xb & 0xFFFF0000).to(tl.float32, bitcast=True)
        rb = r.to(tl.uint32, bitcast=True)
        lo = r - (rb & 0xFFFF0000).to(tl.float32, bitcast=True)
        lb = lo.to(tl.uint32, bitcast=True)
        return ((xb >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True),
                (rb >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True),
                (lb >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True))
    else:
        return split3(x)


@triton.jit
def _split(x, PARTS: tl.constexpr, TRUNC: tl.constexpr):
    """`_split3` in the form of PARTS: 3 parts by TRUNC's split, 2 parts (hi, mid; lo unused)
    by TRUNC % 2's (TRUNC = TRUNC_SPLIT + 2·TRUNC_SPLIT2)."""
    if PARTS == 3:
        return _split3(x, TRUNC % 2 == 1)
    else:
        return _split3(x, TRUNC // 2 == 1)


@triton.jit
def _mm_f32a(a, b, acc, MODE: tl.constexpr, PARTS: tl.constexpr, TRUNC: tl.constexpr):
    """acc += a @ b, a fp32 (split into PARTS bf16 parts, smallest first), b bf16."""
    if MODE == 3:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        a_hi, a_mid, a_lo = _split(a, PARTS, TRUNC)
        if PARTS == 3:
            acc = tl.dot(a_lo, b, acc)
        acc = tl.dot(a_mid, b, acc)
        acc = tl.dot(a_hi, b, acc)
    return acc


@triton.jit
def _mm_f32b(a, b, acc, MODE: tl.constexpr, PARTS: tl.constexpr, TRUNC: tl.constexpr):
    """acc += a @ b, a bf16, b fp32 (split like `_mm_f32a`)."""
    if MODE == 3:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        b_hi, b_mid, b_lo = _split(b, PARTS, TRUNC)
        if PARTS == 3:
            acc = tl.dot(a, b_lo, acc)
        acc = tl.dot(a, b_mid, acc)
        acc = tl.dot(a, b_hi, acc)
    return acc


@triton.jit
def _qk(q, k, MODE: tl.constexpr):
    """q kᵀ: bf16 tensor cores, or IEEE fp32 for fp32 inputs."""
    if MODE == 3:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.dot(q, tl.trans(k))


@triton.jit
def _rows(ptr, tok, s_n, s_h, h, cols, ok):
    """x[tok[r], h, cols] for the rows r with ok[r], zeros elsewhere: [R, len(cols)]."""
    return tl.load(ptr + tok[:, None] * s_n + h * s_h + cols[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _window_rows(ptr, tok, s_n, s_h, h, cols, is_new, p_base, p_off, is_pend, dtype, HAS_STATE: tl.constexpr):
    """Rows of the first window: new tokens from `ptr`, the pending ones (fp32, exact copies of
    `dtype` values) from the state, zeros elsewhere."""
    x = _rows(ptr, tok, s_n, s_h, h, cols, is_new)
    if HAS_STATE:
        xp = tl.load(p_base + p_off, mask=is_pend[:, None], other=0.0)
        x = tl.where(is_pend[:, None], xp.to(dtype), x)
    return x


@triton.jit
def _fits_tile(pend, used, qlen, C: tl.constexpr, TQ: tl.constexpr):
    return (qlen > 0) & (used <= C) & ((used - 1) // TQ == pend // TQ)


@triton.jit
def _program(pid, qsl_ptr, ctx_ptr, H, NV: tl.constexpr, C: tl.constexpr, HAS_STATE: tl.constexpr):
    """Work item pid's sequence, head and V-block (1-D grid, the V-blocks of a head adjacent in
    launch order, so they read its q/k and pending rows close together in time, through L2),
    and its sequence's first new token, new-token count, context, pending rows and window rows
    in use (pending + new)."""
    vb = pid % NV
    h = (pid // NV) % H
    seq = pid // (NV * H)
    start = tl.load(qsl_ptr + seq)
    qlen = tl.load(qsl_ptr + seq + 1) - start
    if HAS_STATE:
        ctx = tl.load(ctx_ptr + seq)
    else:
        ctx = start * 0
    pend = ctx % C
    return seq, h, vb, start, qlen, ctx, pend, pend + qlen


@triton.jit
def _decay_tables_kernel(ld_ptr, qdec_ptr, kdec_ptr, intra_ptr, wdec_ptr, scale, C: tl.constexpr):
    """The cpu backend's `decay_tables` (with the score scale folded in), one program a head:
    q-decay·scale [C], k-decay [C], intra·scale [C, C], window decay λ^C; expf from libdevice."""
    h = tl.program_id(0)
    ld = tl.load(ld_ptr + h)
    j = tl.arange(0, C).to(tl.float32)
    tl.store(qdec_ptr + h * C + tl.arange(0, C), libdevice.exp(ld * (j + 1.0)) * scale)
    tl.store(kdec_ptr + h * C + tl.arange(0, C), libdevice.exp(ld * ((C - 1.0) - j)))
    diff = j[:, None] - j[None, :]
    causal = diff >= 0
    intra = tl.where(causal, libdevice.exp(ld * tl.where(causal, diff, 0.0)), 0.0)
    ci = tl.arange(0, C)
    tl.store(intra_ptr + h * C * C + ci[:, None] * C + ci[None, :], intra * scale)
    tl.store(wdec_ptr + h, libdevice.exp(ld * C))


@triton.jit
def _load_window(q_ptr, k_ptr, v_ptr, p_base, w, start, pend, used, h, ci, di, vi,
                 s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, D: tl.constexpr, HAS_STATE: tl.constexpr):
    """Rows of window w (C rows at absolute offsets w·C + ci from the first pending row): the
    new tokens' q/k/v, the pending k/v of the first window from the state, zeros elsewhere;
    with the rows' token index and new-row mask."""
    p = w * ci.shape[0] + ci
    is_new = (p >= pend) & (p < used)
    tok = tl.where(is_new, start + p - pend, 0).to(tl.int64)
    q = _rows(q_ptr, tok, s_qn, s_qh, h, di, is_new)
    if HAS_STATE:
        is_pend = p < pend
        k = _window_rows(k_ptr, tok, s_kn, s_kh, h, di, is_new, p_base, ci[:, None] * 2 * D + di[None, :],
                         is_pend, q.dtype, HAS_STATE)
        v = _window_rows(v_ptr, tok, s_vn, s_vh, h, vi, is_new, p_base, ci[:, None] * 2 * D + D + vi[None, :],
                         is_pend, q.dtype, HAS_STATE)
    else:
        k = _rows(k_ptr, tok, s_kn, s_kh, h, di, is_new)
        v = _rows(v_ptr, tok, s_vn, s_vh, h, vi, is_new)
    return q, k, v, tok, is_new


@triton.jit
def _lightning_kernel(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, pend_ptr, sidx_ptr, qsl_ptr, ctx_ptr,
                      qdec_ptr, kdec_ptr, intra_ptr, wdec_ptr,
                      s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, H, n_items,
                      D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr,
                      MODE: tl.constexpr, PQS: tl.constexpr, PPV: tl.constexpr, PKV: tl.constexpr,
                      TILE: tl.constexpr, TQ: tl.constexpr, ITEMS: tl.constexpr, TRUNC: tl.constexpr):
    """Work items (sequence, head, V-block) item = pid + j·grid, j = 0, 1, ...: the grid may be
    smaller than the item count, so that items the tile kernel took (a decode batch: all of
    them) cost a few vector loads instead of a launched program each. ITEMS of a program's
    items are screened at once (their sequences' lengths in one load), then those with work
    run one after another."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    NV: tl.constexpr = D // BV
    jj = tl.arange(0, ITEMS)
    for base in range(0, tl.cdiv(n_items - pid, grid), ITEMS):
        item = pid + (base + jj) * grid
        ok = item < n_items
        sq = tl.where(ok, item // (NV * H), 0)
        st = tl.load(qsl_ptr + sq, mask=ok, other=0)
        ql = tl.load(qsl_ptr + sq + 1, mask=ok, other=0) - st
        if HAS_STATE:
            pd = tl.load(ctx_ptr + sq, mask=ok, other=0) % C
        else:
            pd = ql * 0
        todo = ok & (ql > 0)
        if TILE:   # sequences that fit one tile are the tile kernel's
            todo = todo & (not _fits_tile(pd, pd + ql, ql, C, TQ))
        if tl.sum(todo.to(tl.int32)) > 0:
            for i in range(0, ITEMS):
                if tl.sum(tl.where(jj == i, todo, False).to(tl.int32)) > 0:
                    seq, h, vb, start, qlen, ctx, pend, used = _program(pid + (base + i) * grid, qsl_ptr, ctx_ptr,
                                                                        H, NV, C, HAS_STATE)
                    _full_item(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, pend_ptr, sidx_ptr, qdec_ptr, kdec_ptr,
                               intra_ptr, wdec_ptr, s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, H, seq, h, vb, start,
                               ctx, pend, used, D, C, BV, HAS_STATE, MODE, PQS, PPV, PKV, TRUNC)


@triton.jit
def _state_bases(s_ptr, pend_ptr, sidx_ptr, seq, h, H, D: tl.constexpr, C: tl.constexpr, HAS_STATE: tl.constexpr):
    """Where (sequence, head)'s S [D, D] and pending k/v [C, 2D] lie in the state pools (the
    pools' own pointers when the call has no state)."""
    s_base = s_ptr
    p_base = pend_ptr
    if HAS_STATE:
        slot = tl.load(sidx_ptr + seq).to(tl.int64)
        s_base = s_ptr + (slot * H + h) * D * D
        p_base = pend_ptr + (slot * H + h) * C * 2 * D
    return s_base, p_base


@triton.jit
def _load_state(s_base, s_off, ctx, D: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr):
    """S[:, V-block] at the last window boundary: zeros for a sequence without context."""
    if HAS_STATE:
        S = tl.load(s_base + s_off, mask=(s_off * 0 + ctx) > 0, other=0.0)
    else:
        S = tl.zeros((D, BV), dtype=tl.float32)
    return S


@triton.jit
def _full_item(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, pend_ptr, sidx_ptr, qdec_ptr, kdec_ptr, intra_ptr, wdec_ptr,
               s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, H, seq, h, vb, start, ctx, pend, used,
               D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr,
               MODE: tl.constexpr, PQS: tl.constexpr, PPV: tl.constexpr, PKV: tl.constexpr, TRUNC: tl.constexpr):
    """One (sequence, head, V-block): its windows in order, S[:, V-block] in registers."""
    n_win = tl.cdiv(used, C)
    n_full = used // C
    ci = tl.arange(0, C)
    di = tl.arange(0, D)
    vi = vb * BV + tl.arange(0, BV)
    q_decay = tl.load(qdec_ptr + h * C + ci)                    # λ^{j+1}·scale
    k_decay = tl.load(kdec_ptr + h * C + ci)                    # λ^{C-1-s}
    w_decay = tl.load(wdec_ptr + h)                             # λ^C
    intra = tl.load(intra_ptr + h * C * C + ci[:, None] * C + ci[None, :])   # λ^{j-s}·scale, s<=j
    s_off = di[:, None] * D + vi[None, :]
    s_base, p_base = _state_bases(s_ptr, pend_ptr, sidx_ptr, seq, h, H, D, C, HAS_STATE)
    S = _load_state(s_base, s_off, ctx, D, BV, HAS_STATE)
    # window 0 holds the pending rows (if any); the next window's rows are loaded at the end
    # of the current one
    q, k, v, tok, is_new = _load_window(q_ptr, k_ptr, v_ptr, p_base, 0, start, pend, used, h, ci, di, vi,
                                        s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, D, HAS_STATE)
    for w in range(0, n_win):
        scores = _qk(q, k, MODE) * intra
        inter = _mm_f32b(q, S, tl.zeros((C, BV), dtype=tl.float32), MODE, PQS, TRUNC)
        out = _mm_f32a(scores, v, inter * q_decay[:, None], MODE, PPV, TRUNC)
        tl.store(o_ptr + (tok[:, None] * H + h) * D + vi[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=is_new[:, None])
        if w < n_full:
            v_dec = v.to(tl.float32) * k_decay[:, None]
            S = _mm_f32b(tl.trans(k), v_dec, S * w_decay, MODE, PKV, TRUNC)
        p = (w + 1) * C + ci
        is_new = p < used
        tok = tl.where(is_new, start + p - pend, 0).to(tl.int64)
        q = _rows(q_ptr, tok, s_qn, s_qh, h, di, is_new)
        k = _rows(k_ptr, tok, s_kn, s_kh, h, di, is_new)
        v = _rows(v_ptr, tok, s_vn, s_vh, h, vi, is_new)
    if HAS_STATE:
        if (n_full > 0) | (ctx == 0):
            tl.store(s_base + s_off, S)


@triton.jit
def _lightning_tile_kernel(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, pend_ptr, sidx_ptr, qsl_ptr, ctx_ptr,
                           qdec_ptr, kdec_ptr, intra_ptr, wdec_ptr,
                           s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, H,
                           D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, TQ: tl.constexpr,
                           HAS_STATE: tl.constexpr, MODE: tl.constexpr, PQS: tl.constexpr, PPV: tl.constexpr,
                           PKV: tl.constexpr, TRUNC: tl.constexpr, TILE_STORE: tl.constexpr, SKIP: tl.constexpr,
                           LOG_TILES: tl.constexpr):
    """Sequences whose new tokens lie in one TQ-row tile of one window (decode steps, short
    chunks): only that tile's rows, from the window's k/v (pending + new) and S, with the full
    window's products restricted to TQ rows (`_tile_rows`). SKIP: only the window's first NR rows, NR
    the power-of-two multiple of TQ (TQ << i, i <= LOG_TILES = log2(C / TQ)) that reaches the
    end of the query tile, one compiled form each: the rows after it are zeros whose products
    add exact zeros. The new rows join `pending` here (rows
    >= pend, which no program of this launch reads)."""
    seq, h, vb, start, qlen, ctx, pend, used = _program(tl.program_id(0), qsl_ptr, ctx_ptr, H, D // BV, C, HAS_STATE)
    if _fits_tile(pend, used, qlen, C, TQ):
        if SKIP:
            rows = (pend // TQ + 1) * TQ      # the window's rows up to the query tile's end
            for i in tl.static_range(0, LOG_TILES + 1):
                if (rows <= (TQ << i)) & ((i == 0) | (rows > (TQ << i) // 2)):
                    _tile_rows(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, pend_ptr, sidx_ptr, qdec_ptr, kdec_ptr, intra_ptr,
                               wdec_ptr, s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, H, seq, h, vb, start, ctx, pend, used,
                               D, C, BV, TQ, TQ << i, HAS_STATE, MODE, PQS, PPV, PKV, TRUNC, TILE_STORE)
        else:
            _tile_rows(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, pend_ptr, sidx_ptr, qdec_ptr, kdec_ptr, intra_ptr,
                       wdec_ptr, s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, H, seq, h, vb, start, ctx, pend, used,
                       D, C, BV, TQ, C, HAS_STATE, MODE, PQS, PPV, PKV, TRUNC, TILE_STORE)


@triton.jit
def _tile_rows(q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, pend_ptr, sidx_ptr, qdec_ptr, kdec_ptr, intra_ptr, wdec_ptr,
               s_qn, s_qh, s_kn, s_kh, s_vn, s_vh, H, seq, h, vb, start, ctx, pend, used,
               D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, TQ: tl.constexpr, NR: tl.constexpr,
               HAS_STATE: tl.constexpr, MODE: tl.constexpr, PQS: tl.constexpr, PPV: tl.constexpr, PKV: tl.constexpr,
               TRUNC: tl.constexpr, TILE_STORE: tl.constexpr):
    """A tile-kernel item over the window's first NR rows (the query tile the last of them).
    The new rows' pending k/v are loaded and stored over the TQ rows of the query tile
    (TILE_STORE; else over the NR rows). Operands are loaded where they are used, and reloaded
    for the rare window-completing state update, to keep few registers live (loading k, S and
    v together up front was 3% slower on the H200, tune5)."""
    ci = tl.arange(0, NR)
    di = tl.arange(0, D)
    vi = vb * BV + tl.arange(0, BV)
    ti = (pend // TQ) * TQ + tl.arange(0, TQ)
    is_pend = ci < pend
    is_new = (ci >= pend) & (ci < used)
    tok = tl.where(is_new, start + ci - pend, 0).to(tl.int64)
    q_new = (ti >= pend) & (ti < used)
    q_tok = tl.where(q_new, start + ti - pend, 0).to(tl.int64)
    k_off = ci[:, None] * 2 * D + di[None, :]
    v_off = ci[:, None] * 2 * D + D + vi[None, :]
    s_off = di[:, None] * D + vi[None, :]
    s_base, p_base = _state_bases(s_ptr, pend_ptr, sidx_ptr, seq, h, H, D, C, HAS_STATE)
    q = _rows(q_ptr, q_tok, s_qn, s_qh, h, di, q_new)                       # [TQ, D]
    k = _window_rows(k_ptr, tok, s_kn, s_kh, h, di, is_new, p_base, k_off, is_pend, q.dtype, HAS_STATE)
    scores = _qk(q, k, MODE) * tl.load(intra_ptr + h * C * C + ti[:, None] * C + ci[None, :])
    S = _load_state(s_base, s_off, ctx, D, BV, HAS_STATE)
    inter = _mm_f32b(q, S, tl.zeros((TQ, BV), dtype=tl.float32), MODE, PQS, TRUNC)
    v = _window_rows(v_ptr, tok, s_vn, s_vh, h, vi, is_new, p_base, v_off, is_pend, q.dtype, HAS_STATE)
    out = _mm_f32a(scores, v, inter * tl.load(qdec_ptr + h * C + ti)[:, None], MODE, PPV, TRUNC)
    tl.store(o_ptr + (q_tok[:, None] * H + h) * D + vi[None, :], out.to(o_ptr.dtype.element_ty),
             mask=q_new[:, None])
    if HAS_STATE:
        if (NR == C) & (used == C):     # the window is complete: S moves on (as in the full-window kernel)
            k = _window_rows(k_ptr, tok, s_kn, s_kh, h, di, is_new, p_base, k_off, is_pend, q.dtype, HAS_STATE)
            v = _window_rows(v_ptr, tok, s_vn, s_vh, h, vi, is_new, p_base, v_off, is_pend, q.dtype, HAS_STATE)
            S = tl.load(s_base + s_off, mask=(s_off * 0 + ctx) > 0, other=0.0)
            v_dec = v.to(tl.float32) * tl.load(kdec_ptr + h * C + ci)[:, None]
            S = _mm_f32b(tl.trans(k), v_dec, S * tl.load(wdec_ptr + h), MODE, PKV, TRUNC)
            tl.store(s_base + s_off, S)
        else:
            if ctx == 0:    # a fresh slot starts from zero whatever it held
                tl.store(s_base + s_off, tl.zeros((D, BV), dtype=tl.float32))
            if TILE_STORE:
                if vb == 0:
                    kn = _rows(k_ptr, q_tok, s_kn, s_kh, h, di, q_new)
                    tl.store(p_base + ti[:, None] * 2 * D + di[None, :], kn.to(tl.float32), mask=q_new[:, None])
                vn = _rows(v_ptr, q_tok, s_vn, s_vh, h, vi, q_new)
                tl.store(p_base + ti[:, None] * 2 * D + D + vi[None, :], vn.to(tl.float32), mask=q_new[:, None])
            else:
                if vb == 0:
                    kn = _rows(k_ptr, tok, s_kn, s_kh, h, di, is_new)
                    tl.store(p_base + k_off, kn.to(tl.float32), mask=is_new[:, None])
                vn = _rows(v_ptr, tok, s_vn, s_vh, h, vi, is_new)
                tl.store(p_base + v_off, vn.to(tl.float32), mask=is_new[:, None])


@triton.jit
def _pending_kernel(k_ptr, v_ptr, pend_ptr, sidx_ptr, qsl_ptr, ctx_ptr, s_kn, s_kh, s_vn, s_vh, H, num_seqs,
                    D: tl.constexpr, C: tl.constexpr, TILE: tl.constexpr, TQ: tl.constexpr, ITEMS: tl.constexpr):
    """After `_lightning_kernel`: the new rows of each sequence's partial last window join
    `pending` at their window offsets. A separate launch, because the main kernel's V-block
    programs read old pending rows that these writes may overwrite. Sequences that fit one
    tile wrote theirs in the tile kernel. One program per ITEMS sequences and head: their
    lengths are screened in one load, then the sequences with rows to write are done in turn."""
    blk = tl.program_id(0)
    h = tl.program_id(1)
    jj = tl.arange(0, ITEMS)
    sq = blk * ITEMS + jj
    ok = sq < num_seqs
    st = tl.load(qsl_ptr + sq, mask=ok, other=0)
    ql = tl.load(qsl_ptr + sq + 1, mask=ok, other=0) - st
    pd = tl.load(ctx_ptr + sq, mask=ok, other=0) % C
    todo = ok & (ql > 0) & ((pd + ql) % C > 0)
    if TILE:
        todo = todo & (not _fits_tile(pd, pd + ql, ql, C, TQ))
    if tl.sum(todo.to(tl.int32)) > 0:
        for i in range(0, ITEMS):
            if tl.sum(tl.where(jj == i, todo, False).to(tl.int32)) > 0:
                seq = blk * ITEMS + i
                start = tl.load(qsl_ptr + seq)
                qlen = tl.load(qsl_ptr + seq + 1) - start
                pend = tl.load(ctx_ptr + seq) % C
                used = pend + qlen
                ci = tl.arange(0, C)
                di = tl.arange(0, D)
                p = (used // C) * C + ci
                is_new = (p >= pend) & (p < used)
                tok = tl.where(is_new, start + p - pend, 0).to(tl.int64)
                k = _rows(k_ptr, tok, s_kn, s_kh, h, di, is_new)
                v = _rows(v_ptr, tok, s_vn, s_vh, h, di, is_new)
                _, p_base = _state_bases(pend_ptr, pend_ptr, sidx_ptr, seq, h, H, D, C, True)
                tl.store(p_base + ci[:, None] * 2 * D + di[None, :], k.to(tl.float32), mask=is_new[:, None])
                tl.store(p_base + ci[:, None] * 2 * D + D + di[None, :], v.to(tl.float32), mask=is_new[:, None])


def decay_tables(log_decay: torch.Tensor, chunk: int, scale: float):
    """The cpu backend's fp32 tables (`rl.kernels.cpu.lightning.decay_tables`) with the score
    scale folded in: q-decay·scale [H, C], k-decay [H, C], intra·scale [H, C, C], window [H]
    (torch ops; the kernels get the same tables from `gpu_decay_tables`)."""
    q_decay, k_decay, intra, window = cpu_decay_tables(log_decay, chunk)
    return (q_decay * scale).contiguous(), k_decay.contiguous(), (intra * scale).contiguous(), window.contiguous()


def gpu_decay_tables(log_decay: torch.Tensor, chunk: int, scale: float):
    """`decay_tables` from one kernel launch: (q-decay·scale [H, C], k-decay [H, C],
    intra·scale [H, C, C], window [H]), fp32 views of one buffer. Kept on `log_decay` (a
    layer passes the same tensor every call) and reused while it is unchanged; not kept when
    made inside a CUDA-graph capture (the buffer would be filled only by graph replays)."""
    key = f"_lockstep_decay_tables_{chunk}_{scale!r}"
    kept = current_derived(log_decay, key, (log_decay,))
    if kept is not None:
        return kept
    tables = _decay_tables_launch(log_decay, chunk, scale)
    if not torch.cuda.is_current_stream_capturing():
        keep_derived(log_decay, key, (log_decay,), tables)
    return tables


def _decay_tables_launch(log_decay: torch.Tensor, chunk: int, scale: float):
    h = log_decay.shape[0]
    c = chunk
    buf = torch.empty(h * (2 * c + c * c + 1), dtype=torch.float32, device=log_decay.device)
    q_dec, k_dec = buf[: h * c].view(h, c), buf[h * c: 2 * h * c].view(h, c)
    intra = buf[2 * h * c: 2 * h * c + h * c * c].view(h, c, c)
    w_dec = buf[2 * h * c + h * c * c:]
    _decay_tables_kernel[(h,)](log_decay.float().contiguous(), q_dec, k_dec, intra, w_dec, scale, C=c,
                               num_warps=4)
    return q_dec, k_dec, intra, w_dec


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _lightning_fast(q, k, v, log_decay, batch: BatchMeta, state, chunk_size):
    n, h, d = q.shape
    if d & (d - 1) or chunk_size & (chunk_size - 1) or chunk_size < 16:
        raise ValueError(f"lightning_attention: head_dim {d} and chunk {chunk_size} must be powers of two >= 16")
    o = torch.empty((n, h, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return o
    q_dec, k_dec, intra, w_dec = gpu_decay_tables(log_decay, chunk_size, d ** -0.5)
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
    trunc = int(bool(TRUNC_SPLIT)) + 2 * int(bool(TRUNC_SPLIT2))
    tq, tbv = Q_TILE, min(TILE_BV, d)
    # the tile kernel where it saves work (C > tq) and the full window's products run on
    # wgmma (C a multiple of 64; checked equal to the tile's mma.sync on the H200); fp32
    # inputs keep the full-window kernel (IEEE FMA dots, not checked)
    tile = mode != MODE_IEEE and chunk_size > tq and chunk_size % tq == 0 and chunk_size % 64 == 0
    args = (q, k, v, o, s_pool, pend_pool, sidx, batch.query_start_loc, batch.context_lens,
            q_dec, k_dec, intra, w_dec, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), h)
    if tile:
        _lightning_tile_kernel[(batch.num_seqs * h * (d // tbv),)](
            *args, D=d, C=chunk_size, BV=tbv, TQ=tq, HAS_STATE=has_state, MODE=mode, PQS=PARTS_QS, PPV=PARTS_PV,
            PKV=PARTS_KV, TRUNC=trunc, TILE_STORE=TILE_STORE, SKIP=TILE_SKIP,
            LOG_TILES=(chunk_size // tq).bit_length() - 1,
            num_warps=TILE_WARPS, num_stages=1, maxnreg=TILE_MAXNREG)
    if tile and batch.max_query_len is not None and batch.max_query_len <= 1:
        return o    # a decode step: every sequence fits one tile, the other two kernels would find no work
    n_items = batch.num_seqs * h * (d // bv)
    grid = n_items if FULL_PROGS_PER_SM <= 0 else max(1, min(n_items, FULL_PROGS_PER_SM * _num_sms(q.device)))
    _lightning_kernel[(grid,)](
        *args, n_items, D=d, C=chunk_size, BV=bv, HAS_STATE=has_state, MODE=mode, PQS=PARTS_QS, PPV=PARTS_PV,
        PKV=PARTS_KV, TILE=tile, TQ=tq, ITEMS=32, TRUNC=trunc, num_warps=NUM_WARPS,
        num_stages=NUM_STAGES, maxnreg=MAXNREG)
    if has_state:
        _pending_kernel[(triton.cdiv(batch.num_seqs, 32), h)](
            k, v, pend_pool, sidx, batch.query_start_loc, batch.context_lens,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), h, batch.num_seqs, D=d, C=chunk_size, TILE=tile,
            TQ=tq, ITEMS=32, num_warps=4)
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
