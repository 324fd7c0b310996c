"""What a rollout returns: per-sample token ids, fp32 logprobs, finish reason, error, and the
weight version that produced the whole batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutSample:
    prompt_index: int                  # index into the `prompts` given to generate
    sample_index: int                  # 0..n-1 among the samples of that prompt
    prompt_ids: list[int]
    response_ids: list[int]
    # fp32 [len(response_ids)]: log p(token | prefix) at the sampling temperature, from
    # rl.kernels; bit-identical to the trainer's sequence_logprobs at the same weights
    response_logprobs: torch.Tensor
    finish_reason: str | None          # "stop" (a stop token), "length", or None on error
    error: str | None = None           # per-sample failure (e.g. prompt over the context limit)


@dataclass
class RolloutBatch:
    samples: list[RolloutSample]
    weight_version: int                # every token of every sample was produced at this version
    temperature: float
    stats: dict = field(default_factory=dict)   # timings and token counts of this call

    @property
    def num_errors(self) -> int:
        return sum(s.error is not None for s in self.samples)
