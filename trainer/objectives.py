"""What a training step minimises, one small class per kind: policy (PPO/GRPO via rl.algos),
value (critic), SFT (response-token cross-entropy).

Role: `TrainerWorker._optimize` owns the mini-batches and optimizer steps, `trainer.step.accumulate`
the micro-batch forward/backward loop; an objective turns one micro-batch into a loss. Every micro-batch loss is normalised by the
*global* denominator of its mini-batch (all ranks, all micro-batches: the token count for
`token-mean`, the non-empty sequence count for the seq-mean modes), so that the sum of the
micro-batch losses over ranks is exactly the mini-batch loss whatever the micro-batch size or
the world size. The worker multiplies by the world size to undo DeepSpeed's gradient average.

Metrics come back per micro-batch as detached 0-dim tensors; `MetricAccumulator` combines them
over micro-batches and ranks (`SHARE_KEYS` are already shares of the mini-batch value: summed;
`*_min`/`*_max`: min/max; everything else: mean weighted by the micro-batch's response tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from rl.algos import AlgoConfig, compute_policy_loss, value_loss

SHARE_KEYS = ("loss", "pg_loss", "kl", "entropy", "vf_loss")


@dataclass
class MicroLoss:
    loss: Tensor                      # scalar to backward (this micro-batch's share)
    metrics: dict[str, Tensor]


def global_denominator(mode: str, num_tokens: float, num_seqs: float) -> float:
    return num_tokens if mode == "token-mean" else num_seqs


class Objective:
    """`forward` runs the model on a micro-batch (the worker pairs it with the backward, so
    collectives line up on every rank); `loss` may raise `ValueError` (e.g. non-finite
    logprobs), which the worker turns into a skipped optimizer step."""

    required: tuple[str, ...] = ()
    output_name = "logprobs"
    loss_agg_mode: str = "token-mean"
    num_minibatches: int = 1
    epochs: int = 1
    recompute_old: bool = False
    with_entropy: bool = False

    def forward(self, engine, mb: dict) -> tuple[Tensor, Tensor | None]:
        """-> (logprobs or values [b, T] fp32 with grad, entropy [b, T] or None)."""
        out = engine(mb["input_ids"], mb["lengths"], float(mb.get("temperature", 1.0)),
                     with_entropy=self.with_entropy)
        return out if self.with_entropy else (out, None)

    def loss(self, out: Tensor, entropy: Tensor | None, mb: dict, num_tokens: float,
             num_seqs: float) -> MicroLoss:
        raise NotImplementedError


class PolicyObjective(Objective):
    """PPO/GRPO actor loss: `rl.algos.compute_policy_loss` on the trainer's logprobs.

    pi_old: with `algo.old_logprobs == 'rollout'` the batch's rollout logprobs (no extra
    forward); with `'recompute'` the worker runs a no-grad forward first and passes it here as
    `old_logprobs`, keeping the rollout's as `rollout_logprobs` for the IS correction."""

    required = ("old_logprobs", "advantages")

    def __init__(self, algo: AlgoConfig):
        self.algo = algo
        self.loss_agg_mode = algo.loss_agg_mode
        self.num_minibatches, self.epochs = algo.num_minibatches, algo.ppo_epochs
        self.recompute_old = algo.recompute_old_logprobs
        self.with_entropy = algo.entropy_coef != 0
        if algo.kl.use_kl_loss:
            self.required = (*self.required, "ref_logprobs")

    def loss(self, out, entropy, mb, num_tokens, num_seqs) -> MicroLoss:
        loss, metrics = compute_policy_loss(
            out, mb["old_logprobs"], mb["advantages"], mb["response_mask"], self.algo,
            ref_logprobs=mb.get("ref_logprobs"), entropy=entropy,
            rollout_logprobs=mb.get("rollout_logprobs", mb["old_logprobs"]),
            global_denominator=global_denominator(self.loss_agg_mode, num_tokens, num_seqs))
        return MicroLoss(loss, metrics)


class ValueObjective(Objective):
    """Critic loss: clipped value loss (`rl.algos.value_loss`) against `returns`, clipped
    around the `values` the advantages were computed with."""

    required = ("returns", "values")
    output_name = "values"

    def __init__(self, algo: AlgoConfig):
        self.algo = algo
        self.loss_agg_mode = algo.loss_agg_mode
        self.num_minibatches, self.epochs = algo.num_minibatches, algo.ppo_epochs

    def loss(self, out, entropy, mb, num_tokens, num_seqs) -> MicroLoss:
        loss, metrics = value_loss(
            out, mb["values"], mb["returns"], mb["response_mask"], clip_range=self.algo.value_clip,
            loss_agg_mode=self.loss_agg_mode, norm_len=self.algo.max_response_len,
            global_denominator=global_denominator(self.loss_agg_mode, num_tokens, num_seqs))
        metrics["loss"] = loss.detach()
        return MicroLoss(loss, metrics)


class SFTObjective(Objective):
    """Supervised warm start: mean negative log-likelihood of the response tokens
    (token-mean over the whole mini-batch, all ranks)."""

    def loss(self, out, entropy, mb, num_tokens, num_seqs) -> MicroLoss:
        mask = mb["response_mask"].bool()
        if not bool(torch.isfinite(out[mask]).all()):
            raise ValueError("non-finite logprobs on response tokens")
        loss = -torch.where(mask, out, torch.zeros((), dtype=out.dtype)).sum() / num_tokens
        return MicroLoss(loss, {"loss": loss.detach()})


class MetricAccumulator:
    """Collects micro-batch metrics on one rank; `result` combines all ranks (rank order, so
    every rank computes the same numbers).

    Share keys (already fractions of their mini-batch's value) are summed, then averaged over
    the optimizer steps; `*_min`/`*_max` take the min/max; `skipped` counts micro-batches the
    loss skipped; every other key is a mean weighted by response tokens."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.extrema: dict[str, float] = {}
        self.notes: list[str] = []      # errors that made a step skip

    def add(self, metrics: dict[str, Tensor], num_tokens: float) -> None:
        for key, value in metrics.items():
            value = float(value)
            if key == "skipped" or key in SHARE_KEYS:
                self.sums[key] = self.sums.get(key, 0.0) + value
            elif key.endswith("_min") or key.endswith("_max"):
                pick = min if key.endswith("_min") else max
                self.extrema[key] = pick(self.extrema.get(key, value), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value * num_tokens
                self.weights[key] = self.weights.get(key, 0.0) + num_tokens

    def result(self, num_steps: int) -> dict[str, float]:
        parts = [self]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.sums, self.weights, self.extrema, self.notes))
            parts = [_Parts(*p) for p in parts]
        sums, weights, extrema = {}, {}, {}
        notes = [note for part in parts for note in part.notes]
        for part in parts:
            for key, value in part.sums.items():
                sums[key] = sums.get(key, 0.0) + value
            for key, value in part.weights.items():
                weights[key] = weights.get(key, 0.0) + value
            for key, value in part.extrema.items():
                pick = min if key.endswith("_min") else max
                extrema[key] = pick(extrema.get(key, value), value)
        out = {"skipped_microbatches": 0.0}
        for key, value in sums.items():
            if key == "skipped":
                out["skipped_microbatches"] = value
            elif key in SHARE_KEYS:
                out[key] = value / max(1, num_steps)
            else:
                out[key] = value / weights[key] if weights[key] > 0 else float("nan")
        out.update(extrema)
        if notes:
            out["failure"] = notes[0]
        return out


@dataclass
class _Parts:
    sums: dict
    weights: dict
    extrema: dict
    notes: list
