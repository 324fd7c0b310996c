"""``compute_policy_loss``: the actor loss the trainer calls once per micro-batch.

Composes, as ``AlgoConfig`` says:

    IS correction (rollout vs pi_old; optional)  -> token weights and a loss mask
    PPO clipped policy loss (clip-higher, dual clip), aggregated with cfg.loss_agg_mode
    + kl_loss_coef * KL(pi || ref)               if cfg.kl.use_kl_loss
    - entropy_coef * entropy                     if cfg.entropy_coef != 0

Guard rails: a micro-batch whose ``response_mask`` selects no token is a data bug and raises
``ValueError``. A micro-batch whose tokens were all removed by the IS correction is a legal
runtime event: it returns an exact zero loss that is still connected to ``logprobs`` (every
data-parallel rank must run backward) and ``metrics["skipped"] = 1``, which the trainer counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl.algos.config import AlgoConfig
from rl.algos.kl import kl_loss
from rl.algos.losses import entropy_loss, ppo_policy_loss
from rl.algos.masked import check_response_mask, zero_outside


def compute_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    cfg: AlgoConfig,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    rollout_logprobs: Tensor | None = None,
    *,
    global_denominator: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Actor loss for one micro-batch; all tensors ``[B, T]``, ``logprobs`` carries the grad.

    ``old_logprobs`` is pi_old: the rollout logprobs when ``cfg.old_logprobs == 'rollout'``,
    the trainer's recompute otherwise. ``rollout_logprobs`` is needed only by an IS correction,
    ``ref_logprobs`` by the KL loss (and logged as ``kl`` whenever given), ``entropy`` by a
    non-zero ``entropy_coef`` (and logged whenever given). ``global_denominator`` is passed to
    every aggregation (see ``rl.algos.aggregation``); it counts the pre-correction
    ``response_mask`` of the mini-batch, so corrected-away tokens contribute 0 to the sum.

    Returns ``(loss, metrics)``; metrics are detached 0-dim tensors (no host sync here). When
    the IS correction removed every token, metrics hold only the correction's entries and
    ``skipped`` (1.0); otherwise also ``pg_*``, ``ppo_kl``, ``ratio_*``, ``kl``/``entropy``
    when given, ``loss`` and ``skipped`` (0.0).
    """
    mask = check_response_mask(response_mask)
    if cfg.kl.use_kl_loss and ref_logprobs is None:
        raise ValueError("ref_logprobs is required: algo.kl.use_kl_loss is true")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy is required: algo.entropy_coef is {cfg.entropy_coef}")

    metrics: dict[str, Tensor] = {}
    token_weights = None
    correction = cfg.build_is_correction()
    if correction is not None:
        if rollout_logprobs is None:
            raise ValueError(
                f"rollout_logprobs is required: algo.is_correction.type is {correction.name!r}"
            )
        corrected = correction(old_logprobs, rollout_logprobs, mask)
        token_weights, mask = corrected.weights, corrected.mask
        metrics.update(corrected.metrics)

    if not bool(mask.any()):
        metrics["skipped"] = torch.ones(())
        return zero_outside(logprobs, mask).sum(), metrics

    agg = {"loss_agg_mode": cfg.loss_agg_mode, "norm_len": cfg.max_response_len,
           "global_denominator": global_denominator}
    loss, pg_metrics = ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_low=cfg.clip_low,
        clip_high=cfg.clip_high, clip_c=cfg.clip_c, token_weights=token_weights, **agg)
    metrics.update(pg_metrics)

    if ref_logprobs is not None:
        # Build the KL graph only when it is part of the loss; otherwise it is a metric.
        with torch.set_grad_enabled(cfg.kl.use_kl_loss and torch.is_grad_enabled()):
            kl_value = kl_loss(logprobs, ref_logprobs, mask, cfg.kl.type, **agg)
        metrics["kl"] = kl_value.detach()
        if cfg.kl.use_kl_loss:
            loss = loss + cfg.kl.kl_loss_coef * kl_value
    if entropy is not None:
        entropy_value = entropy_loss(entropy, mask, **agg)
        metrics["entropy"] = entropy_value.detach()
        if cfg.entropy_coef != 0:
            loss = loss - cfg.entropy_coef * entropy_value

    metrics["skipped"] = torch.zeros(())
    metrics["loss"] = loss.detach()
    return loss, metrics
