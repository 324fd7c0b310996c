"""MoE routing and expert compute on CPU.

Router: fp32 logits through the invariant `linear`, sigmoid built from exp, selection on
score + expert_bias with group-limited top-k; every top-k is a stable sort, so ties go to the
lower index. Experts: each expert's SwiGLU runs its tokens through the invariant `linear`
(a token's result does not depend on how many tokens the expert got), and each token's
expert outputs are summed in fp32 in ascending expert order. The rows reach the experts by
one gather per expert under autograd (trainer) or by one sorted gather without it (rollout):
the same forward bits (tested), two ways of summing x's gradient (see `_per_expert_gathers`).
Without autograd, where the rollout engine asked for stacked copies (`prepack_experts`), with
AMX tiles all experts run in two grouped calls (`_grouped_experts`: each used expert's weights
read once, no per-expert Python), with the SwiGLU step (`elementwise.swiglu`) and the
weighted sum as C passes (csrc/moe_rows.c, the torch forms' bits). Without AMX, where it is
cheaper (decode batches, see `_dense_choice`), the gate/up and/or the down products run once
over all experts' weights stacked (`_stacked_experts`): a
product's output element does not depend on how many weight rows share the call (tested at
the model shapes), so the selected columns carry the per-expert bits in one oneDNN call
instead of one or two per expert.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from rl.kernels.cpu.elementwise import sigmoid, swiglu
from rl.kernels.cpu import tiles
from rl.kernels.cpu.matmul import _packed, bf16_tile_rows, current_derived, keep_derived, linear, prepack
from rl.kernels.cpu.native import library

# the fixed cost of one oneDNN call (~50 us here at tiny decode shapes) in weight bytes read
# in the same time (~5 GB/s)
CALL_COST_BYTES = 256 << 10
# stacked copies of one layer's expert weights are kept only up to this size
STACK_MAX_BYTES = 64 << 20
_STACK_ATTR = "_lockstep_stacked_experts"


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


@functools.lru_cache(maxsize=1)
def _select_kernel():
    fn = library().select_experts_rows
    fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, ptr, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_float, ptr, ptr]
    return fn


def _select_experts_c(scores, expert_bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """`select_experts` in one C pass (csrc/route.c), the same choices and bits (tests compare
    the two); inference only: the weights carry no gradient."""
    scores = scores.contiguous()
    n, e = scores.shape
    bias = None if expert_bias is None else expert_bias.float().contiguous()
    ids = torch.empty((n, top_k), dtype=torch.int64)
    weights = torch.empty((n, top_k), dtype=torch.float32)
    _select_kernel()(n, e, scores.data_ptr(), None if bias is None else bias.data_ptr(), top_k, n_group,
                     topk_group, int(norm_topk_prob), routed_scaling_factor, ids.data_ptr(), weights.data_ptr())
    return weights, ids


def _select_in_c(scores, expert_bias, top_k, n_group, topk_group) -> bool:
    num_experts = scores.shape[-1]
    return (scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.dim() == 2
            and not (torch.is_grad_enabled() and scores.requires_grad) and 0 < top_k <= num_experts
            and (n_group <= 1 or (num_experts % n_group == 0 and num_experts // n_group >= 2
                                  and 0 < topk_group <= n_group
                                  and top_k <= topk_group * (num_experts // n_group))))


def moe_route(x, gate_weight, expert_bias, top_k, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor):
    """x [N, Hd], gate_weight [E, Hd] -> (weights fp32 [N, k], ids int64 [N, k], logits fp32 [N, E]).
    Without autograd the selection runs in C (`_select_experts_c`, the same bits)."""
    logits = linear(x, gate_weight, out_dtype=torch.float32)
    scores = sigmoid(logits)
    select = _select_experts_c if _select_in_c(scores, expert_bias, top_k, n_group, topk_group) else select_experts
    weights, ids = select(scores, expert_bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    return weights, ids, logits


def expert_mlp(x, gate_w, up_w, down_w):
    """SwiGLU of one expert on its rows: x [M, Hd] -> [M, Hd] in x.dtype."""
    return linear(swiglu(linear(x, gate_w), linear(x, up_w)), down_w)


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


def _expert_counts(flat_ids: torch.Tensor, num_experts: int) -> list[int]:
    """How many (token, slot) pairs each expert got, by expert index."""
    return torch.bincount(flat_ids, minlength=num_experts).tolist()


def _sorted_by_expert(rows: torch.Tensor, order: torch.Tensor, counts: list[int], fn) -> torch.Tensor:
    """The sorted gather without autograd (rollout). `rows` [P, W_in] are the (token, slot)
    pairs' inputs in expert order (row i belongs to pair `order[i]`, `order` the stable argsort
    of the pairs' expert ids, `counts` per expert); `fn(e, rows_e)` computes expert e's
    outputs. Returns them [P, W_out] in pair order, with one scatter. Each expert's rows reach
    `fn` in the order the per-expert gathers give them, and a row's bits do not depend on the
    other rows anyway (the products are batch-invariant)."""
    parts, start = [], 0
    for e, count in enumerate(counts):
        if count:
            parts.append(fn(e, rows[start:start + count]))
            start += count
    values = torch.cat(parts) if len(parts) > 1 else parts[0]
    out = values.new_empty((order.numel(), values.shape[1]))
    out[order] = values
    return out


def _one_sorted_gather(x, flat_ids, k, gate_w, up_w, down_w, counts: list[int] | None = None):
    """The same outputs as `_per_expert_gathers` without autograd (rollout): one gather of the
    rows sorted by expert, each expert's whole SwiGLU on its rows, one scatter back."""
    counts = _expert_counts(flat_ids, len(gate_w)) if counts is None else counts
    order = torch.argsort(flat_ids, stable=True)
    return _sorted_by_expert(x[order // k], order, counts,
                             lambda e, r: expert_mlp(r, gate_w[e], up_w[e], down_w[e]))


def _stacked(parts: list[torch.Tensor], key: str, holder: torch.Tensor, stack=None) -> torch.Tensor | None:
    """The packed stack(parts) kept on `holder` (an expert's weight) by `prepack_experts`, while
    it is current by matmul's one freshness rule (`current_derived`: the same tensors at the
    same versions); None when there is none or it is stale. With `stack`, (re)builds it. Never
    built lazily inside a forward (see `keep_derived`): only the rollout, which rebuilds after
    every weight load, opts in."""
    if stack is None:
        return current_derived(holder, key, parts)
    with torch.inference_mode(False):   # vLLM runs in inference mode; the pack check needs
        stacked = stack()               # the version counter an inference tensor lacks
    prepack([stacked])
    keep_derived(holder, key, parts, stacked)
    return stacked


def _stacked_gate_up(gate_w, up_w, build: bool = False) -> torch.Tensor | None:
    """[E*2*I, Hd]: expert e's gate rows, then its up rows, for e = 0, 1, ..."""
    def stack():
        return torch.stack([torch.stack([g, u]) for g, u in zip(gate_w, up_w)]).reshape(-1, gate_w[0].shape[1])
    return _stacked([*gate_w, *up_w], _STACK_ATTR + "_gate_up", gate_w[0], stack if build else None)


def _stacked_down(down_w, build: bool = False) -> torch.Tensor | None:
    """[E*Hd, I]: the experts' down weights one after the other."""
    def stack():
        return torch.stack(list(down_w)).reshape(-1, down_w[0].shape[1])
    return _stacked(list(down_w), _STACK_ATTR + "_down", down_w[0], stack if build else None)


def _stackable(gate_w) -> bool:
    if not isinstance(gate_w, (list, tuple)) or gate_w[0].dtype != torch.bfloat16 or gate_w[0].device.type != "cpu":
        return False
    e, (inter, hidden) = len(gate_w), gate_w[0].shape
    return 3 * e * inter * hidden * 2 <= STACK_MAX_BYTES


def prepack_experts(gate_w, up_w, down_w) -> int:
    """Inference only (the rollout engine, after every weight load): keep stacked, packed copies
    of one MoE layer's expert weights so that `moe_experts` without autograd may run a product
    over all experts at once where that is cheaper (same bits). Layers over STACK_MAX_BYTES,
    non-bf16 weights: nothing. Returns 1 if stacked, else 0. A later in-place change of any
    expert weight makes the copy unused until the next call."""
    if not _stackable(gate_w):
        return 0
    _stacked_gate_up(gate_w, up_w, build=True)
    _stacked_down(down_w, build=True)
    return 1


@functools.lru_cache(maxsize=1)
def _combine_kernel():
    fn = library().combine_rows
    fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr]
    return fn


