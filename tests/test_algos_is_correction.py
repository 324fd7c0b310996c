"""IS corrections: exactly which tokens/sequences each one truncates or masks."""

import math

import pytest
import torch

from rl.algos import IS_CORRECTIONS, get_is_correction

# Per-token ratio rho = pi_old / mu; row 1's third token is padding (its rho would flip the
# row-1 sequence ratio to 1 if padding were wrongly included).
#        rho per token        mask     seq prod  geo mean
# row0   1,   3,   0.5        1 1 1    1.5       1.5^(1/3) = 1.1447
# row1   3,   1,   (1/3)      1 1 0    3         3^(1/2)   = 1.7321
# row2   0.5, 0.5, 1          1 1 1    0.25      0.25^(1/3)= 0.6300
# row3   1.1, 1.1, 1.1        1 1 1    1.331     1.1
# row4   1.3, (5),  (5)       1 0 0    1.3       1.3  (over T=3 it would be 1.3^(1/3) = 1.091)
RHO = [[1.0, 3.0, 0.5], [3.0, 1.0, 1 / 3], [0.5, 0.5, 1.0], [1.1, 1.1, 1.1], [1.3, 5.0, 5.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]],
                    dtype=torch.float64)
ROLLOUT = torch.full((5, 3), -1.3, dtype=torch.float64)
OLD = ROLLOUT + torch.tensor([[math.log(r) for r in row] for row in RHO], dtype=torch.float64)
NUM_TOKENS = 12


def test_registry():
    assert set(IS_CORRECTIONS) == {"tis", "mis_seq", "mis_geo", "icepop"}
    with pytest.raises(ValueError, match="unknown is_correction 'x'; allowed: none, tis"):
        get_is_correction("x")


def test_token_tis_truncates_only_large_ratios():
    # cap 2: the two tokens with rho 3, (0,1) and (1,0), become exactly 2; nothing masked.
    result = get_is_correction("tis", high=2.0)(OLD, ROLLOUT, MASK)
    expected = torch.tensor([[1.0, 2.0, 0.5], [2.0, 1.0, 0.0], [0.5, 0.5, 1.0],
                             [1.1, 1.1, 1.1], [1.3, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(result.weights, expected, atol=1e-12, rtol=0)
    assert result.weights[0, 1].item() == 2.0 and result.weights[1, 0].item() == 2.0
    assert torch.equal(result.mask, MASK.bool())
    assert result.metrics["is_truncated_frac"].item() == pytest.approx(2 / NUM_TOKENS)


def test_sequence_mis_masks_rows_out_of_bounds():
    # [0.5, 2]: row0 1.5 keep, row1 3 mask, row2 0.25 mask, row3 1.331 keep, row4 1.3 keep
    result = get_is_correction("mis_seq", low=0.5, high=2.0)(OLD, ROLLOUT, MASK)
    expected = torch.tensor([[1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]],
                            dtype=torch.bool)
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weights, expected.double())
    assert result.metrics["is_seq_masked_frac"].item() == pytest.approx(2 / 5)
    assert result.metrics["is_token_masked_frac"].item() == pytest.approx(5 / NUM_TOKENS)


def test_geometric_mis_masks_by_per_token_mean():
    # [0.9, 1.12]: row0 1.1447 mask (the sequence-level test above kept it), row1 1.732 mask,
    # row2 0.630 mask, row3 1.1 keep, row4 1.3 mask (the mean is over its 1 real token)
    result = get_is_correction("mis_geo", low=0.9, high=1.12)(OLD, ROLLOUT, MASK)
    expected = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]],
                            dtype=torch.bool)
    assert torch.equal(result.mask, expected)
    assert result.metrics["is_seq_masked_frac"].item() == pytest.approx(4 / 5)


def test_icepop_masks_tokens_outside_band():
    # [0.6, 2.5]: masked high (rho 3): (0,1), (1,0); masked low (rho 0.5): (0,2), (2,0), (2,1)
    result = get_is_correction("icepop", low=0.6, high=2.5)(OLD, ROLLOUT, MASK)
    expected = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [1, 0, 0]],
                            dtype=torch.bool)
    assert torch.equal(result.mask, expected)
    assert result.metrics["is_token_masked_frac"].item() == pytest.approx(5 / NUM_TOKENS)
    assert result.metrics["is_token_masked_low_frac"].item() == pytest.approx(3 / NUM_TOKENS)
    assert result.metrics["is_token_masked_high_frac"].item() == pytest.approx(2 / NUM_TOKENS)


def test_identical_policies_change_nothing():
    for name in IS_CORRECTIONS:
        result = get_is_correction(name)(ROLLOUT, ROLLOUT, MASK)
        assert torch.equal(result.mask, MASK.bool()), name
        assert torch.equal(result.weights, MASK), name


def test_long_sequence_ratio_does_not_overflow():
    # 1000 tokens each with log rho = 1: prod = e^1000 (inf in any float) -> masked, no NaN.
    old = torch.ones(1, 1000)
    result = get_is_correction("mis_seq")(old, torch.zeros(1, 1000), torch.ones(1, 1000))
    assert not result.mask.any()
    assert torch.isfinite(result.metrics["is_log_stat_max"])


def test_defaults_and_threshold_validation():
    assert get_is_correction("tis").high == 2.0
    icepop = get_is_correction("icepop")
    assert (icepop.low, icepop.high) == (0.5, 5.0)
    with pytest.raises(ValueError, match="need 0 <= low < high"):
        get_is_correction("icepop", low=3.0, high=2.0)
    with pytest.raises(ValueError, match="takes only an upper threshold"):
        get_is_correction("tis", low=0.5)


def test_nan_logprob_raises():
    old = OLD.clone()
    old[2, 2] = float("nan")
    with pytest.raises(ValueError, match="old_logprobs holds 1 non-finite"):
        get_is_correction("icepop")(old, ROLLOUT, MASK)
