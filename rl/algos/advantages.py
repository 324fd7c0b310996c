"""Advantage estimators: GRPO, Dr.GRPO, RLOO, REINFORCE++ (+ group baseline), GAE.

Role: the driver calls one estimator per step on the whole rollout batch, after rewards and
before training. Each estimator is a small class registered by name; pick one with
``get_advantage_estimator(name, **params)`` (or ``AlgoConfig.build_advantage_estimator()``),
never with a chain of string ``if``s.

Shapes (B sequences, T padded token positions):
    rewards        [B]     outcome reward per sequence (float; ints are cast to float32)
    response_mask  [B, T]  1 on response tokens
    group_ids      [B]     int, samples of the same prompt share an id (group estimators)
    values         [B, T]  critic values V(s_t) (GAE only)
    token_rewards  [B, T]  extra per-token rewards, e.g. the KL penalty ``-coef * kl``
                           (only estimators with ``supports_token_rewards``)
    -> AdvantageResult(advantages [B, T], returns [B, T], metrics), both 0 off the mask.

Outcome rewards are broadcast to every response token by the group estimators (GRPO, Dr.GRPO,
RLOO: the whole response shares one advantage) and placed on the last response token by the
return-based ones (REINFORCE++, GAE), which then propagate it backwards with gamma/lambda.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from rl.algos.masked import (
    check_finite,
    check_response_mask,
    check_same_shape,
    discounted_cumsum,
    masked_mean,
    masked_whiten,
    place_on_last_token,
    zero_outside,
)

if TYPE_CHECKING:
    from rl.algos.config import AlgoConfig


@dataclass(frozen=True)
class AdvantageResult:
    """Output of an estimator. ``metrics`` values are detached 0-dim tensors."""

    advantages: Tensor  # [B, T], 0 off the response mask
    returns: Tensor  # [B, T], targets for the critic (GAE) or the undiscounted signal
    metrics: dict[str, Tensor] = field(default_factory=dict)


ADVANTAGE_ESTIMATORS: dict[str, type[AdvantageEstimator]] = {}


def register_advantage_estimator(*names: str):
    """Class decorator registering an estimator under one or more names."""

    def decorate(cls: type[AdvantageEstimator]) -> type[AdvantageEstimator]:
        for name in names:
            if name in ADVANTAGE_ESTIMATORS:
                raise ValueError(f"advantage estimator {name!r} registered twice")
            ADVANTAGE_ESTIMATORS[name] = cls
        return cls

    return decorate


def get_advantage_estimator(name: str, **params: Any) -> AdvantageEstimator:
    """Instantiate the estimator registered as ``name`` with its constructor ``params``."""
    try:
        cls = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        allowed = ", ".join(sorted(ADVANTAGE_ESTIMATORS))
        raise ValueError(f"unknown advantage estimator {name!r}; allowed: {allowed}") from None
    return cls(**params)


class AdvantageEstimator:
    """Base class. Subclasses implement ``_compute`` on validated inputs."""

    needs_group_ids: ClassVar[bool] = False
    needs_values: ClassVar[bool] = False
    supports_token_rewards: ClassVar[bool] = False
    # The loss aggregation this estimator is meant to be trained with (Dr.GRPO's unbiasedness
    # depends on its constant-length normaliser); AlgoConfig uses it when loss_agg_mode is unset.
    default_loss_agg_mode: ClassVar[str] = "token-mean"

    @classmethod
    def from_config(cls, cfg: AlgoConfig) -> AdvantageEstimator:
        return cls()

    def __call__(
        self,
        rewards: Tensor,
        response_mask: Tensor,
        *,
        group_ids: Tensor | None = None,
        values: Tensor | None = None,
        token_rewards: Tensor | None = None,
    ) -> AdvantageResult:
        mask = check_response_mask(response_mask)
        batch_size = mask.shape[0]
        if rewards.shape != (batch_size,):
            raise ValueError(f"rewards must be [B]=[{batch_size}], got {tuple(rewards.shape)}")
        if not rewards.is_floating_point():
            rewards = rewards.float()
        check_finite("rewards", rewards)
        name = type(self).__name__
        if self.needs_group_ids:
            if group_ids is None:
                raise ValueError(f"{name} needs group_ids [B]")
            if group_ids.shape != (batch_size,) or group_ids.is_floating_point():
                raise ValueError(
                    f"group_ids must be an integer [B]=[{batch_size}] tensor, "
                    f"got {group_ids.dtype} {tuple(group_ids.shape)}"
                )
        if self.needs_values:
            if values is None:
                raise ValueError(f"{name} needs critic values [B, T]")
            check_same_shape("response_mask", mask, values=values)
            check_finite("values", values, mask)
        if token_rewards is not None:
            if not self.supports_token_rewards:
                raise ValueError(
                    f"{name} takes outcome rewards only; token_rewards (e.g. a KL reward "
                    f"penalty) need reinforce_pp or ppo"
                )
            check_same_shape("response_mask", mask, token_rewards=token_rewards)
            check_finite("token_rewards", token_rewards, mask)
        result = self._compute(rewards, mask, group_ids, values, token_rewards)
        check_finite("advantages", result.advantages)
        check_finite("returns", result.returns)
        return result

    def _compute(
        self,
        rewards: Tensor,
        mask: Tensor,
        group_ids: Tensor | None,
        values: Tensor | None,
        token_rewards: Tensor | None,
    ) -> AdvantageResult:
        raise NotImplementedError


def _broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    """``[B] -> [B, T]``: the sequence's value on each of its response tokens, 0 elsewhere."""
    return zero_outside(per_seq[:, None].expand(mask.shape), mask)