def _grouped_experts(x, flat_ids, k, gate_w, up_w, down_w, counts: list[int]):
    """(outputs, order) without autograd, with AMX tiles and the stacked packs `prepack_experts`
    left: the (token, slot) rows sorted by expert (`order[p]`: the pair whose row is p), every
    used expert's gate/up product in one call (`tiles.product_groups` over the stacked gate/up
    weight's per-expert parts, gathering x's rows on the way), the SwiGLU step once, the down
    products in one call; each expert's weights are read once. outputs [N*k, Hd] in sorted
    order, each row the bits `expert_mlp` gives its pair (the tile product's element depends on
    its row and weight row alone; `swiglu` element-wise). None where any of that is missing."""
    if not tiles.available() or x.dtype != torch.bfloat16 or not _stackable(gate_w):
        return None
    inter, hidden_size = gate_w[0].shape
    if (2 * inter) % tiles.PART_ROWS or hidden_size % tiles.PART_ROWS:
        return None
    stacked_gate_up, stacked_down = _stacked_gate_up(gate_w, up_w), _stacked_down(down_w)
    if stacked_gate_up is None or stacked_down is None:
        return None
    packed_gate_up, packed_down = _packed(stacked_gate_up), _packed(stacked_down)
    if not isinstance(packed_gate_up, tiles.Packed) or not isinstance(packed_down, tiles.Packed):
        return None
    order = torch.argsort(flat_ids, stable=True)
    gate_up = tiles.product_groups(x, counts, packed_gate_up, len(gate_w), x.dtype, rows=order // k)   # [P, 2I]
    hidden = swiglu(gate_up[:, :inter], gate_up[:, inter:])
    return tiles.product_groups(hidden, counts, packed_down, len(gate_w), x.dtype), order


def _combine_sorted(outputs: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """`moe_experts`' weighted sum for bf16 rows in sorted order (`_grouped_experts`), in one C
    pass (csrc/moe_rows.c): the same fp32 products and sums in slot order, the same bits. The
    slots are the pairs' (order.numel() / N); like the torch form, weight columns past them
    are not read."""
    n = topk_weights.shape[0]
    k = order.numel() // n
    weights = topk_weights[:, :k].float().contiguous()
    order = order.contiguous()
    where = torch.empty(n * k, dtype=torch.int64)
    out = torch.empty((n, outputs.shape[1]), dtype=torch.bfloat16)
    _combine_kernel()(n, k, outputs.shape[1], outputs.data_ptr(), order.data_ptr(), weights.data_ptr(),
                    where.data_ptr(), out.data_ptr())
    return out


def _calls_cost(rows: int, n: int, k: int) -> int:
    """Bytes-equivalent cost of a bf16 product of `rows` rows with a [n, k] weight: each row
    tile is one oneDNN call that reads the whole weight (decode products are bound by these
    bytes and by the call's fixed cost)."""
    tiles = max(1, -(-rows // bf16_tile_rows(rows, k)))
    return tiles * (CALL_COST_BYTES + 2 * n * k)


def _dense_choice(x, flat_ids, gate_w, up_w, down_w, counts: list[int] | None = None) -> tuple[bool, bool]:
    """(gate/up over all experts' stacked weights?, down likewise?): each where `prepack_experts`
    left a current stack and it costs fewer bytes-equivalents than the per-expert products of
    the sorted path. `counts`: `_expert_counts(flat_ids)` where the caller has it."""
    if x.dtype != torch.bfloat16 or not _stackable(gate_w):
        return False, False
    has_gate_up = _stacked_gate_up(gate_w, up_w) is not None
    has_down = _stacked_down(down_w) is not None
    if not (has_gate_up or has_down):
        return False, False
    e, (inter, hidden) = len(gate_w), gate_w[0].shape
    used = [c for c in (_expert_counts(flat_ids, e) if counts is None else counts) if c]
    sorted_gate_up = sum(2 * _calls_cost(c, inter, hidden) for c in used)
    sorted_down = sum(_calls_cost(c, hidden, inter) for c in used)
    return (has_gate_up and _calls_cost(x.shape[0], e * 2 * inter, hidden) < sorted_gate_up,
            has_down and _calls_cost(flat_ids.numel(), e * hidden, inter) < sorted_down)


def _stacked_experts(x, flat_ids, k, gate_w, up_w, down_w, dense_gate_up: bool, dense_down: bool,
                     counts: list[int] | None = None):
    """(token, slot) outputs [N*k, Hd] without autograd, each of the two stages either over all
    experts' stacked weights (dense: the unused experts' columns are thrown away) or per expert
    on the rows sorted by expert (`_sorted_by_expert`). Every output element is the one
    `expert_mlp` computes: the same products (a product's element does not depend on the weight
    rows beside it, tested) and the same element-wise steps (`swiglu`)."""
    e, inter = len(gate_w), gate_w[0].shape[0]
    pairs = flat_ids.numel()
    pair = torch.arange(pairs, device=x.device)
    order = None
    if not (dense_gate_up and dense_down):
        counts = _expert_counts(flat_ids, e) if counts is None else counts
        order = torch.argsort(flat_ids, stable=True)
    if dense_gate_up:
        y = linear(x, _stacked_gate_up(gate_w, up_w)).view(x.shape[0], e, 2, inter)[pair // k, flat_ids]
        hidden = swiglu(y[:, 0], y[:, 1])                                   # [N*k, I]
    else:
        hidden = _sorted_by_expert(x[order // k], order, counts,
                                   lambda i, r: swiglu(linear(r, gate_w[i]), linear(r, up_w[i])))
    if dense_down:
        return linear(hidden, _stacked_down(down_w)).view(pairs, e, x.shape[1])[pair, flat_ids]
    return _sorted_by_expert(hidden[order], order, counts, lambda i, r: linear(r, down_w[i]))


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
        counts = _expert_counts(flat_ids, len(gate_w))
        grouped = _grouped_experts(x, flat_ids, k, gate_w, up_w, down_w, counts)
        if grouped is not None:
            return _combine_sorted(*grouped, topk_weights)
        dense_gate_up, dense_down = _dense_choice(x, flat_ids, gate_w, up_w, down_w, counts)
        if dense_gate_up or dense_down:
            outputs = _stacked_experts(x, flat_ids, k, gate_w, up_w, down_w, dense_gate_up, dense_down, counts)
        else:
            outputs = _one_sorted_gather(x, flat_ids, k, gate_w, up_w, down_w, counts)
    outputs = outputs.view(num_tokens, k, -1).float()
    weights = topk_weights.float()
    combined = weights[:, 0, None] * outputs[:, 0]
    for slot in range(1, k):                                 # ascending expert id, fixed order
        combined = combined + weights[:, slot, None] * outputs[:, slot]
    return combined.to(x.dtype)
