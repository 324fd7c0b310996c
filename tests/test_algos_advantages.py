"""Advantage estimators against values worked out by hand (rl.algos.advantages)."""

import math

import pytest
import torch

from rl.algos import ADVANTAGE_ESTIMATORS, get_advantage_estimator
from rl.algos.advantages import GAE, GRPO, DrGRPO

NAN = float("nan")

# Six samples from two prompts, interleaved so grouping must follow the ids, not positions.
#   group 5: rows 0, 2, 4 with rewards 1, 0, 0
#   group 9: rows 1, 3, 5 with rewards 2, 4, 6
REWARDS = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.0, 6.0], dtype=torch.float64)
GROUPS = torch.tensor([5, 9, 5, 9, 5, 9])
# Different response lengths; row 3 has a prompt-like hole at t=0.
MASK = torch.tensor(
    [[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1], [1, 0, 0]], dtype=torch.float64
)


def broadcast(per_seq):
    return torch.tensor(per_seq, dtype=torch.float64)[:, None] * MASK


def test_registry_names():
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo", "gae"} <= set(ADVANTAGE_ESTIMATORS)
    assert isinstance(get_advantage_estimator("ppo"), GAE)
    assert isinstance(get_advantage_estimator("gae", gamma=0.5), GAE)
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'.*grpo"):
        get_advantage_estimator("nope")


def test_grpo_group_normalisation():
    # group 5: mean 1/3, deviations 2/3, -1/3, -1/3; sum sq = 4/9+1/9+1/9 = 2/3;
    #          unbiased var = (2/3)/2 = 1/3, std = 0.5773503
    #          -> (2/3)/0.5773503 = 1.1547005, (-1/3)/0.5773503 = -0.5773503
    # group 9: mean 4, deviations -2, 0, 2; unbiased var = 8/2 = 4, std 2 -> -1, 0, 1
    result = get_advantage_estimator("grpo", eps=0.0)(REWARDS, MASK, group_ids=GROUPS)
    expected = broadcast([1.1547005, -1.0, -0.5773503, 0.0, -0.5773503, 1.0])
    torch.testing.assert_close(result.advantages, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.returns, expected, atol=1e-6, rtol=0)


def test_grpo_eps_and_zero_spread_group():
    # Group 0 rewards equal (3, 3): advantage 0, not NaN. Group 1: 1, 0 -> mean 0.5,
    # unbiased std sqrt(0.25+0.25) = 0.7071068; with eps = 0.1: 0.5/0.8071068 = 0.6194973.
    rewards = torch.tensor([3.0, 3.0, 1.0, 0.0])
    mask = torch.ones(4, 2)
    result = GRPO(eps=0.1)(rewards, mask, group_ids=torch.tensor([0, 0, 1, 1]))
    expected = torch.tensor([0.0, 0.0, 0.6194973, -0.6194973])[:, None].expand(4, 2)
    torch.testing.assert_close(result.advantages, expected, atol=1e-6, rtol=0)
    assert result.metrics["num_zero_spread_groups"].item() == 1


def test_grpo_rejects_singleton_group():
    with pytest.raises(ValueError, match="at least 2 samples per group"):
        GRPO()(torch.tensor([1.0, 0.0, 1.0]), torch.ones(3, 2), group_ids=torch.tensor([0, 0, 1]))


def test_dr_grpo_mean_centring_only():
    # group 5: 1 - 1/3 = 2/3, 0 - 1/3 = -1/3 (x2); group 9: 2-4 = -2, 4-4 = 0, 6-4 = 2
    result = get_advantage_estimator("dr_grpo")(REWARDS, MASK, group_ids=GROUPS)
    expected = broadcast([2 / 3, -2.0, -1 / 3, 0.0, -1 / 3, 2.0])
    torch.testing.assert_close(result.advantages, expected, atol=1e-12, rtol=0)
    # Its matching loss has no length normalisation: token sums over a constant.
    assert DrGRPO.default_loss_agg_mode == "seq-mean-token-sum-norm"
    # No std, so a singleton group is well defined: advantage 0.
    single = DrGRPO()(torch.tensor([5.0]), torch.ones(1, 2), group_ids=torch.tensor([0]))
    assert torch.equal(single.advantages, torch.zeros(1, 2))


def test_rloo_leave_one_out():
    # group 5: row0 1 - (0+0)/2 = 1; row2 0 - (1+0)/2 = -0.5; row4 0 - (1+0)/2 = -0.5
    # group 9: row1 2 - (4+6)/2 = -3; row3 4 - (2+6)/2 = 0; row5 6 - (2+4)/2 = 3
    result = get_advantage_estimator("rloo")(REWARDS, MASK, group_ids=GROUPS)
    expected = broadcast([1.0, -3.0, -0.5, 0.0, -0.5, 3.0])
    torch.testing.assert_close(result.advantages, expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="rloo needs at least 2"):
        get_advantage_estimator("rloo")(REWARDS[:1], MASK[:1], group_ids=GROUPS[:1])


