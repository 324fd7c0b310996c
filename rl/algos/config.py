"""``AlgoConfig``: the ``algo:`` section of a run config (pydantic, ``extra="forbid"``).

Role: owned by ``rl.algos`` and composed into the run config by ``rl.config``. Names of
estimators, aggregation modes, KL estimators and IS corrections are validated against the
registries of the modules that implement them, so adding a variant there makes it valid here.

Example (DAPO-style GRPO)::

    algo:
      name: grpo
      clip_low: 0.2
      clip_high: 0.28
      loss_agg_mode: token-mean
      dynamic_sampling: {enabled: true}
      max_response_len: 4096
      overlong: {buffer_len: 512, penalty_factor: 1.0}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rl.algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageEstimator
from rl.algos.aggregation import LOSS_AGGREGATIONS
from rl.algos.is_correction import IS_CORRECTIONS, ISCorrection, get_is_correction
from rl.algos.kl import KL_ESTIMATORS


def _one_of(field: str, value: str, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(allowed)}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KLConfig(_Section):
    """KL to the reference policy, as a loss term and/or a reward penalty."""

    type: str = Field("k3", description="KL estimator: k1 | k2 | k3 (see rl.algos.kl)")
    use_kl_loss: bool = Field(False, description="add kl_loss_coef * KL to the policy loss")
    kl_loss_coef: float = Field(0.001, ge=0, description="weight of the KL loss term")
    kl_reward_coef: float = Field(
        0.0, ge=0, description="fold -kl_reward_coef * KL into per-token rewards "
        "(reinforce_pp / ppo only); 0 disables")

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        return _one_of("algo.kl.type", value, list(KL_ESTIMATORS))


class DynamicSamplingConfig(_Section):
    """DAPO dynamic sampling: drop groups whose rewards are all equal, resample to refill."""

    enabled: bool = False
    max_num_gen_batches: int = Field(
        10, ge=0, description="rollout batches the driver may draw per step to fill the batch; "
        "0 = unlimited")


class OverlongConfig(_Section):
    """DAPO overlong handling (needs ``algo.max_response_len``)."""

    buffer_len: int = Field(0, ge=0, description="soft punishment ramp length in tokens before "
                            "max_response_len; 0 disables the penalty")
    penalty_factor: float = Field(1.0, ge=0, description="penalty at max_response_len")
    mask_truncated: bool = Field(False, description="drop truncated samples from the loss")


class ISCorrectionConfig(_Section):
    """Rollout-vs-pi_old importance-sampling correction (see rl.algos.is_correction)."""

    type: str = Field("none", description="none | tis | mis_seq | mis_geo | icepop")
    low: float | None = Field(None, description="lower ratio bound (mis_*, icepop); "
                              "None = the correction's default")
    high: float | None = Field(None, description="upper ratio bound / TIS cap; None = default")

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        return _one_of("algo.is_correction.type", value, ["none", *IS_CORRECTIONS])

    @model_validator(mode="after")
    def _check_thresholds(self) -> ISCorrectionConfig:
        if self.type == "none":
            if self.low is not None or self.high is not None:
                raise ValueError("algo.is_correction: low/high given but type is 'none'")
        else:
            try:
                self.build()
            except ValueError as error:
                raise ValueError(f"algo.is_correction: {error}") from None
        return self

    def build(self) -> ISCorrection | None:
        if self.type == "none":
            return None
        return get_is_correction(self.type, low=self.low, high=self.high)


class AlgoConfig(_Section):
    """Everything the advantage estimator and the losses read."""

    name: str = Field("grpo", description="advantage estimator: grpo | dr_grpo | rloo | "
                      "reinforce_pp | reinforce_pp_baseline | ppo (= gae, needs a critic)")
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO ratio lower clip: 1 - clip_low")
    clip_high: float = Field(0.2, gt=0, description="PPO ratio upper clip: 1 + clip_high "
                             "(DAPO clip-higher uses 0.28)")
    clip_c: float | None = Field(None, gt=1, description="dual-clip bound for negative "
                                 "advantages (typically 3); None disables")
    loss_agg_mode: str | None = Field(None, description="token-mean | seq-mean-token-sum | "
                                      "seq-mean-token-mean | seq-mean-token-sum-norm; None = "
                                      "the estimator's default (dr_grpo: seq-mean-token-sum-norm)")
    max_response_len: int | None = Field(
        None, gt=0, description="max generated tokens: the overlong reference and the constant "
        "normaliser of seq-mean-token-sum-norm (else the padded T is used, which is constant "
        "only if every micro-batch is padded alike)")
    entropy_coef: float = Field(0.0, description="entropy bonus: loss -= coef * entropy")
    kl: KLConfig = Field(default_factory=KLConfig)
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = Field(default_factory=OverlongConfig)
    is_correction: ISCorrectionConfig = Field(default_factory=ISCorrectionConfig)
    old_logprobs: str = Field("rollout", description="source of pi_old: 'rollout' (the rollout "
                              "logprobs, valid when trainer and rollout are bit-identical) or "
                              "'recompute' (a trainer forward before the update)")
    gamma: float = Field(1.0, ge=0, le=1, description="discount (reinforce_pp, ppo)")
    lam: float = Field(1.0, ge=0, le=1, description="GAE lambda (ppo)")
    adv_eps: float = Field(1e-6, gt=0, description="epsilon under std normalisation")
    whiten_advantages: bool = Field(True, description="whiten GAE advantages over the batch")
    value_clip: float | None = Field(0.2, gt=0, description="critic value clip range; None = "
                                     "plain MSE")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    num_minibatches: int = Field(1, ge=1, description="optimizer steps per epoch")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _one_of("algo.name", value, list(ADVANTAGE_ESTIMATORS))

    @field_validator("loss_agg_mode")
    @classmethod
    def _check_agg(cls, value: str | None) -> str | None:
        return None if value is None else _one_of("algo.loss_agg_mode", value,
                                                  list(LOSS_AGGREGATIONS))

    @field_validator("old_logprobs")
    @classmethod
    def _check_old(cls, value: str) -> str:
        return _one_of("algo.old_logprobs", value, ["rollout", "recompute"])

    @model_validator(mode="after")
    def _check_combination(self) -> AlgoConfig:
        estimator = ADVANTAGE_ESTIMATORS[self.name]
        if self.loss_agg_mode is None:
            self.loss_agg_mode = estimator.default_loss_agg_mode
        if self.kl.kl_reward_coef > 0 and not estimator.supports_token_rewards:
            allowed = [n for n, c in ADVANTAGE_ESTIMATORS.items() if c.supports_token_rewards]
            raise ValueError(
                f"algo.kl.kl_reward_coef: algo.name {self.name!r} takes outcome rewards only; "
                f"a KL reward penalty needs one of {', '.join(allowed)} (or use "
                f"algo.kl.use_kl_loss)"
            )
        if self.overlong.buffer_len > 0:
            if self.max_response_len is None:
                raise ValueError("algo.max_response_len: required by algo.overlong.buffer_len")
            if self.overlong.buffer_len > self.max_response_len:
                raise ValueError(
                    f"algo.overlong.buffer_len ({self.overlong.buffer_len}) exceeds "
                    f"algo.max_response_len ({self.max_response_len})"
                )
        return self

    @property
    def recompute_old_logprobs(self) -> bool:
        """True if the trainer must run a forward for pi_old before updating."""
        return self.old_logprobs == "recompute"

    @property
    def needs_critic(self) -> bool:
        return ADVANTAGE_ESTIMATORS[self.name].needs_values

    def build_advantage_estimator(self) -> AdvantageEstimator:
        return ADVANTAGE_ESTIMATORS[self.name].from_config(self)

    def build_is_correction(self) -> ISCorrection | None:
        return self.is_correction.build()
