"""Trace: records per-layer component outputs for first-divergence localisation.

`lockstep mismatch` runs the trainer forward and the rollout-style cached forward with a
Trace each, then compares the recordings in forward order; the first (layer, component)
whose bits differ is where drift starts. Components: input_layernorm, attention,
linear_attention, post_attention_layernorm, router, experts, mlp/moe, final_norm, lm_head.
"""
from __future__ import annotations

import torch


class Trace:
    def __init__(self):
        self.records: dict[tuple[int, str], list[torch.Tensor]] = {}
        self.order: list[tuple[int, str]] = []

    def scope(self, layer: int):
        def record(component: str, tensor: torch.Tensor) -> None:
            key = (layer, component)
            if key not in self.records:
                self.records[key] = []
                self.order.append(key)
            self.records[key].append(tensor.detach().float().clone())
        return record

    def stacked(self, key) -> torch.Tensor:
        """All rows recorded under `key`, in call order (token order for a replay)."""
        return torch.cat(self.records[key], dim=0)


def first_divergent(a: Trace, b: Trace):
    """First (layer, component) in a's forward order whose rows differ in bits, else None.

    Rows are tokens in order; only the rows both traces recorded are compared (a replay
    does not feed the last sampled token, the trainer has no lm_head row for it).
    """
    for key in a.order:
        if key not in b.records:
            continue
        ta, tb = a.stacked(key), b.stacked(key)
        rows = min(ta.shape[0], tb.shape[0])
        if not torch.equal(ta[:rows], tb[:rows]):
            return {"layer": key[0], "component": key[1]}
    return None