def test_reinforce_pp_returns_and_global_whitening():
    # gamma 0.5. row0 mask [1,1,1,0], reward 1 on t=2 -> returns 0.25, 0.5, 1
    #            row1 mask [1,1,0,0], reward 0 on t=1 -> returns 0, 0
    # 5 tokens: mean 1.75/5 = 0.35; deviations -0.1, 0.15, 0.65, -0.35, -0.35;
    # population var = (0.01+0.0225+0.4225+0.1225+0.1225)/5 = 0.14, std = 0.3741657
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    est = get_advantage_estimator("reinforce_pp", gamma=0.5, eps=0.0)
    result = est(torch.tensor([1.0, 0.0], dtype=torch.float64), mask)
    expected_returns = torch.tensor([[0.25, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                                    dtype=torch.float64)
    torch.testing.assert_close(result.returns, expected_returns, atol=1e-12, rtol=0)
    expected_adv = torch.tensor([[-0.2672612, 0.4008919, 1.7371980, 0.0],
                                 [-0.9354143, -0.9354143, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(result.advantages, expected_adv, atol=1e-6, rtol=0)


def test_reinforce_pp_kl_token_rewards():
    # gamma 0.5, per-token KL penalty folded in; padding holds garbage that must be ignored.
    # row0 rewards: -0.1, -0.1, 1-0.1 = 0.9 -> G2 = 0.9, G1 = -0.1+0.45 = 0.35,
    #               G0 = -0.1+0.175 = 0.075
    # row1 rewards: -0.2, -0.2+0 -> G1 = -0.2, G0 = -0.2-0.1 = -0.3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    token_rewards = torch.tensor([[-0.1, -0.1, -0.1, 99.0], [-0.2, -0.2, NAN, NAN]],
                                 dtype=torch.float64)
    result = get_advantage_estimator("reinforce_pp", gamma=0.5)(
        torch.tensor([1.0, 0.0], dtype=torch.float64), mask, token_rewards=token_rewards)
    expected = torch.tensor([[0.075, 0.35, 0.9, 0.0], [-0.3, -0.2, 0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(result.returns, expected, atol=1e-12, rtol=0)
    assert torch.isfinite(result.advantages).all()


def test_reinforce_pp_skips_observation_tokens():
    # mask [1,0,1,1], reward 1 on t=3, gamma 0.5: G3 = 1, G2 = 0.5, t=1 skipped (0),
    # G0 = 0.5 * G2 = 0.25 (the discount chain jumps over the masked token)
    mask = torch.tensor([[1, 0, 1, 1]], dtype=torch.float64)
    result = get_advantage_estimator("reinforce_pp", gamma=0.5)(
        torch.tensor([1.0], dtype=torch.float64), mask)
    expected = torch.tensor([[0.25, 0.0, 0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(result.returns, expected, atol=1e-12, rtol=0)


def test_reinforce_pp_baseline_subtracts_group_mean():
    # rewards 1, 0 in one group -> 0.5, -0.5; gamma 1: returns row0 [0.5, 0.5], row1 [-0.5]
    # tokens 0.5, 0.5, -0.5: mean 1/6, deviations 1/3, 1/3, -2/3, var (1/9+1/9+4/9)/3 = 2/9,
    # std 0.4714045 -> 0.7071068, 0.7071068, -1.4142136
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    result = get_advantage_estimator("reinforce_pp_baseline", eps=0.0)(
        torch.tensor([1.0, 0.0], dtype=torch.float64), mask, group_ids=torch.tensor([3, 3]))
    expected = torch.tensor([[0.7071068, 0.7071068], [-1.4142136, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(result.advantages, expected, atol=1e-6, rtol=0)


def test_gae_hand_values():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72), no whitening.
    # row0 mask [1,1,1,0], V = [0.5, 0.6, 0.7, pad], reward 1 on t=2:
    #   t2: delta = 1 + 0.9*0 - 0.7 = 0.3                    A2 = 0.3
    #   t1: delta = 0.9*0.7 - 0.6 = 0.03                     A1 = 0.03 + 0.72*0.3 = 0.246
    #   t0: delta = 0.9*0.6 - 0.5 = 0.04                     A0 = 0.04 + 0.72*0.246 = 0.21712
    #   returns = A + V = 0.71712, 0.846, 1.0
    # row1 mask [1,0,1,1] (t=1 an observation token), V = [0.2, pad, 0.4, 0.5], reward 2 on t=3:
    #   t3: delta = 2 - 0.5 = 1.5                             A3 = 1.5
    #   t2: delta = 0.9*0.5 - 0.4 = 0.05                     A2 = 0.05 + 0.72*1.5 = 1.13
    #   t1: skipped
    #   t0: delta = 0.9*0.4 - 0.2 = 0.16 (next value skips t1) A0 = 0.16 + 0.72*1.13 = 0.9736
    #   returns = 1.1736, 0, 1.53, 2.0
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, NAN], [0.2, 5.0, 0.4, 0.5]], dtype=torch.float64)
    est = get_advantage_estimator("ppo", gamma=0.9, lam=0.8, whiten=False)
    result = est(torch.tensor([1.0, 2.0], dtype=torch.float64), mask, values=values)
    expected_adv = torch.tensor([[0.21712, 0.246, 0.3, 0.0], [0.9736, 0.0, 1.13, 1.5]],
                                dtype=torch.float64)
    expected_ret = torch.tensor([[0.71712, 0.846, 1.0, 0.0], [1.1736, 0.0, 1.53, 2.0]],
                                dtype=torch.float64)
    torch.testing.assert_close(result.advantages, expected_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(result.returns, expected_ret, atol=1e-12, rtol=0)


def test_gae_whitening_and_kl_token_rewards():
    # V = 0, gamma = lam = 1: A_t = sum of future rewards.
    # row0 mask [1,1], reward 1, token rewards -0.1, -0.2 -> r = [-0.1, 0.8]: A = [0.7, 0.8]
    # row1 mask [1,0], reward 0 -> A = [0]
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    values = torch.zeros(2, 2, dtype=torch.float64)
    token_rewards = torch.tensor([[-0.1, -0.2], [0.0, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    raw = GAE(whiten=False)(rewards, mask, values=values, token_rewards=token_rewards)
    torch.testing.assert_close(raw.advantages, torch.tensor([[0.7, 0.8], [0.0, 0.0]],
                                                            dtype=torch.float64))
    # Whitened without token rewards: A = 1, 1, 0 -> mean 2/3, deviations 1/3, 1/3, -2/3,
    # var 2/9, std 0.4714045 -> 0.7071068, 0.7071068, -1.4142136; returns stay unwhitened.
    white = GAE(eps=0.0)(rewards, mask, values=values)
    torch.testing.assert_close(white.advantages, torch.tensor(
        [[0.7071068, 0.7071068], [-1.4142136, 0.0]], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(white.returns, torch.tensor([[1.0, 1.0], [0.0, 0.0]],
                                                           dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_nan_reward_raises(name):
    rewards = torch.tensor([1.0, NAN])
    with pytest.raises(ValueError, match="rewards holds 1 non-finite"):
        get_advantage_estimator(name)(rewards, torch.ones(2, 2), group_ids=torch.tensor([0, 0]),
                                      values=torch.zeros(2, 2))


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_empty_batch_raises(name):
    with pytest.raises(ValueError, match="zero response tokens"):
        get_advantage_estimator(name)(torch.tensor([1.0, 0.0]), torch.zeros(2, 3),
                                      group_ids=torch.tensor([0, 0]), values=torch.zeros(2, 3))


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_row_without_tokens_gets_zero_and_no_nan(name):
    # A sample whose response is fully masked contributes nothing but must not poison others.
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    result = get_advantage_estimator(name)(
        torch.tensor([1.0, 0.0, 0.5, 0.0]), mask, group_ids=torch.tensor([0, 0, 1, 1]),
        values=torch.full((4, 2), 0.1))
    assert torch.isfinite(result.advantages).all()
    assert torch.equal(result.advantages[1], torch.zeros(2))


def test_gae_nan_value_on_response_token_raises():
    values = torch.tensor([[0.1, NAN]])
    with pytest.raises(ValueError, match="values holds 1 non-finite"):
        GAE()(torch.tensor([1.0]), torch.ones(1, 2), values=values)
    with pytest.raises(ValueError, match="needs critic values"):
        GAE()(torch.tensor([1.0]), torch.ones(1, 2))


def test_input_errors_are_named():
    with pytest.raises(ValueError, match="needs group_ids"):
        GRPO()(torch.tensor([1.0, 0.0]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="takes outcome rewards only"):
        GRPO()(torch.tensor([1.0, 0.0]), torch.ones(2, 2), group_ids=torch.tensor([0, 0]),
               token_rewards=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"rewards must be \[B\]"):
        GRPO()(torch.tensor([1.0, 0.0, 1.0]), torch.ones(2, 2), group_ids=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="only 0/1"):
        GRPO()(torch.tensor([1.0, 0.0]), torch.full((2, 2), 0.5), group_ids=torch.tensor([0, 0]))


def test_integer_rewards_are_cast():
    result = get_advantage_estimator("dr_grpo")(torch.tensor([1, 0]), torch.ones(2, 1),
                                               group_ids=torch.tensor([0, 0]))
    assert result.advantages.dtype == torch.float32
    assert result.advantages[:, 0].tolist() == [0.5, -0.5]
    assert not math.isnan(result.metrics["reward_mean"].item())
