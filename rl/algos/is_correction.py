"""Importance-sampling corrections between the rollout policy and the trainer's pi_old.

lockstep's kernel set makes rollout logprobs bit-identical to the trainer's, so by default the
rollout logprobs *are* pi_old and none of this is needed. These corrections exist for setups
where that fails (stock kernels, async off-policy rollouts, a detected drift with
``alignment.on_drift: correct``): the tokens were sampled from mu (rollout) but PPO's ratio is
taken against pi_old (a trainer recompute), so each token carries the off-policy ratio

    rho_t = pi_old(y_t) / mu(y_t) = exp(old_logprobs_t - rollout_logprobs_t).

Each correction maps ``(old_logprobs, rollout_logprobs, response_mask)``, all ``[B, T]``, to
an ``ISCorrectionResult``: per-token ``weights [B, T]`` that multiply the token loss (no
gradient) and a ``mask [B, T]`` of tokens kept, plus metrics.

    tis      token-level truncated IS: weight = min(rho_t, high)                 (Yao et al.)
    mis_seq  sequence-level masked IS: drop sequences whose prod_t rho_t is outside [low, high]
    mis_geo  geometric-mean MIS: drop sequences whose exp(mean_t log rho_t) is outside [low, high]
    icepop   two-sided token mask: drop tokens whose rho_t is outside [low, high] (Ling team)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from rl.algos.masked import (
    check_finite,
    check_response_mask,
    check_same_shape,
    masked_mean,
    masked_sum,
    zero_outside,
)


@dataclass(frozen=True)
class ISCorrectionResult:
    weights: Tensor  # [B, T] multiplies the per-token loss, 0 off the mask
    mask: Tensor  # [B, T] bool, tokens that stay in the loss
    metrics: dict[str, Tensor] = field(default_factory=dict)


IS_CORRECTIONS: dict[str, type[ISCorrection]] = {}


def register_is_correction(name: str):
    def decorate(cls: type[ISCorrection]) -> type[ISCorrection]:
        cls.name = name
        IS_CORRECTIONS[name] = cls
        return cls

    return decorate


def get_is_correction(name: str, low: float | None = None,
                      high: float | None = None) -> ISCorrection:
    """Instantiate the correction ``name``; ``None`` thresholds take the correction's default."""
    try:
        cls = IS_CORRECTIONS[name]
    except KeyError:
        allowed = ", ".join(IS_CORRECTIONS)
        raise ValueError(f"unknown is_correction {name!r}; allowed: none, {allowed}") from None
    return cls(low=low, high=high)


class ISCorrection:
    """Base: validates inputs, computes ``log rho``, delegates to ``_correct``."""

    name: ClassVar[str]
    default_low: ClassVar[float | None]
    default_high: ClassVar[float]

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        self.low = self.default_low if low is None else low
        self.high = self.default_high if high is None else high
        if self.default_low is None and low is not None:
            raise ValueError(f"is_correction {self.name}: takes only an upper threshold (high)")
        if self.low is not None and not 0 <= self.low < self.high:
            raise ValueError(
                f"is_correction {self.name}: need 0 <= low < high, got low={self.low}, "
                f"high={self.high}"
            )
        if self.high <= 0:
            raise ValueError(f"is_correction {self.name}: high must be > 0, got {self.high}")

    def __call__(self, old_logprobs: Tensor, rollout_logprobs: Tensor,
                 response_mask: Tensor) -> ISCorrectionResult:
        mask = check_response_mask(response_mask)
        check_same_shape("old_logprobs", old_logprobs, rollout_logprobs=rollout_logprobs,
                         response_mask=mask)
        check_finite("old_logprobs", old_logprobs, mask)
        check_finite("rollout_logprobs", rollout_logprobs, mask)
        with torch.no_grad():
            log_rho = zero_outside(old_logprobs.detach() - rollout_logprobs.detach(), mask)
            return self._correct(log_rho, mask)

    def _correct(self, log_rho: Tensor, mask: Tensor) -> ISCorrectionResult:
        raise NotImplementedError


