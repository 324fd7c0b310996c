"""Batch filters and reward shaping from DAPO: dynamic sampling and overlong handling.

Role: the driver applies these between reward computation and advantage estimation.

``dynamic_sampling_filter``  drops prompt groups whose rewards are all equal: with GRPO-style
                             group baselines their advantages are all 0, so they contribute no
                             gradient but still dilute the token-mean loss.
``overlong_penalty``         DAPO's soft overlong punishment, added to the outcome reward:
                             0 up to ``max_len - buffer`` tokens, then a linear ramp down to
                             ``-penalty_factor`` at ``max_len``.
``apply_overlong``           both of the above as ``AlgoConfig.overlong`` says.
``truncation_mask``          sequence keep-mask that drops truncated samples from the loss
                             (DAPO's overlong filtering): a truncated answer is not wrong, its
                             reward is noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rl.algos.masked import check_finite

if TYPE_CHECKING:
    from rl.algos.config import AlgoConfig


@dataclass(frozen=True)
class DynamicSamplingResult:
    kept_indices: Tensor  # [K] long, rows of the batch to keep, in their original order
    num_kept_groups: int
    num_dropped_groups: int


def dynamic_sampling_filter(rewards: Tensor, group_ids: Tensor) -> DynamicSamplingResult:
    """Keep the rows of groups whose rewards are not all equal (exact comparison).

    ``rewards [B]`` float, ``group_ids [B]`` int. A group of one sample has no spread and is
    dropped. The driver keeps sampling until enough groups survive.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B], got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    check_finite("rewards", rewards)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    group_max = torch.full((num_groups,), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    group_min = torch.full((num_groups,), torch.inf, dtype=rewards.dtype, device=rewards.device)
    group_max = group_max.scatter_reduce(0, inverse, rewards, reduce="amax")
    group_min = group_min.scatter_reduce(0, inverse, rewards, reduce="amin")
    informative = group_max > group_min  # [G]
    kept_indices = informative[inverse].nonzero().squeeze(1)
    num_kept = int(informative.sum())
    return DynamicSamplingResult(kept_indices, num_kept, num_groups - num_kept)


def overlong_penalty(response_lengths: Tensor, max_response_len: int, buffer_len: int,
                     penalty_factor: float = 1.0) -> Tensor:
    """Soft overlong punishment ``[B]`` (<= 0) to add to the outcome rewards.

    With ``L = max_response_len``, ``C = buffer_len`` and length ``n``:
    ``0`` if ``n <= L - C``; ``-penalty_factor * (n - (L - C)) / C`` if ``L - C < n <= L``;
    ``-penalty_factor`` beyond ``L``.
    """
    if not 0 < buffer_len <= max_response_len:
        raise ValueError(
            f"overlong buffer_len must be in (0, max_response_len={max_response_len}], "
            f"got {buffer_len}"
        )
    if penalty_factor < 0:
        raise ValueError(f"overlong penalty_factor must be >= 0, got {penalty_factor}")
    if response_lengths.dim() != 1:
        raise ValueError(f"response_lengths must be [B], got {tuple(response_lengths.shape)}")
    lengths = response_lengths.to(torch.float32)
    exceed = (lengths - (max_response_len - buffer_len)).clamp(0, buffer_len)
    return -penalty_factor * exceed / buffer_len


@dataclass(frozen=True)
class TruncationMaskResult:
    keep: Tensor  # [B] bool, False for truncated samples
    num_masked: int


def truncation_mask(response_lengths: Tensor, max_response_len: int,
                    finished: Tensor | None = None) -> TruncationMaskResult:
    """Sequence keep-mask dropping truncated samples from the loss.

    A sample is truncated if ``finished [B]`` (stop/EOS reached) is False when given, else if
    its length reached ``max_response_len``. Multiply ``keep[:, None]`` into the loss mask
    (not into the advantage computation: the group statistics still see these samples).
    """
    if finished is not None:
        if finished.shape != response_lengths.shape:
            raise ValueError(
                f"finished {tuple(finished.shape)} must match response_lengths "
                f"{tuple(response_lengths.shape)}"
            )
        keep = finished.bool()
    else:
        keep = response_lengths < max_response_len
    return TruncationMaskResult(keep, int((~keep).sum()))


def apply_overlong(rewards: Tensor, response_lengths: Tensor, cfg: AlgoConfig,
                   finished: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Apply ``cfg.overlong`` to outcome ``rewards [B]``: returns ``(rewards, keep [B] bool)``.

    The penalty is added when ``overlong.buffer_len > 0``; ``keep`` drops truncated samples
    when ``overlong.mask_truncated`` (else all True). Multiply ``keep[:, None]`` into the loss
    mask after computing advantages.
    """
    overlong = cfg.overlong
    if overlong.buffer_len > 0:
        rewards = rewards + overlong_penalty(response_lengths, cfg.max_response_len,
                                             overlong.buffer_len, overlong.penalty_factor)
    keep = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    if overlong.mask_truncated:
        if finished is None and cfg.max_response_len is None:
            raise ValueError("algo.overlong.mask_truncated needs finished flags or "
                             "algo.max_response_len")
        limit = cfg.max_response_len if cfg.max_response_len is not None else 0
        keep = truncation_mask(response_lengths, limit, finished).keep
    return rewards, keep
