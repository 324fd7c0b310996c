"""The trainer's batch: a dict of padded tensors, its validation and its row splits.

Format (the RL driver builds it; B rows, T padded positions):

    input_ids      [B, T] int     prompt + response, right-padded
    lengths        [B]    int     valid tokens per row (1 <= len <= T)
    response_mask  [B, T] float   1.0 on response tokens; column t refers to token t, i.e. to
                                  logprobs[b, t] = log p(ids[b, t] | ids[b, :t])
    old_logprobs   [B, T] fp32    rollout logprobs (pi_old when parity holds)
    advantages     [B, T] fp32
    ref_logprobs   [B, T] fp32    optional, reference policy (KL)
    returns, values [B, T] fp32   critic targets and the values used for the advantages (PPO)
    temperature    float          sampling temperature (default 1.0)

Validation happens before any collective, so a bad batch raises the same `ValueError` on every
rank instead of leaving the other ranks waiting in a collective.
"""
from __future__ import annotations

import torch
from torch import Tensor

PER_TOKEN_FLOAT_KEYS = ("old_logprobs", "advantages", "ref_logprobs", "returns", "values")


def as_batch(batch: dict) -> dict:
    """Copy of `batch` with array-likes turned into CPU tensors (Ray may hand numpy arrays)."""
    out = {}
    for key, value in batch.items():
        if key == "temperature":
            out[key] = float(value)
        elif isinstance(value, Tensor):
            out[key] = value
        elif hasattr(value, "__array__") or isinstance(value, (list, tuple)):
            out[key] = torch.as_tensor(value)
        else:
            out[key] = value
    return out


def num_rows(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def temperature(batch: dict) -> float:
    value = float(batch.get("temperature", 1.0))
    if not value > 0:
        raise ValueError(f"batch temperature must be > 0, got {value}")
    return value


def check_tokens(batch: dict) -> None:
    """input_ids/lengths present, shaped and consistent."""
    for key in ("input_ids", "lengths"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}")
    ids, lengths = batch["input_ids"], batch["lengths"]
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer [B, T] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if lengths.shape != (ids.shape[0],):
        raise ValueError(f"lengths must be [B]=[{ids.shape[0]}], got {tuple(lengths.shape)}")
    if ids.shape[0] and (int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]):
        raise ValueError(f"lengths must lie in [1, T={ids.shape[1]}], got min {int(lengths.min())} "
                         f"max {int(lengths.max())}")
    temperature(batch)


def check_training(batch: dict, required: tuple[str, ...]) -> None:
    """Everything `check_tokens` checks, plus the per-token tensors `required` by the loss:
    shapes, a 0/1 response mask that selects only tokens with a logprob (1 <= t < len), and
    finite values wherever the mask is on. (A rank's shard may select no token; the worker
    checks the global count.)"""
    check_tokens(batch)
    shape = tuple(batch["input_ids"].shape)
    for key in ("response_mask", *required):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}")
    for key in ("response_mask", *PER_TOKEN_FLOAT_KEYS):
        if key in batch and tuple(batch[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(batch[key].shape)}, expected {shape} (input_ids)")
    mask = batch["response_mask"]
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("response_mask must hold only 0/1 values")
    mask = mask.bool()
    positions = torch.arange(shape[1])[None, :]
    has_logprob = (positions >= 1) & (positions < batch["lengths"][:, None])
    if bool((mask & ~has_logprob).any()):
        row, col = (mask & ~has_logprob).nonzero()[0].tolist()
        raise ValueError(f"response_mask selects token {col} of row {row}, which has no logprob "
                         f"(valid columns are 1 <= t < length={int(batch['lengths'][row])})")
    for key in PER_TOKEN_FLOAT_KEYS:
        if key in batch:
            bad = ~torch.isfinite(batch[key].float()) & mask
            if bool(bad.any()):
                raise ValueError(f"{key} holds {int(bad.sum())} non-finite value(s) on response tokens, "
                                 f"first at {bad.nonzero()[0].tolist()}")


def take_rows(batch: dict, rows: slice | Tensor) -> dict:
    """The rows `rows` of every [B, ...] tensor; scalars are shared."""
    bsz = num_rows(batch)
    return {k: (v[rows] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == bsz else v)
            for k, v in batch.items()}


def to_device(batch: dict, device) -> dict:
    """Tensors moved to `device` (a no-op on CPU); scalars unchanged."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def row_chunks(num: int, size: int) -> list[slice]:
    """Contiguous slices of at most `size` rows covering range(num)."""
    return [slice(lo, min(lo + size, num)) for lo in range(0, num, size)]


def dummy_rows(device="cpu") -> dict:
    """A 2-token row for ranks that run a padding forward under ZeRO-3 (collectives must match)."""
    return {"input_ids": torch.zeros((1, 2), dtype=torch.int64, device=device),
            "lengths": torch.tensor([2], device=device),
            "response_mask": torch.zeros((1, 2), device=device)}
