"""Mode `stock`: the plain torch ops people use today, with no invariance.

Only for `lockstep mismatch --kernels stock`, to show what drift looks like: bf16
`F.linear` (GEMM blocking follows M), HF-style RMSNorm, SDPA per sequence (a decode row is
computed differently from the same row in prefill), lightning attention in chunk form for a
full forward but token-by-token recurrence in decode, a model-dtype router with `torch.topk`,
and index_add expert combine. Same signatures as the lockstep backends. On CUDA the stock
path is what a GPU stack runs today: one padded SDPA call for the batch, `torch._grouped_mm`
experts (`grouped_mm_experts`), and, if `fla` is installed, its simple-GLA kernels for
lightning attention (`chunk_simple_gla` for a forward from position 0,
`fused_recurrent_simple_gla` from a cached state). CPU behaviour is the plain loops below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rl.kernels.batch import BatchMeta
from rl.kernels.cpu.attention import gather_kv, write_kv
from rl.kernels.cpu.moe import select_experts
from rl.kernels.cpu.rope import rope  # noqa: F401  (RoPE is the same fp32 op in both modes)


def silu(x):
    return F.silu(x)


def linear(x, weight, out_dtype=None):
    if out_dtype is not None and out_dtype != x.dtype:
        return F.linear(x.to(out_dtype), weight.to(out_dtype))
    return F.linear(x, weight.to(x.dtype))


def rms_norm(x, weight, eps):
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * y


def gated_group_rms_norm(x, gate, weight, num_groups, eps):
    shape = x.shape
    xg = x.reshape(*shape[:-1], num_groups, -1)
    y = rms_norm(xg, torch.ones(xg.shape[-1], dtype=x.dtype, device=x.device), eps).reshape(shape)
    return weight.to(x.dtype) * y * torch.sigmoid(gate)


def _cuda_softmax_attention(q, k, v, batch: BatchMeta, kv_cache, scale):
    """One padded SDPA call for the whole batch (queries [B, Tq], keys [B, L] from the cache)."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    num_seqs = batch.num_seqs
    q_lens, seq_lens = batch.query_lens, batch.seq_lens
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), q_lens)
    local = torch.arange(n, device=q.device) - batch.query_start_loc[:-1][seq_idx]
    tq = int(q_lens.max())
    if kv_cache is not None:
        write_kv(kv_cache, k, v, batch.slot_mapping)
        length = int(seq_lens.max())
        k_all, v_all = gather_kv(kv_cache, batch.block_table, seq_lens, length)
        # gather_kv leaves keys past a sequence's length as the pages hold them (the lockstep
        # kernel selects scores with `where`); SDPA adds its mask to q·k, so garbage there
        # (NaN in a fresh reference cache) would poison the row: zero those keys
        past = torch.arange(length, device=q.device)[None, :] >= seq_lens[:, None]
        k_all = k_all.masked_fill(past[:, None, :, None], 0.0)
        k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
    else:
        length = tq
        k_all = k.new_zeros((num_seqs, tq, hkv, d)).index_put((seq_idx, local), k).transpose(1, 2)
        v_all = v.new_zeros((num_seqs, tq, hkv, d)).index_put((seq_idx, local), v).transpose(1, 2)
    qp = q.new_zeros((num_seqs, tq, hq, d)).index_put((seq_idx, local), q).transpose(1, 2)
    qpos = batch.context_lens[:, None] + torch.arange(tq, device=q.device)[None, :]
    mask = torch.arange(length, device=q.device)[None, None, :] <= qpos[:, :, None]
    group = hq // hkv
    o = F.scaled_dot_product_attention(qp, k_all.repeat_interleave(group, 1), v_all.repeat_interleave(group, 1),
                                       attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2)[seq_idx, local]


