"""The per-step alignment check of an RL run and its drift policy.

Each step the trainer's first forward, at the weights the rollout sampled with and before
the first optimizer step, yields logprobs of the rollout's tokens as a by-product
(`pre_update_logprobs`); comparing them with the rollout's logprobs costs one subtraction.
Policy `on_drift`: `warn` logs, `correct` switches π_old to a recompute with the configured
importance-sampling correction for the rest of the run, `abort` stops the run (the driver
checkpoints first).
"""
from __future__ import annotations

import logging

import torch

from alignment.metrics import drift_metrics

log = logging.getLogger("lockstep")


class DriftAbort(RuntimeError):
    """Raised by the check under on_drift=abort; the message shows the drift."""


class AlignmentCheck:
    def __init__(self, on_drift: str = "warn", threshold: float = 0.0):
        self.on_drift, self.threshold = on_drift, threshold
        self.corrected = False

    def __call__(self, rollout_lp: torch.Tensor, trainer_lp: torch.Tensor, mask: torch.Tensor,
                 rows: torch.Tensor | None = None) -> tuple[dict[str, float], str | None]:
        """Metrics (prefixed `alignment/`) and the action: None, 'warn', 'correct' or 'abort'."""
        if rows is not None:
            rollout_lp, trainer_lp, mask = rollout_lp[rows], trainer_lp[rows], mask[rows]
        metrics = drift_metrics(rollout_lp, trainer_lp, mask, prefix="alignment/")
        drift = metrics["alignment/max_abs_logprob_diff"]
        if drift <= self.threshold:
            return metrics, None
        message = (f"trainer/rollout logprob drift: max |Δ| {drift:.3g} > threshold {self.threshold:g} "
                   f"(mean {metrics['alignment/mean_abs_logprob_diff']:.3g}, bit-equal "
                   f"{metrics['alignment/frac_bitwise_equal']:.1%}, k3 KL {metrics['alignment/k3_kl']:.3g})")
        if self.on_drift == "abort":
            raise DriftAbort(message + "; alignment.on_drift=abort")
        if self.on_drift == "correct" and not self.corrected:
            self.corrected = True
            log.warning("%s; switching to recomputed π_old with IS correction", message)
            return metrics, "correct"
        log.warning(message)
        return metrics, "warn"
