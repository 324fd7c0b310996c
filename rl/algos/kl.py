"""KL estimators between the policy and the frozen reference policy (Schulman's k1, k2, k3).

With ``log_r = ref_logprobs - logprobs`` for tokens sampled from the policy:

    k1 = -log_r                     unbiased estimate of KL(pi || ref), high variance, can be < 0
    k2 = 0.5 * log_r ** 2           biased, low variance, >= 0; its gradient is the KL's gradient
    k3 = exp(log_r) - 1 - log_r     unbiased, low variance, >= 0 ("low_var_kl")

Used two ways (``AlgoConfig.kl``): as a loss term (``kl_loss_coef * aggregate(kl)``, GRPO
style) via ``kl_loss``, or folded into the rewards (``token_rewards = -kl_reward_coef * kl``,
PPO/REINFORCE++ style) via ``kl_penalty_rewards``. All tensors are ``[B, T]``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rl.algos.aggregation import aggregate_loss
from rl.algos.masked import check_finite, check_response_mask, check_same_shape, zero_outside

KLEstimator = Callable[[Tensor, Tensor], Tensor]

KL_ESTIMATORS: dict[str, KLEstimator] = {}

# exp(20) ~ 4.9e8: finite in fp32 and far beyond any ratio a healthy run produces, so clamping
# here changes nothing real but keeps one pathological token from turning the loss into inf.
_MAX_LOG_RATIO = 20.0


def _register(name: str):
    def decorate(fn: KLEstimator) -> KLEstimator:
        KL_ESTIMATORS[name] = fn
        return fn

    return decorate


@_register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


@_register("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


@_register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_r = (ref_logprobs - logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_r) - 1 - log_r


def get_kl_estimator(name: str) -> KLEstimator:
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        allowed = ", ".join(KL_ESTIMATORS)
        raise ValueError(f"unknown KL estimator {name!r}; allowed: {allowed}") from None


def token_kl(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor,
             kind: str) -> Tensor:
    """Per-token KL estimate ``[B, T]`` of type ``kind``, exactly 0 off the mask."""
    mask = check_response_mask(response_mask)
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, response_mask=mask)
    check_finite("logprobs", logprobs, mask)
    check_finite("ref_logprobs", ref_logprobs, mask)
    estimator = get_kl_estimator(kind)
    return zero_outside(estimator(logprobs, ref_logprobs), mask)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, kind: str,
            loss_agg_mode: str, *, norm_len: float | None = None,
            global_denominator: float | None = None) -> Tensor:
    """Aggregated KL loss term (multiply by ``kl_loss_coef`` yourself); differentiable."""
    kl = token_kl(logprobs, ref_logprobs, response_mask, kind)
    return aggregate_loss(kl, response_mask.bool(), loss_agg_mode, norm_len=norm_len,
                          global_denominator=global_denominator)


def kl_penalty_rewards(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor,
                       kind: str, coef: float) -> Tensor:
    """``token_rewards [B, T] = -coef * kl`` for reinforce_pp/ppo estimators (no gradient)."""
    with torch.no_grad():
        return -coef * token_kl(logprobs.detach(), ref_logprobs.detach(), response_mask, kind)