def _group_sums(x: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group sum and count of ``x [B]``; returns (sums [G], counts [G], inverse [B])."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    return sums, counts.to(x.dtype), inverse


def _require_group_size(counts: Tensor, estimator: str, why: str) -> None:
    if bool((counts < 2).any()):
        raise ValueError(
            f"{estimator} needs at least 2 samples per group ({why}); "
            f"smallest group has {int(counts.min())}"
        )


def _outcome_metrics(rewards: Tensor, advantages: Tensor, mask: Tensor) -> dict[str, Tensor]:
    return {
        "reward_mean": rewards.mean().detach(),
        "advantage_mean": masked_mean(advantages, mask).detach(),
        "advantage_abs_max": advantages.abs().max().detach(),
    }


@register_advantage_estimator("grpo")
class GRPO(AdvantageEstimator):
    """GRPO: ``A_i = (r_i - mean_g) / (std_g + eps)`` over the sample's group, on every token.

    ``std_g`` is the unbiased (N-1) standard deviation, as in DeepSeekMath/TRL/verl; groups whose
    rewards are all equal get advantage 0 (numerator 0), not NaN.
    """

    needs_group_ids = True
    scale_by_std: ClassVar[bool] = True

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    @classmethod
    def from_config(cls, cfg: AlgoConfig) -> AdvantageEstimator:
        return cls(eps=cfg.adv_eps)

    def _compute(self, rewards, mask, group_ids, values, token_rewards) -> AdvantageResult:
        sums, counts, inverse = _group_sums(rewards, group_ids)
        centred = rewards - (sums / counts)[inverse]
        per_seq = centred
        if self.scale_by_std:
            _require_group_size(counts, "grpo", "the group std is undefined for one sample")
            sq_sums, _, _ = _group_sums(centred**2, group_ids)
            std = (sq_sums / (counts - 1)).sqrt()
            per_seq = centred / (std[inverse] + self.eps)
        advantages = _broadcast(per_seq, mask)
        metrics = _outcome_metrics(rewards, advantages, mask)
        # Groups with a zero spread carry no signal: the number DAPO's dynamic sampling removes.
        spread, _, _ = _group_sums(centred.abs(), group_ids)
        metrics["num_zero_spread_groups"] = (spread == 0).sum().to(rewards.dtype)
        return AdvantageResult(advantages, advantages, metrics)


@register_advantage_estimator("dr_grpo")
class DrGRPO(GRPO):
    """Dr.GRPO ("GRPO done right"): ``A_i = r_i - mean_g``, no std scaling.

    Its other half is the loss: no per-sequence length normalisation, i.e. token sums divided
    by a constant (``seq-mean-token-sum-norm``), which is this estimator's default aggregation.
    """

    scale_by_std = False
    default_loss_agg_mode = "seq-mean-token-sum-norm"


@register_advantage_estimator("rloo")
class RLOO(AdvantageEstimator):
    """RLOO: ``A_i = r_i - mean_{j != i in group} r_j`` (leave-one-out baseline), every token."""

    needs_group_ids = True

    def _compute(self, rewards, mask, group_ids, values, token_rewards) -> AdvantageResult:
        sums, counts, inverse = _group_sums(rewards, group_ids)
        _require_group_size(counts, "rloo", "the leave-one-out baseline needs another sample")
        baseline = (sums[inverse] - rewards) / (counts[inverse] - 1)
        advantages = _broadcast(rewards - baseline, mask)
        return AdvantageResult(advantages, advantages, _outcome_metrics(rewards, advantages, mask))


@register_advantage_estimator("reinforce_pp")
class ReinforcePP(AdvantageEstimator):
    """REINFORCE++: discounted returns-to-go, whitened over all response tokens of the batch.

    The outcome reward sits on the last response token, ``token_rewards`` (the KL penalty
    ``-kl_reward_coef * kl``) on every token; ``G_t = sum_{k>=t} gamma^(k-t) r_k``; the
    advantage is ``(G - mean) / (std + eps)`` with mean/std over every masked token of the
    batch (global whitening replaces the critic/group baseline).
    """

    supports_token_rewards = True

    def __init__(self, gamma: float = 1.0, eps: float = 1e-8) -> None:
        self.gamma = gamma
        self.eps = eps

    @classmethod
    def from_config(cls, cfg: AlgoConfig) -> AdvantageEstimator:
        return cls(gamma=cfg.gamma, eps=cfg.adv_eps)

    def _sequence_rewards(self, rewards: Tensor, group_ids: Tensor | None) -> Tensor:
        return rewards

    def _compute(self, rewards, mask, group_ids, values, token_rewards) -> AdvantageResult:
        per_token = place_on_last_token(self._sequence_rewards(rewards, group_ids), mask)
        if token_rewards is not None:
            per_token = per_token + zero_outside(token_rewards, mask)
        returns = discounted_cumsum(per_token, mask, self.gamma)
        advantages = masked_whiten(returns, mask, self.eps)
        metrics = _outcome_metrics(rewards, advantages, mask)
        metrics["return_mean"] = masked_mean(returns, mask).detach()
        return AdvantageResult(advantages, returns, metrics)


@register_advantage_estimator("reinforce_pp_baseline")
class ReinforcePPBaseline(ReinforcePP):
    """REINFORCE++-baseline: subtract the group mean reward first, then REINFORCE++."""

    needs_group_ids = True

    def _sequence_rewards(self, rewards: Tensor, group_ids: Tensor | None) -> Tensor:
        sums, counts, inverse = _group_sums(rewards, group_ids)
        return rewards - (sums / counts)[inverse]


@register_advantage_estimator("ppo", "gae")
class GAE(AdvantageEstimator):
    """Generalised advantage estimation with a critic (PPO).

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, with
    ``V`` after the last response token = 0 (the episode ends). Masked-out tokens inside a
    response are skipped (they carry the next value and advantage through unchanged), as in
    verl. ``returns = A + V`` (before whitening) are the critic's targets; with ``whiten`` the
    advantages are then whitened over all masked tokens of the batch.
    """

    needs_values = True
    supports_token_rewards = True

    def __init__(self, gamma: float = 1.0, lam: float = 1.0, whiten: bool = True,
                 eps: float = 1e-8) -> None:
        self.gamma = gamma
        self.lam = lam
        self.whiten = whiten
        self.eps = eps

    @classmethod
    def from_config(cls, cfg: AlgoConfig) -> AdvantageEstimator:
        return cls(gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages, eps=cfg.adv_eps)

    def _compute(self, rewards, mask, group_ids, values, token_rewards) -> AdvantageResult:
        per_token = place_on_last_token(rewards, mask)
        if token_rewards is not None:
            per_token = per_token + zero_outside(token_rewards, mask)
        values = zero_outside(values.detach().to(per_token.dtype), mask)
        advantages = torch.zeros_like(per_token)
        next_value = torch.zeros_like(per_token[:, 0])
        next_advantage = torch.zeros_like(per_token[:, 0])
        for t in reversed(range(mask.shape[1])):
            delta = per_token[:, t] + self.gamma * next_value - values[:, t]
            advantage = delta + self.gamma * self.lam * next_advantage
            on = mask[:, t]
            next_advantage = torch.where(on, advantage, next_advantage)
            next_value = torch.where(on, values[:, t], next_value)
            advantages[:, t] = torch.where(on, advantage, torch.zeros_like(advantage))
        returns = zero_outside(advantages + values, mask)
        if self.whiten:
            advantages = masked_whiten(advantages, mask, self.eps)
        metrics = _outcome_metrics(rewards, advantages, mask)
        metrics["return_mean"] = masked_mean(returns, mask).detach()
        metrics["value_mean"] = masked_mean(values, mask).detach()
        return AdvantageResult(advantages, returns, metrics)