def _fraction(flags: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(flags.to(torch.float32), mask)


@register_is_correction("tis")
class TokenTIS(ISCorrection):
    """Truncated IS per token: ``w_t = min(rho_t, high)``; masks nothing."""

    default_low = None
    default_high = 2.0

    def _correct(self, log_rho: Tensor, mask: Tensor) -> ISCorrectionResult:
        # Decide truncation in log space (exp of a huge log_rho overflows) and write the cap
        # itself, so a truncated token's weight is exactly `high`.
        truncated = mask & (log_rho > math.log(self.high))
        rho = torch.where(truncated, torch.full_like(log_rho, self.high), torch.exp(log_rho))
        weights = zero_outside(rho, mask)
        metrics = {
            "is_truncated_frac": _fraction(truncated, mask),
            "is_weight_mean": masked_mean(weights, mask),
        }
        return ISCorrectionResult(weights, mask, metrics)


class _SequenceMIS(ISCorrection):
    """Shared body of the sequence-level masks: keep a row iff its statistic is in bounds."""

    def _log_statistic(self, log_rho: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def _correct(self, log_rho: Tensor, mask: Tensor) -> ISCorrectionResult:
        log_stat = self._log_statistic(log_rho, mask)  # [B]
        low = torch.tensor(self.low, dtype=log_rho.dtype)
        high = torch.tensor(self.high, dtype=log_rho.dtype)
        # Bounds compared in log space: a sequence ratio over hundreds of tokens overflows exp.
        # low == 0 means "no lower bound" (log 0 = -inf keeps everything).
        keep_row = (log_stat >= torch.log(low)) & (log_stat <= torch.log(high))
        nonempty = mask.any(dim=1)
        keep = mask & keep_row[:, None]
        metrics = {
            "is_seq_masked_frac": masked_mean((~keep_row).to(torch.float32), nonempty),
            "is_token_masked_frac": _fraction(mask & ~keep, mask),
            "is_log_stat_min": log_stat[nonempty].min(),
            "is_log_stat_max": log_stat[nonempty].max(),
        }
        return ISCorrectionResult(keep.to(log_rho.dtype), keep, metrics)


@register_is_correction("mis_seq")
class SequenceMIS(_SequenceMIS):
    """Mask whole sequences whose ratio ``prod_t rho_t`` lies outside ``[low, high]``."""

    default_low = 0.5
    default_high = 2.0

    def _log_statistic(self, log_rho: Tensor, mask: Tensor) -> Tensor:
        return masked_sum(log_rho, mask, dim=1)


@register_is_correction("mis_geo")
class GeometricMIS(_SequenceMIS):
    """Mask sequences whose per-token geometric mean ratio lies outside ``[low, high]``.

    The geometric mean does not grow with length, so one threshold fits short and long
    responses; it is tight by default because a per-token mean drift of 0.1% is already large.
    """

    default_low = 0.999
    default_high = 1.001

    def _log_statistic(self, log_rho: Tensor, mask: Tensor) -> Tensor:
        return masked_sum(log_rho, mask, dim=1) / mask.sum(dim=1).clamp_min(1)


@register_is_correction("icepop")
class IcePop(ISCorrection):
    """Two-sided token mask: drop tokens whose ``rho_t`` lies outside ``[low, high]``."""

    default_low = 0.5
    default_high = 5.0

    def _correct(self, log_rho: Tensor, mask: Tensor) -> ISCorrectionResult:
        rho = torch.exp(log_rho)
        keep = mask & (rho >= self.low) & (rho <= self.high)
        metrics = {
            "is_token_masked_frac": _fraction(mask & ~keep, mask),
            "is_token_masked_low_frac": _fraction(mask & (rho < self.low), mask),
            "is_token_masked_high_frac": _fraction(mask & (rho > self.high), mask),
        }
        return ISCorrectionResult(keep.to(log_rho.dtype), keep, metrics)
