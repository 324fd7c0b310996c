"""Reference decode path: batched generation with our caches, no serving engine.

The yardstick for parity tests and GPU benchmarks (the production rollout is vLLM, see
`rollout/vllm_plugin.py`). It keeps the caches of DESIGN.md §2 exactly as vLLM does: a paged
KV cache per softmax layer (blocks handed out from a shuffled free list, so a sequence's
blocks are not contiguous) and a per-request state slot per linear-attention layer. Prompts
are prefilled together (optionally chunked), then all unfinished sequences decode one token
per step. Each request samples with rollout.sampling (Gumbel-max keyed by the request's seed and
the token position), exactly as vLLM does through the plugin, so its tokens do not depend on
which other requests share the batch, and vLLM and this decoder sample the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rl.kernels import BatchMeta
from rl.model.modeling import BailingMoeLinearV2ForCausalLM
from rollout.sampling import request_seed, sample


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)      # fp32 values, at temperature T
    finish_reason: str | None = None


class Caches:
    """Per-layer caches: paged KV for softmax layers, (S, pending) state slots for linear layers."""

    def __init__(self, model: BailingMoeLinearV2ForCausalLM, num_blocks: int, block_size: int,
                 num_slots: int, seed: int = 0):
        cfg = model.config
        dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
        self.block_size = block_size
        self.layers = []
        for idx, layer in enumerate(model.model.layers):
            if cfg.is_softmax_layer(idx):
                shape = (num_blocks, cfg.num_key_value_heads, block_size, 2 * cfg.head_dim)
                # poison: unwritten cache memory must never be read
                self.layers.append(torch.full(shape, float("nan"), dtype=dtype, device=device))
            else:
                s_shape, p_shape = layer.attention.state_shapes()
                self.layers.append((torch.full((num_slots, *s_shape), float("nan"), device=device),
                                    torch.full((num_slots, *p_shape), float("nan"), device=device)))
        gen = torch.Generator().manual_seed(seed)
        self.free_blocks = torch.randperm(num_blocks, generator=gen).tolist()

    def allocate(self) -> int:
        if not self.free_blocks:
            raise RuntimeError("reference decoder: out of KV blocks; raise num_blocks")
        return self.free_blocks.pop()


def check_prompts(prompts: list[list[int]], max_len: int, vocab_size: int) -> None:
    """Refuse bad prompts up front, naming the prompt index, before any work is done."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) >= max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's limit is "
                             f"{max_len} positions (max_position_embeddings), leaving no room to generate")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


@torch.no_grad()
def generate(model: BailingMoeLinearV2ForCausalLM, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 1.0, seed: int = 0, eos_token_id: int | None = None,
             block_size: int = 16, prefill_chunk: int | None = None, trace=None) -> list[Generation]:
    """Generate for every prompt; returns tokens and their fp32 logprobs at `temperature`.

    Prompt i samples with seed `rollout.sampling.request_seed(seed, i)`, as RolloutWorker does
    for `generate(prompts, {"seed": seed}, n=1)`.
    `prefill_chunk` splits prompt prefill into pieces of at most that many tokens per
    sequence (chunked prefill). `trace` (an rl.model.Trace) records activations per call.
    """
    cfg = model.config
    check_prompts(prompts, cfg.max_position_embeddings, cfg.vocab_size)
    device = model.lm_head.weight.device
    num_seqs = len(prompts)
    max_total = max(len(p) for p in prompts) + max_new_tokens
    blocks_per_seq = -(-max_total // block_size)
    caches = Caches(model, num_seqs * blocks_per_seq + 1, block_size, num_seqs + 1, seed)
    block_table = torch.zeros((num_seqs, blocks_per_seq), dtype=torch.int32)
    state_slot = torch.arange(num_seqs, 0, -1)          # slots in reverse order: index != slot
    gens = [Generation(prompt=list(p)) for p in prompts]
    seeds = torch.tensor([request_seed(seed, i) for i in range(num_seqs)], dtype=torch.int64)
    tokens = [list(p) for p in prompts]
    cached = [0] * num_seqs

    def step(active: list[int], chunk: int | None):
        new = [tokens[i][cached[i]:] if chunk is None else tokens[i][cached[i]:cached[i] + chunk] for i in active]
        lens = [len(t) for t in new]
        batch = BatchMeta.from_lengths(lens, [cached[i] for i in active], device=device)
        slots = []
        for i, n in zip(active, lens):
            for pos in range(cached[i], cached[i] + n):
                if pos % block_size == 0:
                    block_table[i, pos // block_size] = caches.allocate()
                slots.append(int(block_table[i, pos // block_size]) * block_size + pos % block_size)
        batch.block_table = block_table[active].to(device)
        batch.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        batch.state_indices = state_slot[active].to(device)
        ids = torch.tensor([t for seq in new for t in seq], dtype=torch.int64, device=device)
        hidden = model.forward_tokens(ids, batch, caches.layers, trace)
        for i, n in zip(active, lens):
            cached[i] += n
        last_rows = (batch.query_start_loc[1:] - 1).to(device)
        return hidden[last_rows]

    # prefill (chunked if asked), sampling the first token when a prompt is fully cached
    pending = list(range(num_seqs))
    while pending:
        hidden = step(pending, prefill_chunk)
        done = [i for i in pending if cached[i] == len(tokens[i])]
        rows = torch.tensor([pending.index(i) for i in done], dtype=torch.int64)
        pending = [i for i in pending if cached[i] < len(tokens[i])]
        if done:
            _emit(model, hidden[rows], done, temperature, seeds, gens, tokens, eos_token_id, max_new_tokens)
    active = [i for i in range(num_seqs) if gens[i].finish_reason is None]
    while active:
        hidden = step(active, None)
        _emit(model, hidden, active, temperature, seeds, gens, tokens, eos_token_id, max_new_tokens)
        active = [i for i in active if gens[i].finish_reason is None]
    return gens


def _emit(model, hidden, seqs, temperature, seeds, gens, tokens, eos_token_id, max_new_tokens):
    lp = model.log_softmax(hidden, temperature)
    positions = torch.tensor([len(gens[i].tokens) for i in seqs], dtype=torch.int64)
    drawn = sample(lp, seeds[list(seqs)], positions).tolist()
    for row, i in enumerate(seqs):
        tok = drawn[row]
        gens[i].tokens.append(tok)
        gens[i].logprobs.append(float(lp[row, tok]))
        tokens[i].append(tok)
        if eos_token_id is not None and tok == eos_token_id:
            gens[i].finish_reason = "stop"
        elif len(gens[i].tokens) >= max_new_tokens:
            gens[i].finish_reason = "length"
