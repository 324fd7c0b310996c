"""The trainer's policy-loss gradients are correct: the worker's micro-batch loop
(`trainer.step.accumulate`, global denominators, PPO clip + KL loss from rl.algos) on the tiny
model in fp32 against autograd of a float64 reference (tests/naive.py), within a tolerance.
Gradients are not bitwise anything (DESIGN.md §2.6)."""

import pytest
import torch

import naive
from naive import assert_close
from rl.algos import AlgoConfig, compute_policy_loss
from rl.model.checkpoint import load_model
from tests_paths import TINY
from trainer.objectives import MetricAccumulator, PolicyObjective
from trainer.modules import PolicyModule
from trainer.step import PlainEngine, accumulate
from trainer.synthetic import random_batch


pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(5)
    model = load_model(TINY, dtype=torch.float32)
    with torch.no_grad():                      # larger weights: a stronger signal through layers
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    return model


def _reference_logprobs(m64, batch):
    out = torch.zeros(batch["input_ids"].shape, dtype=torch.float64)
    for b, n in enumerate(batch["lengths"].tolist()):
        out[b, 1:n] = naive.model_logprobs(m64, batch["input_ids"][b, :n])
    return out


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_grad_matches_float64_reference(agg):
    model = _model()
    algo = AlgoConfig(name="grpo", clip_low=0.2, clip_high=0.28, clip_c=3.0, loss_agg_mode=agg,
                      kl={"use_kl_loss": True, "kl_loss_coef": 0.1, "type": "k3"})
    batch = random_batch(model.config.vocab_size, num_rows=5, max_len=14, seed=3)
    with torch.no_grad():
        current = model.sequence_logprobs(batch["input_ids"], batch["lengths"])
    gen = torch.Generator().manual_seed(7)
    mask = batch["response_mask"]
    # pi_old and the reference differ from the current policy so the clip and KL are active
    batch["old_logprobs"] = (current + 0.3 * torch.randn(current.shape, generator=gen)) * mask
    batch["ref_logprobs"] = (current + 0.2 * torch.randn(current.shape, generator=gen)) * mask

    # ours: the worker's loop, micro-batches of 2 rows (3 micro-batches, the last one short)
    num_tokens, num_seqs = float(mask.sum()), float(mask.bool().any(1).sum())
    metrics = MetricAccumulator()
    assert accumulate(PlainEngine(PolicyModule(model)), PolicyObjective(algo), batch, num_tokens,
                      num_seqs, micro_batch_size=2, metrics=metrics) is None
    clipfrac = metrics.result(1)["pg_clipfrac"]
    assert 0.05 < clipfrac < 0.95, f"clip should be active on some tokens, clipfrac={clipfrac}"

    # reference: float64 forward of each sequence, the same loss on the whole batch at once
    m64, params64 = naive.float64_twin(model)
    ref_lp = _reference_logprobs(m64, batch)
    loss64, _ = compute_policy_loss(ref_lp, batch["old_logprobs"].double(), batch["advantages"].double(),
                                    mask, algo, ref_logprobs=batch["ref_logprobs"].double())
    loss64.backward()
    assert_close(torch.tensor(metrics.result(1)["loss"]), loss64.detach(), "policy loss", rtol=1e-3, atol=1e-5)

    naive.assert_grads_match(model.named_parameters(), params64)
