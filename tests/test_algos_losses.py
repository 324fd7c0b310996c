"""Loss aggregation, PPO clipped loss, value loss and entropy against hand values."""

import math

import pytest
import torch

from rl.algos import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    entropy_from_logits,
    entropy_loss,
    ppo_policy_loss,
    value_loss,
)

NAN = float("nan")

# --- aggregation -------------------------------------------------------------------------
# loss             mask         row sums  row token-means
# [1, 2, 3]        [1, 1, 0]    3         1.5
# [4, 5, 6]        [1, 0, 0]    4         4
# [7, 8, NaN]      [0, 0, 0]    (empty row: excluded from every seq-mean)
AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, NAN]])
AGG_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("token-mean", {}, 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("seq-mean-token-sum", {}, 3.5),  # (3 + 4) / 2 sequences
        ("seq-mean-token-mean", {}, 2.75),  # (1.5 + 4) / 2
        ("seq-mean-token-sum-norm", {"norm_len": 4}, 0.875),  # (3/4 + 4/4) / 2
        ("seq-mean-token-sum-norm", {}, 7 / 6),  # default L = T = 3: (3/3 + 4/3) / 2
        ("token-mean", {"global_denominator": 10}, 0.7),  # 7 / 10 mini-batch tokens
        ("seq-mean-token-sum", {"global_denominator": 4}, 1.75),  # (3 + 4) / 4 sequences
        ("seq-mean-token-mean", {"global_denominator": 5}, 1.1),  # (1.5 + 4) / 5
    ],
    ids=lambda v: str(v),
)
def test_aggregation_hand_values(mode, kwargs, expected):
    result = aggregate_loss(AGG_LOSS, AGG_MASK, mode, **kwargs)
    assert result.item() == pytest.approx(expected, abs=1e-6)


def test_every_registered_aggregation_is_tested():
    assert set(LOSS_AGGREGATIONS) == {
        "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"}


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
def test_aggregation_all_masked_raises(mode):
    with pytest.raises(ValueError, match="all tokens masked"):
        aggregate_loss(AGG_LOSS, torch.zeros(3, 3), mode)


def test_aggregation_unknown_mode():
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'sum'.*token-mean"):
        aggregate_loss(AGG_LOSS, AGG_MASK, "sum")


# --- PPO clipped policy loss --------------------------------------------------------------
# clip_low 0.2, clip_high 0.28 (clip-higher), dual clip c = 3. old_logprobs 0, logprobs log r.
# case  ratio  A    -A*r    -A*clip(r, .8, 1.28)  max     dual (A<0: min with -A*3)  clipped?
# 0     1.10  +1   -1.10   -1.10                 -1.10                              no
# 1     1.50  +1   -1.50   -1.28                 -1.28                              yes
# 2     0.50  +1   -0.50   -0.80                 -0.50                              no
# 3     0.50  -1    0.50    0.80                  0.80   0.80                       yes
# 4     1.50  -1    1.50    1.28                  1.50   1.50                       no
# 5     4.00  -1    4.00    1.28                  4.00   3.00                       dual
# 6     4.00  +2   -8.00   -2.56                 -2.56                              yes
# 7     1.25  +1   -1.25   -1.25                 -1.25  (inside 1.28, outside 1.2)  no
RATIOS = [1.1, 1.5, 0.5, 0.5, 1.5, 4.0, 4.0, 1.25]
ADVS = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 2.0, 1.0]
TOKEN_LOSSES = [-1.1, -1.28, -0.5, 0.8, 1.5, 3.0, -2.56, -1.25]  # sum -1.39
# d loss_t / d logp_t = -A * r where the unclipped term is active, 0 where clipped.
TOKEN_GRADS = [-1.1, 0.0, -0.5, 0.0, 1.5, 0.0, 0.0, -1.25]


def ppo_inputs():
    # Row 1 is padding full of NaN: it must neither change the loss nor get a NaN gradient.
    logprobs = torch.tensor([[math.log(r) for r in RATIOS], [NAN] * 8], dtype=torch.float64,
                            requires_grad=True)
    old = torch.tensor([[0.0] * 8, [NAN] * 8], dtype=torch.float64)
    adv = torch.tensor([ADVS, [NAN] * 8], dtype=torch.float64)
    mask = torch.tensor([[1.0] * 8, [0.0] * 8], dtype=torch.float64)
    return logprobs, old, adv, mask


def test_ppo_clip_higher_and_dual_clip_cases():
    logprobs, old, adv, mask = ppo_inputs()
    loss, metrics = ppo_policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                    clip_c=3.0, loss_agg_mode="token-mean")
    assert loss.item() == pytest.approx(-1.39 / 8, abs=1e-12)
    assert metrics["pg_clipfrac"].item() == pytest.approx(3 / 8)  # cases 1, 3, 6
    assert metrics["pg_clipfrac_dual"].item() == pytest.approx(1 / 8)  # case 5
    assert metrics["ratio_min"].item() == pytest.approx(0.5)
    assert metrics["ratio_max"].item() == pytest.approx(4.0)
    # ppo_kl = mean(old - new) = -mean(log r)
    assert metrics["ppo_kl"].item() == pytest.approx(-sum(map(math.log, RATIOS)) / 8)
    loss.backward()
    expected_grad = torch.tensor([[g / 8 for g in TOKEN_GRADS], [0.0] * 8], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected_grad, atol=1e-12, rtol=0)


