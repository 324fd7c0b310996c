"""Masked reductions and input guards shared by every module of ``rl.algos``.

All RL tensors are padded: per-token tensors are ``[B, T]`` and a ``response_mask [B, T]``
(1.0 on response tokens, 0.0 on prompt/padding/observation tokens) says which entries are
real. Padding may hold anything (including NaN from an uninitialised buffer), so reductions
here select with ``torch.where`` instead of multiplying by the mask: ``NaN * 0`` is NaN.

The guards turn the silent failure modes of RL maths (a NaN reward, an empty batch, a mask
that is not 0/1) into a ``ValueError`` that names the offending tensor, because a NaN loss
discovered three steps later is much harder to trace than an exception at its source.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_response_mask(response_mask: Tensor, name: str = "response_mask") -> Tensor:
    """Validate a ``[B, T]`` 0/1 mask and return it as a bool tensor.

    Raises ``ValueError`` if it is not 2-D, holds values other than 0/1, or selects no token.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(response_mask.shape)}")
    if response_mask.dtype != torch.bool:
        if not torch.all((response_mask == 0) | (response_mask == 1)):
            raise ValueError(f"{name} must hold only 0/1 values")
        response_mask = response_mask != 0
    if not bool(response_mask.any()):
        raise ValueError(f"{name} selects no token: the batch has zero response tokens")
    return response_mask


def check_same_shape(reference_name: str, reference: Tensor, **tensors: Tensor | None) -> None:
    """Raise ``ValueError`` naming the first of ``tensors`` not shaped like ``reference``."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)} "
                f"(the shape of {reference_name})"
            )


def check_finite(name: str, x: Tensor, mask: Tensor | None = None) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN/inf where ``mask`` is true (everywhere if None).

    Only masked-in entries are checked: padding is allowed to hold garbage.
    """
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        raise ValueError(
            f"{name} holds {int(bad.sum())} non-finite value(s) (NaN/inf), first at index {where}"
        )


def zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` is true, exactly 0 elsewhere (safe against NaN padding)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over entries where ``mask`` (bool, same shape) is true."""
    x = zero_outside(x, mask)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over all entries where ``mask`` is true; ``ValueError`` if there are none."""
    count = mask.sum()
    if int(count) == 0:
        raise ValueError("masked_mean over an empty mask")
    return masked_sum(x, mask) / count


def masked_whiten(x: Tensor, mask: Tensor, eps: float) -> Tensor:
    """``(x - mean) / (std + eps)`` over masked entries, 0 outside the mask.

    The variance is the population variance (divide by N, as OpenRLHF's REINFORCE++ does), so a
    single token whitens to 0 instead of dividing by N-1 = 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return zero_outside((x - mean) / (var.sqrt() + eps), mask)


def last_token_index(mask: Tensor) -> Tensor:
    """``[B]`` index of the last true entry of each row of a ``[B, T]`` bool mask (-1 if none)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)


def place_on_last_token(values: Tensor, mask: Tensor) -> Tensor:
    """Scatter per-sequence ``values [B]`` onto each row's last response token of ``[B, T]``.

    Rows without response tokens get nothing (their value has no token to live on).
    """
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    last = last_token_index(mask)
    rows = (last >= 0).nonzero().squeeze(1)
    out[rows, last[rows]] = values[rows]
    return out


def discounted_cumsum(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Returns-to-go ``G_t = r_t + gamma * G_{t'}`` where ``t'`` is the next masked-in token.

    Masked-out tokens inside a response (tool/observation tokens in multi-turn rollouts) are
    skipped: they neither receive a return nor break the discount chain. ``[B, T] -> [B, T]``.
    """
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype,
                          device=token_rewards.device)
    rewards = zero_outside(token_rewards, mask)
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return zero_outside(returns, mask)