def softmax_attention(q, k, v, batch: BatchMeta, kv_cache=None, scale=None):
    if q.is_cuda:
        return _cuda_softmax_attention(q, k, v, batch, kv_cache, scale)
    n, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.empty_like(q)
    qsl = batch.query_start_loc.tolist()
    seq_lens = batch.seq_lens
    if kv_cache is not None:
        write_kv(kv_cache, k, v, batch.slot_mapping)
        k_all, v_all = gather_kv(kv_cache, batch.block_table, seq_lens, int(seq_lens.max()))
    for i in range(batch.num_seqs):
        lo, hi = qsl[i], qsl[i + 1]
        if hi == lo:
            continue
        total = int(seq_lens[i])
        if kv_cache is not None:
            ki, vi = k_all[i, :, :total].to(q.dtype), v_all[i, :, :total].to(q.dtype)
        else:
            ki, vi = k[lo:hi].transpose(0, 1), v[lo:hi].transpose(0, 1)
        qi = q[lo:hi].transpose(0, 1)
        qpos = torch.arange(total - (hi - lo), total, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= qpos[:, None]
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=hq != hkv)
        out[lo:hi] = oi.transpose(0, 1)
    return out


def _chunk_forward(q, k, v, log_decay, chunk=64):
    """Plain chunked linear attention for one sequence: q,k,v [H, T, D] fp32 -> o, final S."""
    h, t, d = q.shape
    s = q.new_zeros((h, d, d))
    outs = []
    ld = log_decay.float()[:, None]
    for lo in range(0, t, chunk):
        qc, kc, vc = q[:, lo:lo + chunk], k[:, lo:lo + chunk], v[:, lo:lo + chunk]
        c = qc.shape[1]
        j = torch.arange(c, device=q.device, dtype=torch.float32)
        diff = j[:, None] - j[None, :]
        mask = torch.where(diff >= 0, torch.exp(ld[..., None] * diff.clamp(min=0)), torch.zeros(()))
        o = (qc * torch.exp(ld * (j + 1))[..., None]) @ s + ((qc @ kc.transpose(1, 2)) * mask) @ vc
        s = torch.exp(ld[..., None] * c) * s + (kc * torch.exp(ld * (c - 1 - j))[..., None]).transpose(1, 2) @ vc
        outs.append(o)
    return torch.cat(outs, 1), s


def _fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
        return chunk_simple_gla, fused_recurrent_simple_gla
    except Exception:
        return None


def _fla_lightning(q, k, v, log_decay, batch: BatchMeta, state, kernels):
    """fla on CUDA: chunk form from position 0, fused recurrence from a cached state; the
    state slot holds S after the last token (fla's recurrent state), `pending` is unused."""
    chunk, recurrent = kernels
    scale = q.shape[-1] ** -0.5
    g_gamma = log_decay.float()
    args = dict(g_gamma=g_gamma, scale=scale, cu_seqlens=batch.query_start_loc)
    if state is None:
        return chunk(q[None], k[None], v[None], **args)[0][0]
    s_pool = state[0]
    idx = batch.state_indices
    if int(batch.context_lens.max()) == 0:
        o, final = chunk(q[None], k[None], v[None], output_final_state=True, **args)
    else:
        fresh = (batch.context_lens == 0)[:, None, None, None]
        init = torch.where(fresh, torch.zeros((), device=q.device), s_pool[idx])
        o, final = recurrent(q[None], k[None], v[None], initial_state=init, output_final_state=True, **args)
    s_pool[idx] = final.float()
    return o[0]


