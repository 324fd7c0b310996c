"""KL estimators k1/k2/k3, KL loss and KL reward penalty against hand values."""

import pytest
import torch

from rl.algos import KL_ESTIMATORS, get_kl_estimator, kl_loss, kl_penalty_rewards, token_kl

NAN = float("nan")

# x = logp - ref_logp, log_r = -x
# token  logp  ref   x     k1 = x   k2 = x^2/2   k3 = e^(log_r) - 1 - log_r
# a      -1.0  -1.5  0.5   0.5      0.125        e^-0.5 - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307
# b      -2.0  -1.0  -1.0  -1.0     0.5          e^1 - 1 - 1 = 0.7182818
# c      -0.7  -0.7  0     0        0            0
LOGP = torch.tensor([[-1.0, -2.0, -0.7, NAN]], dtype=torch.float64)
REF = torch.tensor([[-1.5, -1.0, -0.7, NAN]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", [0.5, -1.0, 0.0, 0.0]),
        ("k2", [0.125, 0.5, 0.0, 0.0]),
        ("k3", [0.1065307, 0.7182818, 0.0, 0.0]),
    ],
)
def test_kl_estimators_hand_values(kind, expected):
    kl = token_kl(LOGP, REF, MASK, kind)
    torch.testing.assert_close(kl, torch.tensor([expected], dtype=torch.float64), atol=1e-6,
                               rtol=0)


def test_registry():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; allowed: k1, k2, k3"):
        get_kl_estimator("k4")


def test_kl_loss_token_mean_and_gradient():
    # k3 token-mean: (0.1065307 + 0.7182818 + 0) / 3 = 0.2749375
    logp = LOGP.clone().requires_grad_()
    loss = kl_loss(logp, REF, MASK, "k3", "token-mean")
    assert loss.item() == pytest.approx(0.2749375, abs=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - e^(ref - logp): a: 1 - e^-0.5 = 0.3934693, b: 1 - e = -1.7182818, c: 0
    expected = torch.tensor([[0.3934693 / 3, -1.7182818 / 3, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=0)


def test_kl_penalty_rewards():
    # -coef * k1 with coef 0.1: -0.05, +0.1, 0; padding exactly 0 and no gradient.
    logp = LOGP.clone().requires_grad_()
    rewards = kl_penalty_rewards(logp, REF, MASK, "k1", coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 0.0, 0.0]],
                                                     dtype=torch.float64))
    assert not rewards.requires_grad


def test_k3_extreme_log_ratio_is_finite():
    # |log_r| clamped to 20: log_r = -20 -> e^-20 + 19; log_r = +20 -> e^20 - 21
    kl = token_kl(torch.tensor([[0.0, -1000.0]]), torch.tensor([[-1000.0, 0.0]]),
                  torch.ones(1, 2), "k3")
    assert torch.isfinite(kl).all()
    assert kl[0, 0].item() == pytest.approx(19.0, abs=1e-6)


def test_nan_on_response_token_raises():
    ref = REF.clone()
    ref[0, 1] = NAN
    with pytest.raises(ValueError, match="ref_logprobs holds 1 non-finite"):
        token_kl(LOGP, ref, MASK, "k1")