def test_ppo_without_dual_clip_is_unbounded():
    # Case 5 without dual clip: 4.0 instead of 3.0, so the sum grows by 1.
    logprobs, old, adv, mask = ppo_inputs()
    loss, metrics = ppo_policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.39 + 1.0) / 8, abs=1e-12)
    assert metrics["pg_clipfrac_dual"].item() == 0.0


def test_ppo_symmetric_clip_clips_case_7():
    # With clip_high = 0.2, ratio 1.25 > 1.2 is clipped: -1.2 instead of -1.25.
    logprobs, old, adv, mask = ppo_inputs()
    loss, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.2,
                              clip_c=3.0)
    # case 1 and 6 also move from 1.28 to 1.2: -1.2 and -2.4
    expected = [-1.1, -1.2, -0.5, 0.8, 1.5, 3.0, -2.4, -1.2]
    assert loss.item() == pytest.approx(sum(expected) / 8, abs=1e-12)


def test_ppo_token_weights_scale_tokens_without_grad():
    logprobs, old, adv, mask = ppo_inputs()
    weights = torch.tensor([[2.0] + [0.0] * 7, [NAN] * 8], dtype=torch.float64)
    loss, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28,
                              token_weights=weights)
    assert loss.item() == pytest.approx(2.0 * -1.1 / 8, abs=1e-12)


def test_ppo_gradcheck_float64():
    torch.manual_seed(0)
    old = torch.randn(3, 7, dtype=torch.float64) * 0.3 - 1.0
    logprobs = (old + torch.randn(3, 7, dtype=torch.float64) * 0.4).requires_grad_()
    adv = torch.randn(3, 7, dtype=torch.float64)
    mask = (torch.rand(3, 7) > 0.3).double()
    mask[:, 0] = 1.0
    for mode in sorted(LOSS_AGGREGATIONS):
        def fn(lp, mode=mode):
            return ppo_policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0,
                                   loss_agg_mode=mode)[0]
        assert torch.autograd.gradcheck(fn, (logprobs,), eps=1e-6, atol=1e-8)


def test_ppo_guards():
    logprobs, old, adv, mask = ppo_inputs()
    bad_adv = adv.clone()
    bad_adv[0, 3] = NAN
    with pytest.raises(ValueError, match="advantages holds 1 non-finite"):
        ppo_policy_loss(logprobs, old, bad_adv, mask)
    with pytest.raises(ValueError, match="zero response tokens"):
        ppo_policy_loss(logprobs, old, adv, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="clip_c must be > 1"):
        ppo_policy_loss(logprobs, old, adv, mask, clip_c=0.5)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        ppo_policy_loss(logprobs, old[:, :4], adv, mask)


def test_ppo_extreme_ratio_stays_finite():
    logprobs = torch.tensor([[200.0, -200.0]], requires_grad=True)
    loss, metrics = ppo_policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]),
                                    torch.ones(1, 2), clip_c=3.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert torch.isfinite(metrics["ratio_max"])


# --- value loss ---------------------------------------------------------------------------
# clip 0.2:
# t  V    old  R    (V-R)^2  V_clip = old + clip(V-old)  (V_clip-R)^2  max    clipped?
# 0  1.0  0.5  2.0  1.00     0.7                         1.69          1.69   yes
# 1  2.0  2.0  1.0  1.00     2.0                         1.00          1.00   no (equal)
# 2  0.0  0.0  0.3  0.09     0.0                         0.09          0.09   no
# 3  1.0  0.5  0.6  0.16     0.7                         0.01          0.16   no
# token-mean * 0.5 = 0.5 * 2.94 / 4 = 0.3675
def test_value_loss_hand_values():
    values = torch.tensor([[1.0, 2.0, 0.0, 1.0, NAN]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 0.0, 0.5, NAN]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 1.0, 0.3, 0.6, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, metrics = value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.3675, abs=1e-12)
    assert metrics["vf_clipfrac"].item() == pytest.approx(0.25)
    loss.backward()
    # d/dV of 0.5*mean: t0 clipped (V_clip constant in V) -> 0; t1 (V-R)/4 = 0.25;
    # t2 (0-0.3)/4 = -0.075; t3 (1-0.6)/4 = 0.1; padding 0.
    expected = torch.tensor([[0.0, 0.25, -0.075, 0.1, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected, atol=1e-12, rtol=0)
    # Plain MSE: 0.5 * (1 + 1 + 0.09 + 0.16) / 4 = 0.28125
    plain, _ = value_loss(values, old, returns, mask, clip_range=None)
    assert plain.item() == pytest.approx(0.28125, abs=1e-12)


# --- entropy ------------------------------------------------------------------------------
def test_entropy_from_logits_hand_values():
    # uniform over 2: ln 2 = 0.6931472; p = (1/4, 3/4) from logits (0, ln 3):
    # -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351; (1000, 0): ~0
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [1000.0, 0.0]]])
    entropy = entropy_from_logits(logits)
    torch.testing.assert_close(entropy, torch.tensor([[0.6931472, 0.5623351, 0.0]]),
                               atol=1e-6, rtol=0)
    # bf16 logits are promoted to fp32 for the reduction.
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_entropy_loss_aggregates_masked_tokens():
    entropy = torch.tensor([[0.7, 0.3, NAN]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert entropy_loss(entropy, mask).item() == pytest.approx(0.5)
