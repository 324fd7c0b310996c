"""RL algorithms as pure torch functions on padded batches: no model, no Ray.

Modules (each documents its shapes):
    advantages     GRPO, Dr.GRPO, RLOO, REINFORCE++ (+baseline), GAE; registry by name
    aggregation    loss aggregation modes (token-mean, seq-mean-token-{sum,mean,sum-norm})
    losses         PPO clipped policy loss (clip-higher, dual clip), value loss, entropy
    kl             k1/k2/k3 KL estimators, KL loss term and KL reward penalty
    filters        DAPO dynamic sampling, overlong penalty, truncation mask
    is_correction  rollout-vs-pi_old corrections: TIS, sequence/geometric MIS, IcePop
    config         AlgoConfig, the run config's ``algo:`` section
    policy_loss    compute_policy_loss, the per-micro-batch actor loss the trainer calls

Step order in the driver: rewards (+ apply_overlong) -> dynamic_sampling_filter ->
kl_penalty_rewards (if kl_reward_coef) -> cfg.build_advantage_estimator()(...) -> trainer:
compute_policy_loss per micro-batch (and value_loss for the critic).
"""

from rl.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    AdvantageResult,
    get_advantage_estimator,
    register_advantage_estimator,
)
from rl.algos.aggregation import LOSS_AGGREGATIONS, aggregate_loss
from rl.algos.config import AlgoConfig
from rl.algos.filters import (
    DynamicSamplingResult,
    TruncationMaskResult,
    apply_overlong,
    dynamic_sampling_filter,
    overlong_penalty,
    truncation_mask,
)
from rl.algos.is_correction import IS_CORRECTIONS, ISCorrectionResult, get_is_correction
from rl.algos.kl import KL_ESTIMATORS, get_kl_estimator, kl_loss, kl_penalty_rewards, token_kl
from rl.algos.losses import (
    entropy_from_logits,
    entropy_loss,
    ppo_policy_loss,
    ppo_token_loss,
    value_loss,
)
from rl.algos.policy_loss import compute_policy_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "IS_CORRECTIONS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "AdvantageEstimator",
    "AdvantageResult",
    "AlgoConfig",
    "DynamicSamplingResult",
    "ISCorrectionResult",
    "TruncationMaskResult",
    "aggregate_loss",
    "apply_overlong",
    "compute_policy_loss",
    "dynamic_sampling_filter",
    "entropy_from_logits",
    "entropy_loss",
    "get_advantage_estimator",
    "get_is_correction",
    "get_kl_estimator",
    "kl_loss",
    "kl_penalty_rewards",
    "overlong_penalty",
    "ppo_policy_loss",
    "ppo_token_loss",
    "register_advantage_estimator",
    "token_kl",
    "truncation_mask",
    "value_loss",
]
