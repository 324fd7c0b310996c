"""compute_policy_loss: the trainer's per-micro-batch composition, against hand values."""

import math

import pytest
import torch

from rl.algos import AlgoConfig, compute_policy_loss

NAN = float("nan")

# Two response tokens, ratios 1.1 and 1.5, advantage +1, clip 0.2 / 0.28:
# token losses -1.1 and -1.28 (clipped) -> token-mean -1.19. Row 1 is NaN padding.
LOGP = [[math.log(1.1), math.log(1.5)], [NAN, NAN]]
OLD = torch.tensor([[0.0, 0.0], [NAN, NAN]], dtype=torch.float64)
ADV = torch.tensor([[1.0, 1.0], [NAN, NAN]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)


def logprobs():
    return torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)


def cfg(**kwargs):
    return AlgoConfig(clip_low=0.2, clip_high=0.28, **kwargs)


def test_plain_ppo():
    loss, metrics = compute_policy_loss(logprobs(), OLD, ADV, MASK, cfg())
    assert loss.item() == pytest.approx(-1.19, abs=1e-12)
    assert metrics["skipped"].item() == 0
    assert metrics["pg_clipfrac"].item() == pytest.approx(0.5)


def test_kl_loss_and_entropy_bonus():
    # ref = logp - 0.5 -> k1 = 0.5 per token; 0.1 * 0.5 = +0.05
    # entropy (0.7, 0.3) -> mean 0.5; -0.01 * 0.5 = -0.005     total -1.19 + 0.05 - 0.005
    lp = logprobs()
    ref = lp.detach() - 0.5
    entropy = torch.tensor([[0.7, 0.3], [NAN, NAN]], dtype=torch.float64)
    config = cfg(entropy_coef=0.01, kl={"type": "k1", "use_kl_loss": True, "kl_loss_coef": 0.1})
    loss, metrics = compute_policy_loss(lp, OLD, ADV, MASK, config, ref_logprobs=ref,
                                        entropy=entropy)
    assert loss.item() == pytest.approx(-1.145, abs=1e-12)
    assert metrics["kl"].item() == pytest.approx(0.5)
    assert metrics["entropy"].item() == pytest.approx(0.5)
    loss.backward()
    # token 0: PPO -1.1/2 + KL 0.1 * 1/2 = -0.5; token 1 clipped: 0 + 0.05 = 0.05
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.5, 0.05], [0.0, 0.0]],
                                                     dtype=torch.float64))


def test_kl_logged_without_changing_the_loss():
    lp = logprobs()
    loss, metrics = compute_policy_loss(lp, OLD, ADV, MASK, cfg(kl={"type": "k1"}),
                                        ref_logprobs=lp.detach() - 0.5)
    assert loss.item() == pytest.approx(-1.19, abs=1e-12)
    assert metrics["kl"].item() == pytest.approx(0.5)


def test_icepop_masks_a_token():
    # rollout logprob of token 1 is log(0.1): rho = 1 / 0.1 = 10 > 5 -> masked; loss = -1.1
    rollout = torch.tensor([[0.0, math.log(0.1)], [NAN, NAN]], dtype=torch.float64)
    loss, metrics = compute_policy_loss(logprobs(), OLD, ADV, MASK,
                                        cfg(is_correction={"type": "icepop"}),
                                        rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(-1.1, abs=1e-12)
    assert metrics["is_token_masked_frac"].item() == pytest.approx(0.5)


def test_tis_weights_a_token():
    # rho of token 0 = e^(0 - log 0.25) = 4 -> capped at 2: (2 * -1.1 + 1 * -1.28) / 2 = -1.74
    rollout = torch.tensor([[math.log(0.25), 0.0], [NAN, NAN]], dtype=torch.float64)
    loss, _ = compute_policy_loss(logprobs(), OLD, ADV, MASK, cfg(is_correction={"type": "tis"}),
                                  rollout_logprobs=rollout)
    assert loss.item() == pytest.approx(-1.74, abs=1e-12)


def test_everything_masked_is_a_counted_skip_not_nan():
    rollout = torch.tensor([[5.0, 5.0], [NAN, NAN]], dtype=torch.float64)
    lp = logprobs()
    loss, metrics = compute_policy_loss(lp, OLD, ADV, MASK, cfg(is_correction={"type": "icepop"}),
                                        rollout_logprobs=rollout)
    assert metrics["skipped"].item() == 1
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 2, dtype=torch.float64))


def test_dr_grpo_uses_constant_length():
    # seq-mean-token-sum-norm with max_response_len 4: (-1.1 - 1.28) / 4 / 1 sequence = -0.595
    loss, _ = compute_policy_loss(logprobs(), OLD, ADV, MASK,
                                  cfg(name="dr_grpo", max_response_len=4))
    assert loss.item() == pytest.approx(-0.595, abs=1e-12)


def test_global_denominator_splits_a_minibatch():
    # Two micro-batches of the same data summed with the mini-batch token count (4) give the
    # mini-batch token-mean, -1.19.
    half, _ = compute_policy_loss(logprobs(), OLD, ADV, MASK, cfg(), global_denominator=4)
    assert 2 * half.item() == pytest.approx(-1.19, abs=1e-12)


def test_missing_inputs_and_guards():
    with pytest.raises(ValueError, match="ref_logprobs is required: algo.kl.use_kl_loss"):
        compute_policy_loss(logprobs(), OLD, ADV, MASK, cfg(kl={"use_kl_loss": True}))
    with pytest.raises(ValueError, match="rollout_logprobs is required.*'tis'"):
        compute_policy_loss(logprobs(), OLD, ADV, MASK, cfg(is_correction={"type": "tis"}))
    with pytest.raises(ValueError, match="entropy is required"):
        compute_policy_loss(logprobs(), OLD, ADV, MASK, cfg(entropy_coef=0.01))
    with pytest.raises(ValueError, match="zero response tokens"):
        compute_policy_loss(logprobs(), OLD, ADV, torch.zeros_like(MASK), cfg())
    bad = ADV.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="advantages holds 1 non-finite"):
        compute_policy_loss(logprobs(), OLD, bad, MASK, cfg())


def test_gradcheck_full_composition():
    torch.manual_seed(1)
    old = torch.randn(2, 5, dtype=torch.float64) * 0.2 - 2.0
    lp = (old + torch.randn(2, 5, dtype=torch.float64) * 0.3).requires_grad_()
    adv = torch.randn(2, 5, dtype=torch.float64)
    ref = old + 0.1 * torch.randn(2, 5, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.float64)
    mask[1, 3:] = 0
    config = cfg(clip_c=3.0, kl={"type": "k3", "use_kl_loss": True, "kl_loss_coef": 0.1},
                 loss_agg_mode="seq-mean-token-mean")
    assert torch.autograd.gradcheck(
        lambda x: compute_policy_loss(x, old, adv, mask, config, ref_logprobs=ref)[0],
        (lp,), eps=1e-6, atol=1e-8)
