"""Mode `stock`: the plain torch ops people use today, with no invariance.

Only for `lockstep mismatch --kernels stock`, to show what drift looks like: bf16
`F.linear` (GEMM blocking follows M), HF-style RMSNorm, SDPA per sequence (a decode row is
computed differently from the same row in prefill), lightning attention in chunk form for a
full forward but token-by-token recurrence in decode, a model-dtype router with `torch.topk`,
and index_add expert combine. Same signatures as the lockstep backends. If `fla` is installed
on a GPU, its simple-GLA kernels are used for lightning attention.
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


def softmax_attention(q, k, v, batch: BatchMeta, kv_cache=None, scale=None):
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


def lightning_attention(q, k, v, log_decay, batch: BatchMeta, state=None, chunk_size=64):
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


def moe_experts(x, topk_ids, topk_weights, gate_w, up_w, down_w):
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
