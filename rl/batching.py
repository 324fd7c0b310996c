"""Turn a step's rollout samples and rewards into the trainer's padded batch.

Layout (trainer.batch): `input_ids [B, T]` = prompt + response, right-padded; `lengths [B]`;
`response_mask [B, T]` is 1 at the positions of response tokens (position t holds the logprob
of token t); `old_logprobs [B, T]` the rollout's fp32 logprobs there; `advantages [B, T]`;
optional `ref_logprobs`, `values`, `returns`.
"""
from __future__ import annotations

import torch

from rl.algos import AlgoConfig, apply_overlong, dynamic_sampling_filter, kl_penalty_rewards


def pad_samples(samples, temperature: float) -> dict:
    """Rollout samples -> input_ids, lengths, response_mask, old_logprobs (no advantages yet)."""
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    width = int(lengths.max())
    input_ids = torch.zeros((len(seqs), width), dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    old = torch.zeros((len(seqs), width), dtype=torch.float32)
    for row, (s, seq) in enumerate(zip(samples, seqs)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        p, r = len(s.prompt_ids), len(s.response_ids)
        mask[row, p:p + r] = 1.0
        old[row, p:p + r] = s.response_logprobs.float()
    return {"input_ids": input_ids, "lengths": lengths, "response_mask": mask, "old_logprobs": old,
            "temperature": float(temperature)}


def build_train_batch(samples, rewards: list[float], group_ids: list[int], algo: AlgoConfig,
                      temperature: float, ref_logprobs_fn=None, values_fn=None):
    """Samples + outcome rewards -> (trainer batch or None if nothing is left, metrics).

    Applies the overlong rule, DAPO dynamic sampling (if on), the KL reward penalty (if
    configured; needs `ref_logprobs_fn(batch)`), and the advantage estimator (GAE asks
    `values_fn(batch)` for critic values).
    """
    metrics: dict[str, float] = {}
    reward_t = torch.tensor(rewards, dtype=torch.float32)
    if not torch.isfinite(reward_t).all():
        bad = int((~torch.isfinite(reward_t)).sum())
        raise ValueError(f"{bad} non-finite reward(s) in the batch: a reward function returned NaN/inf")
    group_t = torch.tensor(group_ids, dtype=torch.int64)
    resp_len = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.int64)
    finished = torch.tensor([s.finish_reason == "stop" for s in samples])
    reward_t, keep = apply_overlong(reward_t, resp_len, algo, finished)
    rows = torch.arange(len(samples))
    if algo.dynamic_sampling.enabled:
        result = dynamic_sampling_filter(reward_t, group_t)
        metrics["batch/dropped_groups"] = float(result.num_dropped_groups)
        rows = result.kept_indices
        if rows.numel() == 0:
            return None, metrics
    samples = [samples[i] for i in rows.tolist()]
    reward_t, group_t, keep = reward_t[rows], group_t[rows], keep[rows]
    batch = pad_samples(samples, temperature)
    mask = batch["response_mask"]
    if mask.sum() == 0:
        return None, {**metrics, "batch/empty": 1.0}
    token_rewards = None
    if ref_logprobs_fn is not None:
        batch["ref_logprobs"] = ref_logprobs_fn(batch)
        if algo.kl.kl_reward_coef:
            token_rewards = kl_penalty_rewards(batch["old_logprobs"], batch["ref_logprobs"], mask,
                                               algo.kl.type, algo.kl.kl_reward_coef)
    values = None
    if algo.needs_critic:
        values = values_fn(batch)
        batch["values"] = values
    estimator = algo.build_advantage_estimator()
    kwargs = {"group_ids": group_t}
    if values is not None:
        kwargs["values"] = values
    if token_rewards is not None:
        kwargs["token_rewards"] = token_rewards
    result = estimator(reward_t, mask, **kwargs)
    batch["advantages"] = result.advantages.float()
    batch["returns"] = result.returns.float()
    batch["response_mask"] = mask * keep[:, None].float()
    for k, v in result.metrics.items():
        metrics[k if "/" in k else f"adv/{k}"] = float(v)
    return batch, metrics
