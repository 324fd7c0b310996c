"""Drift metrics between rollout and trainer logprobs of the same sampled tokens.

One function for both users: the per-step alignment check of an RL run and the
`lockstep mismatch` diagnostic. Inputs are fp32 logprobs of the same tokens; bit equality is
judged on the fp32 values themselves (`torch.equal` semantics per token).
"""
from __future__ import annotations

import torch


def drift_metrics(rollout_lp: torch.Tensor, trainer_lp: torch.Tensor, mask: torch.Tensor | None = None,
                  prefix: str = "") -> dict[str, float]:
    """rollout_lp, trainer_lp: same shape (fp32); mask: 1 where a token counts.

    Returns max/mean/p99 |Δ|, fraction bit-equal, k1 and k3 KL estimates of
    KL(rollout ‖ trainer) from rollout samples, min/max ratio π_trainer/π_rollout, and the
    worst per-sequence max |Δ| when inputs are [B, T].
    """
    if mask is None:
        mask = torch.ones_like(rollout_lp, dtype=torch.bool)
    mask = mask.bool()
    a, b = rollout_lp.float()[mask], trainer_lp.float()[mask]
    n = a.numel()
    if n == 0:
        raise ValueError("drift_metrics: no tokens to compare (empty mask)")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("drift_metrics: non-finite logprobs")
    diff = (b - a).double()
    absd = diff.abs()
    log_ratio = diff
    out = {
        "tokens": n,
        "max_abs_logprob_diff": float(absd.max()),
        "mean_abs_logprob_diff": float(absd.mean()),
        "p99_abs_logprob_diff": float(torch.quantile(absd, 0.99)) if n > 1 else float(absd.max()),
        "frac_bitwise_equal": float((a.view(torch.int32) == b.view(torch.int32)).double().mean()),
        "k1_kl": float((-log_ratio).mean()),
        "k3_kl": float((torch.exp(log_ratio) - 1 - log_ratio).mean()),
        "ratio_min": float(torch.exp(log_ratio.min())),
        "ratio_max": float(torch.exp(log_ratio.max())),
    }
    if rollout_lp.dim() == 2:
        per_seq = ((trainer_lp.float() - rollout_lp.float()).abs() * mask).amax(dim=1)
        out["seq_max_abs_logprob_diff"] = float(per_seq.max())
    return {f"{prefix}{k}": v for k, v in out.items()}