def lightning_attention(q, k, v, log_decay, batch: BatchMeta, state=None, chunk_size=64):
    kernels = _fla() if q.is_cuda else None
    if kernels is not None:
        return _fla_lightning(q, k, v, log_decay, batch, state, kernels)
    n, h, d = q.shape
    out = torch.empty_like(q)
    qsl = batch.query_start_loc.tolist()
    scale = d ** -0.5
    lam = torch.exp(log_decay.float())[:, None, None]
    for i in range(batch.num_seqs):
        lo, hi = qsl[i], qsl[i + 1]
        qi, ki, vi = (t[lo:hi].float().transpose(0, 1) for t in (q, k, v))
        qi = qi * scale
        ctx = int(batch.context_lens[i])
        if state is None or ctx == 0:
            o, s = _chunk_forward(qi, ki, vi, log_decay)
        else:
            s = state[0][batch.state_indices[i]].clone()
            outs = []
            for t in range(hi - lo):                    # token-by-token recurrence in decode
                s = lam * s + ki[:, t, :, None] * vi[:, t, None, :]
                outs.append((qi[:, t, None, :] @ s)[:, 0])
            o = torch.stack(outs, 1)
        if state is not None:
            state[0][batch.state_indices[i]] = s.detach()
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out


def moe_route(x, gate_weight, expert_bias, top_k, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor):
    logits = F.linear(x, gate_weight.to(x.dtype))
    scores = torch.sigmoid(logits.float())
    topk = lambda t, kk: torch.topk(t, kk, dim=-1)  # noqa: E731  (ties: unspecified order)
    weights, ids = select_experts(scores, expert_bias, top_k, n_group, topk_group,
                                  norm_topk_prob, routed_scaling_factor, topk=topk)
    return weights, ids, logits.float()


def _stack(ws):
    return ws if isinstance(ws, torch.Tensor) else torch.stack(list(ws))


def grouped_mm_experts(x, topk_ids, topk_weights, gate_w, up_w, down_w, align=16):
    """Stock GPU MoE: pairs sorted by expert into zero-padded groups (multiples of `align`),
    `torch._grouped_mm` for gate/up/down, index_add combine. Differentiable; weights stacked
    [E, I, Hd] / [E, Hd, I] or per-expert sequences (stacked here, differentiably)."""
    wg, wu, wd = _stack(gate_w), _stack(up_w), _stack(down_w)
    num_tokens, top_k = topk_ids.shape
    num_experts = wg.shape[0]
    flat = topk_ids.reshape(-1)
    pairs = flat.numel()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + align - 1) // align * align
    ends = torch.cumsum(padded, 0)
    expert_sorted = flat[order]
    local = torch.arange(pairs, device=x.device) - (torch.cumsum(counts, 0) - counts)[expert_sorted]
    dest = (ends - padded)[expert_sorted] + local
    rows = pairs + align * num_experts
    offs = ends.to(torch.int32)
    offs[-1] = rows                                   # the last group absorbs the slack rows
    x_pad = x.new_zeros((rows, x.shape[1])).index_put((dest,), x[order // top_k])
    g = torch._grouped_mm(x_pad, wg.transpose(-2, -1), offs=offs)
    u = torch._grouped_mm(x_pad, wu.transpose(-2, -1), offs=offs)
    y = torch._grouped_mm(F.silu(g) * u, wd.transpose(-2, -1), offs=offs)[dest]
    w = topk_weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, order // top_k, y * w)


def moe_experts(x, topk_ids, topk_weights, gate_w, up_w, down_w):
    if x.is_cuda:
        return grouped_mm_experts(x, topk_ids, topk_weights, gate_w, up_w, down_w)
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        y = F.linear(F.silu(F.linear(xe, gate_w[e])) * F.linear(xe, up_w[e]), down_w[e])
        out.index_add_(0, tok, (y * topk_weights[tok, slot, None].to(x.dtype)))
    return out


def log_softmax_logits(hidden, lm_head_weight, temperature=1.0):
    logits = F.linear(hidden, lm_head_weight.to(hidden.dtype)).float()
    return torch.log_softmax(logits / temperature, dim=-1)


def logprobs(hidden, lm_head_weight, token_ids, temperature=1.0):
    return log_softmax_logits(hidden, lm_head_weight, temperature).gather(1, token_ids[:, None].long())[:, 0]
