"""Recompute a rollout batch's logprobs with the trainer forward and compare bits.

Used by the rollout tests and by bench/rollout.py, which refuses to report throughput when a
single logprob differs. The recompute packs samples into micro-batches in the trainer's
layout (`model.sequence_logprobs`, right-padded rows); batch invariance makes the grouping
irrelevant to the bits.
"""
from __future__ import annotations

import torch

from rl.bits import describe, first_difference
from rollout.batch import RolloutBatch, RolloutSample


@torch.no_grad()
def trainer_logprobs(model, samples: list[RolloutSample], temperature: float,
                     micro_batch_size: int = 16) -> list[torch.Tensor]:
    """fp32 logprobs of each sample's response tokens from the trainer's full forward."""
    out = []
    for start in range(0, len(samples), micro_batch_size):
        chunk = samples[start:start + micro_batch_size]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        lengths = torch.tensor([len(q) for q in seqs])
        ids = torch.zeros((len(seqs), int(lengths.max())), dtype=torch.int64)
        for row, q in enumerate(seqs):
            ids[row, : len(q)] = torch.tensor(q)
        lp = model.sequence_logprobs(ids, lengths, temperature)
        for row, s in enumerate(chunk):
            p = len(s.prompt_ids)
            out.append(lp[row, p: p + len(s.response_ids)].clone())
    return out


def mismatches(batch: RolloutBatch, model, temperature: float | None = None) -> list[str]:
    """One line per sample whose logprobs are not bit-identical to the trainer's (empty: all
    equal). Samples with an error are skipped. Greedy batches (T = 0) compare at T = 1."""
    t = batch.temperature if temperature is None else temperature
    t = t if t > 0 else 1.0
    ok = [s for s in batch.samples if s.error is None]
    problems = []
    for s, ref in zip(ok, trainer_logprobs(model, ok, t)):
        difference = first_difference(s.response_logprobs, ref)
        if difference is not None:
            problems.append(f"prompt {s.prompt_index} sample {s.sample_index} (prompt {len(s.prompt_ids)} "
                            f"tokens), response logprobs: {describe(difference)}")
    return problems
