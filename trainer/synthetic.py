"""Synthetic RL batches in the trainer's format, for tests and `bench/train_step.py`.

Prompts and responses of random tokens with random lengths, GRPO-like advantages (one value
per sequence, on its response tokens), and `old_logprobs` left for the caller to fill (from a
forward at the current weights, which is what the rollout would report).
"""
from __future__ import annotations

import torch


def random_batch(vocab_size: int, num_rows: int, max_len: int, seed: int = 0,
                 min_prompt: int = 2, max_prompt: int = 6, low_id: int = 4) -> dict:
    """input_ids [B, T] right-padded with 0, lengths [B], response_mask [B, T] (response =
    tokens after the prompt), advantages [B, T] (a per-row N(0, 1) value on the response),
    temperature 1.0."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros((num_rows, max_len), dtype=torch.int64)
    lengths = torch.randint(max_prompt + 2, max_len + 1, (num_rows,), generator=gen)
    prompt_lens = torch.randint(min_prompt, max_prompt + 1, (num_rows,), generator=gen)
    mask = torch.zeros((num_rows, max_len))
    for b in range(num_rows):
        n = int(lengths[b])
        input_ids[b, :n] = torch.randint(low_id, vocab_size, (n,), generator=gen)
        mask[b, int(prompt_lens[b]):n] = 1.0
    advantages = torch.randn((num_rows, 1), generator=gen) * mask
    return {"input_ids": input_ids, "lengths": lengths, "response_mask": mask,
            "advantages": advantages, "temperature": 1.0}
