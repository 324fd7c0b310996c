"""The trainer batch built from rollout samples: layout, masks, groups, guards."""
import pytest
import torch

from rl.algos import AlgoConfig
from rl.batching import build_train_batch
from rollout.batch import RolloutSample


def _sample(prompt, response, lps, finish="stop", pi=0, si=0):
    return RolloutSample(prompt_index=pi, sample_index=si, prompt_ids=prompt, response_ids=response,
                         response_logprobs=torch.tensor(lps, dtype=torch.float32), finish_reason=finish)


def test_layout_and_grpo_advantages():
    samples = [_sample([5, 6], [7, 2], [-0.5, -0.25]), _sample([5, 6], [8, 9, 2], [-1.0, -2.0, -0.125]),
               _sample([9], [4, 2], [-0.75, -0.5]), _sample([9], [3], [-1.5])]
    batch, _ = build_train_batch(samples, [1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1], AlgoConfig(), 1.0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 0], [5, 6, 8, 9, 2], [9, 4, 2, 0, 0], [9, 3, 0, 0, 0]]
    assert batch["lengths"].tolist() == [4, 5, 3, 2]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    assert batch["old_logprobs"][1].tolist() == [0, 0, -1.0, -2.0, -0.125]
    # GRPO: group {1, 0}: mean 0.5, unbiased std 0.7071 -> +-0.7071 on response tokens
    adv = batch["advantages"]
    assert adv[0, 2].item() == pytest.approx(0.70710, abs=1e-4) and adv[1, 2].item() == pytest.approx(-0.70710, abs=1e-4)
    assert adv[0, 0].item() == 0.0 and adv[3, 1].item() == pytest.approx(0.70710, abs=1e-4)


def test_dynamic_sampling_drops_flat_groups():
    samples = [_sample([5], [7], [-0.5]), _sample([5], [8], [-1.0]), _sample([9], [4], [-0.7]), _sample([9], [3], [-1.5])]
    algo = AlgoConfig(dynamic_sampling={"enabled": True})
    batch, metrics = build_train_batch(samples, [1.0, 1.0, 0.0, 1.0], [0, 0, 1, 1], algo, 1.0)
    assert batch["input_ids"].shape[0] == 2 and metrics["batch/dropped_groups"] == 1.0
    none, metrics = build_train_batch(samples[:2], [1.0, 1.0], [0, 0], algo, 1.0)
    assert none is None


def test_nan_reward_is_an_error():
    samples = [_sample([5], [7], [-0.5]), _sample([5], [8], [-1.0])]
    with pytest.raises(ValueError, match="non-finite reward"):
        build_train_batch(samples, [float("nan"), 1.0], [0, 0], AlgoConfig(), 1.0)
