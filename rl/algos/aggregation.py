"""Loss aggregation: how a per-token loss ``[B, T]`` becomes one scalar.

The choice changes the gradient's weighting, not just its scale:

``token-mean``               sum over all response tokens / number of tokens (DAPO, token-level:
                             long responses weigh more in total).
``seq-mean-token-sum``       mean over sequences of each sequence's token sum.
``seq-mean-token-mean``      mean over sequences of each sequence's token mean (original GRPO:
                             every sequence weighs the same, whatever its length).
``seq-mean-token-sum-norm``  mean over sequences of (token sum / a constant length L), Dr.GRPO:
                             a constant normaliser removes GRPO's length bias.

Sequences with no masked-in token (e.g. truncated samples masked out by the overlong filter) do
not count in the "seq-mean" denominators.

Gradient accumulation: by default each call normalises by its own micro-batch. Pass
``global_denominator`` (the mini-batch's token count for token-mean, its non-empty sequence
count for the seq-mean modes) to get the micro-batch's share of the mini-batch loss instead, so
that summing micro-batch losses gives exactly the mini-batch loss.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from rl.algos.masked import masked_sum

Aggregator = Callable[[Tensor, Tensor, "float | None", "float | None"], Tensor]

LOSS_AGGREGATIONS: dict[str, Aggregator] = {}


def _register(name: str):
    def decorate(fn: Aggregator) -> Aggregator:
        LOSS_AGGREGATIONS[name] = fn
        return fn

    return decorate


def _check_denominator(denominator: Tensor | float, what: str) -> None:
    if float(denominator) <= 0:
        raise ValueError(f"loss aggregation: {what} is 0 (all tokens masked)")


@_register("token-mean")
def token_mean(loss: Tensor, mask: Tensor, norm_len: float | None,
               global_denominator: float | None) -> Tensor:
    denominator = mask.sum() if global_denominator is None else global_denominator
    _check_denominator(denominator, "number of response tokens")
    return masked_sum(loss, mask) / denominator


def _seq_mean(seq_losses: Tensor, mask: Tensor, global_denominator: float | None) -> Tensor:
    nonempty = mask.any(dim=1)
    denominator = nonempty.sum() if global_denominator is None else global_denominator
    _check_denominator(denominator, "number of sequences with response tokens")
    return masked_sum(seq_losses, nonempty) / denominator


@_register("seq-mean-token-sum")
def seq_mean_token_sum(loss: Tensor, mask: Tensor, norm_len: float | None,
                       global_denominator: float | None) -> Tensor:
    return _seq_mean(masked_sum(loss, mask, dim=1), mask, global_denominator)


@_register("seq-mean-token-mean")
def seq_mean_token_mean(loss: Tensor, mask: Tensor, norm_len: float | None,
                        global_denominator: float | None) -> Tensor:
    # clamp_min only protects empty rows, which _seq_mean drops anyway.
    seq_losses = masked_sum(loss, mask, dim=1) / mask.sum(dim=1).clamp_min(1)
    return _seq_mean(seq_losses, mask, global_denominator)


@_register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, norm_len: float | None,
                            global_denominator: float | None) -> Tensor:
    # Default to the padded length only as a fallback: it is constant only if every
    # micro-batch is padded to the same T, which is what Dr.GRPO's unbiasedness needs.
    length = mask.shape[1] if norm_len is None else norm_len
    if length <= 0:
        raise ValueError(f"seq-mean-token-sum-norm needs a positive norm_len, got {length}")
    return _seq_mean(masked_sum(loss, mask, dim=1) / length, mask, global_denominator)


def aggregate_loss(
    loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    norm_len: float | None = None,
    global_denominator: float | None = None,
) -> Tensor:
    """Reduce a per-token ``loss [B, T]`` over the bool ``mask [B, T]`` with ``mode``.

    ``norm_len`` is the constant L of ``seq-mean-token-sum-norm`` (default: T). Raises
    ``ValueError`` for an unknown mode or when the mask selects nothing.
    """
    try:
        aggregator = LOSS_AGGREGATIONS[mode]
    except KeyError:
        allowed = ", ".join(LOSS_AGGREGATIONS)
        raise ValueError(f"unknown loss_agg_mode {mode!r}; allowed: {allowed}") from None
    if loss.shape != mask.shape:
        raise ValueError(f"loss {tuple(loss.shape)} and mask {tuple(mask.shape)} differ in shape")
    return aggregator(loss, mask.bool(), norm_len, global_denominator)
