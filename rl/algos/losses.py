"""PPO clipped policy loss (clip-higher, dual clip), clipped value loss, entropy.

Role: the per-token maths of the actor and critic updates; ``rl.algos.policy_loss`` composes
them with KL, entropy and IS corrections for the trainer. All per-token tensors are ``[B, T]``
(fp32 or fp64), masks are ``[B, T]``; metrics are detached 0-dim tensors.

Policy loss per token, ``r = exp(logp - old_logp)``, ``A`` the advantage:

    L = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))      PPO with DAPO clip-higher
    L = min(L, -A * clip_c)            if A < 0 and clip_c is set   dual clip (Ye et al. 2020)

The dual clip bounds the loss of a negative-advantage token whose ratio has exploded (a token
the old policy found unlikely, now likely): without it ``-A * r`` grows without bound.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl.algos.aggregation import aggregate_loss
from rl.algos.masked import (
    check_finite,
    check_response_mask,
    check_same_shape,
    masked_mean,
    zero_outside,
)

# exp(20) ~ 4.9e8: no real ratio gets there; the clamp only stops inf * 0 = NaN downstream.
_MAX_LOG_RATIO = 20.0


def ppo_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    clip_c: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unmasked per-token PPO loss.

    Returns ``(loss, ratio, clipped, dual_clipped)``, all ``[B, T]``: ``clipped`` is true where
    the clipped term is the active one (the gradient through the ratio is zero there),
    ``dual_clipped`` where the dual-clip bound is active.
    """
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    dual_clipped = torch.zeros_like(clipped)
    if clip_c is not None:
        bound = -advantages * clip_c
        dual_clipped = (advantages < 0) & (loss > bound)
        loss = torch.where(dual_clipped, bound, loss)
    return loss, ratio, clipped, dual_clipped


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    norm_len: float | None = None,
    token_weights: Tensor | None = None,
    global_denominator: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Aggregated PPO clipped policy loss and its metrics.

    ``token_weights [B, T]`` (e.g. TIS importance weights) multiply each token's loss and get
    no gradient. Metrics: ``pg_loss``, ``pg_clipfrac`` (fraction of tokens where the clip is
    active), ``pg_clipfrac_dual``, ``ppo_kl`` (k1 mean of old - new logprob), ``ratio_min``,
    ``ratio_max``, ``ratio_mean``.
    """
    mask = check_response_mask(response_mask)
    check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages,
                     response_mask=mask, token_weights=token_weights)
    for name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs),
                         ("advantages", advantages)):
        check_finite(name, tensor, mask)
    if clip_c is not None and clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1 (dual clip bound), got {clip_c}")
    # Zero the padding first so that garbage there cannot leak NaN into the graph.
    loss, ratio, clipped, dual = ppo_token_loss(
        zero_outside(logprobs, mask), zero_outside(old_logprobs, mask),
        zero_outside(advantages, mask), clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)
    if token_weights is not None:
        check_finite("token_weights", token_weights, mask)
        loss = loss * zero_outside(token_weights.detach(), mask)
    pg_loss = aggregate_loss(loss, mask, loss_agg_mode, norm_len=norm_len,
                             global_denominator=global_denominator)
    with torch.no_grad():
        ratio_on = ratio[mask]
        metrics = {
            "pg_loss": pg_loss.detach(),
            "pg_clipfrac": masked_mean(clipped.to(ratio.dtype), mask),
            "pg_clipfrac_dual": masked_mean(dual.to(ratio.dtype), mask),
            "ppo_kl": masked_mean(old_logprobs - logprobs, mask),
            "ratio_min": ratio_on.min(),
            "ratio_max": ratio_on.max(),
            "ratio_mean": ratio_on.mean(),
        }
    return pg_loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_range: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
    norm_len: float | None = None,
    global_denominator: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped critic loss ``0.5 * max((V - R)^2, (V_clip - R)^2)``.

    ``V_clip = old_V + clip(V - old_V, -clip_range, clip_range)`` keeps the critic from moving
    far from the values used to compute the advantages; ``clip_range=None`` gives plain MSE.
    Metrics: ``vf_loss``, ``vf_clipfrac``, ``vpred_mean``.
    """
    mask = check_response_mask(response_mask)
    check_same_shape("values", values, old_values=old_values, returns=returns,
                     response_mask=mask)
    for name, tensor in (("values", values), ("old_values", old_values), ("returns", returns)):
        check_finite(name, tensor, mask)
    values = zero_outside(values, mask)
    old_values = zero_outside(old_values.detach(), mask)
    returns = zero_outside(returns.detach(), mask)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token, clipped = unclipped, torch.zeros_like(mask)
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped_sq = (values_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped_sq)
        clipped = clipped_sq > unclipped
    loss = 0.5 * aggregate_loss(per_token, mask, loss_agg_mode, norm_len=norm_len,
                                global_denominator=global_denominator)
    with torch.no_grad():
        metrics = {
            "vf_loss": loss.detach(),
            "vf_clipfrac": masked_mean(clipped.to(values.dtype), mask),
            "vpred_mean": masked_mean(values, mask),
        }
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy ``[B, T]`` of ``softmax(logits [B, T, V])``, computed in fp32+.

    ``H = logsumexp(z) - sum(softmax(z) * z)``: one log-softmax pass, no log(0).
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_loss(entropy: Tensor, response_mask: Tensor, *, loss_agg_mode: str = "token-mean",
                 norm_len: float | None = None,
                 global_denominator: float | None = None) -> Tensor:
    """Aggregated entropy; the bonus enters the loss as ``- entropy_coef * entropy_loss``."""
    mask = check_response_mask(response_mask)
    check_same_shape("entropy", entropy, response_mask=mask)
    check_finite("entropy", entropy, mask)
    return aggregate_loss(zero_outside(entropy, mask), mask, loss_agg_mode, norm_len=norm_len,
                          global_denominator=global_denominator)
