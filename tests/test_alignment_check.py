"""The per-step alignment check: metrics on hand-made logprobs and the on_drift policies."""
import pytest
import torch

from alignment.check import AlignmentCheck, DriftAbort
from alignment.metrics import drift_metrics


def _pair():
    rollout = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.25, -3.0, 0.0, 0.0]])
    trainer = rollout.clone()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return rollout, trainer, mask


def test_identical_logprobs_read_zero():
    rollout, trainer, mask = _pair()
    m = drift_metrics(rollout, trainer, mask)
    assert m["tokens"] == 5
    assert m["max_abs_logprob_diff"] == 0.0 and m["mean_abs_logprob_diff"] == 0.0
    assert m["frac_bitwise_equal"] == 1.0 and m["k3_kl"] == 0.0 and m["ratio_min"] == m["ratio_max"] == 1.0


def test_drift_values_by_hand():
    rollout, trainer, mask = _pair()
    trainer[0, 1] = -2.5          # Δ = -0.5 on one of five tokens
    trainer[1, 0] = -0.125        # Δ = +0.125
    trainer[0, 3] = 9.0           # masked: must not count
    m = drift_metrics(rollout, trainer, mask)
    assert m["max_abs_logprob_diff"] == 0.5
    assert m["mean_abs_logprob_diff"] == pytest.approx((0.5 + 0.125) / 5)
    assert m["frac_bitwise_equal"] == pytest.approx(3 / 5)
    # k3 = mean(e^r - 1 - r) with r = trainer - rollout
    import math
    k3 = ((math.exp(-0.5) - 1 + 0.5) + (math.exp(0.125) - 1 - 0.125)) / 5
    assert m["k3_kl"] == pytest.approx(k3)
    assert m["ratio_min"] == pytest.approx(math.exp(-0.5)) and m["ratio_max"] == pytest.approx(math.exp(0.125))
    assert m["seq_max_abs_logprob_diff"] == 0.5


def test_one_ulp_is_drift():
    rollout, trainer, mask = _pair()
    trainer[0, 0] = torch.nextafter(trainer[0, 0], torch.tensor(0.0))
    m = drift_metrics(rollout, trainer, mask)
    assert m["max_abs_logprob_diff"] > 0 and m["frac_bitwise_equal"] == pytest.approx(4 / 5)


def test_policies():
    rollout, trainer, mask = _pair()
    drifted = trainer.clone()
    drifted[0, 0] += 0.01
    assert AlignmentCheck("abort", 0.0)(rollout, trainer, mask)[1] is None
    with pytest.raises(DriftAbort, match=r"max \|Δ\| 0.01"):
        AlignmentCheck("abort", 0.0)(rollout, drifted, mask)
    assert AlignmentCheck("abort", 0.05)(rollout, drifted, mask)[1] is None
    check = AlignmentCheck("correct", 0.0)
    assert check(rollout, drifted, mask)[1] == "correct" and check.corrected
    assert check(rollout, drifted, mask)[1] == "warn"          # switched once, then warns
    metrics, action = AlignmentCheck("warn", 0.0)(rollout, drifted, mask)
    assert action == "warn" and metrics["alignment/max_abs_logprob_diff"] > 0


def test_rows_subset():
    rollout, trainer, mask = _pair()
    trainer[1, 1] = 0.0
    metrics, action = AlignmentCheck("abort", 0.0)(rollout, trainer, mask, rows=torch.tensor([True, False]))
    assert action is None and metrics["alignment/tokens"] == 3
