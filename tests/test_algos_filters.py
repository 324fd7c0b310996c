"""DAPO dynamic sampling, overlong penalty and truncation mask."""

import pytest
import torch

from rl.algos import dynamic_sampling_filter, overlong_penalty, truncation_mask


def test_dynamic_sampling_drops_constant_groups():
    # group 0: rewards 1, 1 (all equal) -> drop; group 1: 0, 1 -> keep rows 2, 3;
    # group 2: 0.5, 0.5 -> drop; group 3: a single sample has no spread -> drop
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    result = dynamic_sampling_filter(rewards, groups)
    assert result.kept_indices.tolist() == [2, 3]
    assert (result.num_kept_groups, result.num_dropped_groups) == (1, 3)


def test_dynamic_sampling_interleaved_groups_keep_order():
    # group 7 = rows 0, 2 (1, 1) dropped; group 4 = rows 1, 3, 4 (0, 1, 0) kept in row order
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([7, 4, 7, 4, 4])
    result = dynamic_sampling_filter(rewards, groups)
    assert result.kept_indices.tolist() == [1, 3, 4]
    assert (result.num_kept_groups, result.num_dropped_groups) == (1, 1)


def test_dynamic_sampling_nan_raises():
    with pytest.raises(ValueError, match="rewards holds 1 non-finite"):
        dynamic_sampling_filter(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="must both be"):
        dynamic_sampling_filter(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))


def test_overlong_penalty_hand_values():
    # max 10, buffer 4 -> free up to 6 tokens, then -0.5 * (n - 6) / 4, capped at -0.5:
    # n = 3: 0, 6: 0, 7: -0.125, 8: -0.25, 10: -0.5, 12 (beyond max): -0.5
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    penalty = overlong_penalty(lengths, max_response_len=10, buffer_len=4, penalty_factor=0.5)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))


def test_overlong_penalty_bad_config():
    with pytest.raises(ValueError, match="buffer_len must be in"):
        overlong_penalty(torch.tensor([3]), max_response_len=10, buffer_len=0)
    with pytest.raises(ValueError, match="buffer_len must be in"):
        overlong_penalty(torch.tensor([3]), max_response_len=10, buffer_len=11)


def test_truncation_mask():
    lengths = torch.tensor([5, 10, 10])
    by_length = truncation_mask(lengths, max_response_len=10)
    assert by_length.keep.tolist() == [True, False, False]
    assert by_length.num_masked == 2
    # With stop flags, a sample that ended exactly at the limit with EOS is not truncated.
    by_flag = truncation_mask(lengths, 10, finished=torch.tensor([True, True, False]))
    assert by_flag.keep.tolist() == [True, True, False]
    assert by_flag.num_masked == 1


def test_apply_overlong_from_config():
    from rl.algos import AlgoConfig, apply_overlong

    # max 10, buffer 4, factor 1: lengths 6 -> 0, 8 -> -0.5, 10 -> -1; truncated = length 10
    cfg = AlgoConfig(max_response_len=10,
                     overlong={"buffer_len": 4, "penalty_factor": 1.0, "mask_truncated": True})
    rewards, keep = apply_overlong(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([6, 8, 10]), cfg)
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.5, 0.0]))
    assert keep.tolist() == [True, True, False]
    # Defaults: nothing changes.
    rewards, keep = apply_overlong(torch.tensor([1.0]), torch.tensor([99]), AlgoConfig())
    assert rewards.tolist() == [1.0] and keep.tolist() == [True]
