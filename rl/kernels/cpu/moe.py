"""MoE routing and expert compute on CPU.

Router: fp32 logits through the invariant `linear`, sigmoid built from exp, selection on
score + expert_bias with group-limited top-k; every top-k is a stable sort, so ties go to the
lower index. Experts: each expert's SwiGLU runs its tokens through the invariant `linear`
(a token's result does not depend on how many tokens the expert got), and each token's
expert outputs are summed in fp32 in ascending expert order. The rows reach the experts by
one gather per expert under autograd (trainer) or by one sorted gather without it (rollout):
the same forward bits (tested), two ways of summing x's gradient (see `_per_expert_gathers`).
"""
from __future__ import annotations

import torch

from rl.kernels.cpu.elementwise import sigmoid, silu
from rl.kernels.cpu.matmul import linear


def stable_topk(x: torch.Tensor, k: int):
    """Top-k along the last dim; ties keep the lower index first."""
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def select_experts(scores: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                   n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
                   topk=stable_topk):
    """Group-limited top-k on fp32 sigmoid scores [N, E] -> (weights fp32 [N, k], ids [N, k]) by expert id."""
    num_tokens, num_experts = scores.shape
    choice = scores + expert_bias.float() if expert_bias is not None else scores
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        top2 = topk(grouped, 2)[0]
        group_score = top2[..., 0] + top2[..., 1]
        _, keep_groups = topk(group_score, topk_group)
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter(1, keep_groups, True)
        expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
        choice = torch.where(expert_mask, choice, torch.tensor(float("-inf"), device=scores.device))
    _, ids = topk(choice, top_k)
    ids, _ = torch.sort(ids, dim=-1)                       # combine in ascending expert order
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        total = weights[:, 0]
        for slot in range(1, weights.shape[1]):          # fixed order, no ATen reduction
            total = total + weights[:, slot]
        weights = weights / (total[:, None] + 1e-20)
    return weights * routed_scaling_factor, ids


def moe_route(x, gate_weight, expert_bias, top_k, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor):
    """x [N, Hd], gate_weight [E, Hd] -> (weights fp32 [N, k], ids int64 [N, k], logits fp32 [N, E])."""
    logits = linear(x, gate_weight, out_dtype=torch.float32)
    weights, ids = select_experts(sigmoid(logits), expert_bias, top_k, n_group, topk_group,
                                  norm_topk_prob, routed_scaling_factor)
    return weights, ids, logits


def expert_mlp(x, gate_w, up_w, down_w):
    """SwiGLU of one expert on its rows: x [M, Hd] -> [M, Hd] in x.dtype."""
    hidden = silu(linear(x, gate_w).float()) * linear(x, up_w).float()
    return linear(hidden.to(x.dtype), down_w)


def _per_expert_gathers(x, flat_ids, k, gate_w, up_w, down_w):
    """(token, slot) outputs [N*k, Hd], each expert's rows gathered on their own. The trainer's
    path: a single sorted gather gives the same forward bits, but autograd then sums x's
    gradient contributions in another order, and the demo's SFT learned measurably worse with
    it (3 seeds; see git log of this file), so training keeps this form."""
    outputs = x.new_zeros((flat_ids.numel(), x.shape[1]), dtype=x.dtype)
    for e in torch.unique(flat_ids).tolist():
        pairs = (flat_ids == e).nonzero(as_tuple=True)[0]
        y = expert_mlp(x[pairs // k], gate_w[e], up_w[e], down_w[e])
        outputs = outputs.index_put((pairs,), y)
    return outputs


def _one_sorted_gather(x, flat_ids, k, gate_w, up_w, down_w):
    """The same outputs without autograd (rollout): one gather of the rows sorted by expert,
    one scatter back; each expert's rows reach `expert_mlp` in the same order as above, and a
    row's bits do not depend on the other rows anyway."""
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=len(gate_w)).tolist()
    rows = x[order // k]
    results, start = [], 0
    for e, count in enumerate(counts):
        if count:
            results.append(expert_mlp(rows[start:start + count], gate_w[e], up_w[e], down_w[e]))
            start += count
    outputs = torch.empty((flat_ids.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
    if results:
        outputs[order] = torch.cat(results) if len(results) > 1 else results[0]
    return outputs


def moe_experts(x, topk_ids, topk_weights, gate_w, up_w, down_w):
    """x [N, Hd]; topk_ids/topk_weights [N, k] (ids ascending); per-expert weights indexable
    by expert: gate_w[e], up_w[e] [I, Hd], down_w[e] [Hd, I] -> [N, Hd] in x.dtype."""
    num_tokens, k = topk_ids.shape
    if num_tokens == 0:
        return x.new_zeros(x.shape)
    flat_ids = topk_ids.reshape(-1)
    if torch.is_grad_enabled() and x.requires_grad:
        outputs = _per_expert_gathers(x, flat_ids, k, gate_w, up_w, down_w)
    else:
        outputs = _one_sorted_gather(x, flat_ids, k, gate_w, up_w, down_w)
    outputs = outputs.view(num_tokens, k, -1).float()
    weights = topk_weights.float()
    combined = weights[:, 0, None] * outputs[:, 0]
    for slot in range(1, k):                                 # ascending expert id, fixed order
        combined = combined + weights[:, slot, None] * outputs[:, slot]
    return combined.to(x.dtype)
