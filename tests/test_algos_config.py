"""AlgoConfig validation: defaults, named errors, estimator construction."""

import pytest
from pydantic import ValidationError

from rl.algos import AlgoConfig
from rl.algos.advantages import GAE, ReinforcePP


def test_defaults():
    cfg = AlgoConfig()
    assert cfg.name == "grpo" and cfg.loss_agg_mode == "token-mean"
    assert cfg.old_logprobs == "rollout" and not cfg.recompute_old_logprobs
    assert cfg.build_is_correction() is None
    assert not cfg.needs_critic


def test_dr_grpo_defaults_to_its_aggregation_unless_overridden():
    assert AlgoConfig(name="dr_grpo").loss_agg_mode == "seq-mean-token-sum-norm"
    assert AlgoConfig(name="dr_grpo", loss_agg_mode="token-mean").loss_agg_mode == "token-mean"


def test_yaml_like_dict_builds_estimators():
    cfg = AlgoConfig.model_validate({
        "name": "ppo", "gamma": 0.9, "lam": 0.8, "whiten_advantages": False,
        "kl": {"type": "k1", "kl_reward_coef": 0.05},
        "is_correction": {"type": "icepop", "low": 0.4},
        "old_logprobs": "recompute",
    })
    estimator = cfg.build_advantage_estimator()
    assert isinstance(estimator, GAE)
    assert (estimator.gamma, estimator.lam, estimator.whiten) == (0.9, 0.8, False)
    assert cfg.needs_critic and cfg.recompute_old_logprobs
    correction = cfg.build_is_correction()
    assert (correction.low, correction.high) == (0.4, 5.0)
    reinforce = AlgoConfig(name="reinforce_pp", gamma=0.5).build_advantage_estimator()
    assert isinstance(reinforce, ReinforcePP) and reinforce.gamma == 0.5


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "ppg"}, "algo.name: 'ppg' is not one of .*grpo.*rloo"),
        ({"loss_agg_mode": "mean"}, "algo.loss_agg_mode: 'mean' is not one of token-mean"),
        ({"kl": {"type": "k9"}}, "algo.kl.type: 'k9' is not one of k1, k2, k3"),
        ({"is_correction": {"type": "tris"}}, "algo.is_correction.type: 'tris' is not one of "
                                              "none, tis"),
        ({"old_logprobs": "ref"}, "algo.old_logprobs: 'ref' is not one of rollout, recompute"),
        ({"kl": {"kl_reward_coef": 0.1}}, "algo.kl.kl_reward_coef: algo.name 'grpo' takes "
                                          "outcome rewards only"),
        ({"overlong": {"buffer_len": 64}}, "algo.max_response_len: required"),
        ({"overlong": {"buffer_len": 64}, "max_response_len": 32}, "exceeds"),
        ({"is_correction": {"type": "icepop", "low": 2.0, "high": 1.0}},
         "algo.is_correction: .*need 0 <= low < high"),
        ({"is_correction": {"high": 2.0}}, "type is 'none'"),
        ({"clip_c": 0.9}, "clip_c"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"ppo_epochs": 0}, "ppo_epochs"),
        ({"clip": 0.2}, "Extra inputs are not permitted"),
        ({"kl": {"coef": 0.2}}, "Extra inputs are not permitted"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_invalid_configs_name_the_field(data, message):
    with pytest.raises(ValidationError, match=message):
        AlgoConfig.model_validate(data)
