"""fp32 lm_head + log-softmax at temperature T, the only source of reported logprobs."""
from __future__ import annotations

import torch

from rl.kernels.cpu.matmul import linear

ROWS_PER_CHUNK = 1024  # bounds the [rows, V] fp32 buffer; rows are independent, so bits are too


def log_softmax_logits(hidden: torch.Tensor, lm_head_weight: torch.Tensor, temperature: float = 1.0):
    """hidden [N, Hd], lm_head [V, Hd] -> log_softmax(logits / T) fp32 [N, V]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = linear(hidden, lm_head_weight, out_dtype=torch.float32)
    return torch.log_softmax(logits / temperature, dim=-1)


def logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, token_ids: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """hidden [N, Hd], token_ids [N] -> fp32 [N]: log p(token | prefix) at temperature T."""
    out = []
    for start in range(0, hidden.shape[0], ROWS_PER_CHUNK):
        lp = log_softmax_logits(hidden[start:start + ROWS_PER_CHUNK], lm_head_weight, temperature)
        out.append(lp.gather(1, token_ids[start:start + ROWS_PER_CHUNK, None].long())[:, 0])
    return torch.cat(out) if out else hidden.new_zeros((0,), dtype=torch.float32)
