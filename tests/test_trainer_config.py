"""Pure-python parts of the trainer: TrainerConfig validation (errors name the field), the LR
schedule, batch validation messages, row sharding, metric reduction."""
import pytest
import torch
from pydantic import ValidationError

from trainer.batch import check_training
from trainer.config import TrainerConfig
from trainer.engine import WarmupDecay, deepspeed_config
from trainer.group import split_even, train_shards
from trainer.objectives import MetricAccumulator
from trainer.synthetic import random_batch


@pytest.mark.parametrize("bad, field", [({"zero_stage": 4}, "zero_stage"),
                                        ({"micro_batch_size": 0}, "micro_batch_size"),
                                        ({"lr": -1.0}, "lr"),
                                        ({"learning_rate": 1e-3}, "learning_rate"),
                                        ({"scheduler": "cosine"}, "trainer.total_steps"),
                                        ({"warmup_steps": 9, "total_steps": 5}, "trainer.warmup_steps")])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ValidationError, match=field):
        TrainerConfig.model_validate(bad)


def test_deepspeed_config_bf16_fp32_master_and_reductions():
    cfg = TrainerConfig(zero_stage=3, micro_batch_size=4, grad_clip=0.5)
    ds = deepspeed_config(cfg, world_size=2, trainable=True)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    assert ds["gradient_clipping"] == 0.5 and ds["managed_gradient_accumulation"] is False
    assert "gradient_clipping" not in deepspeed_config(cfg, 2, trainable=False)


def test_schedule_warmup_then_cosine_to_floor():
    f = WarmupDecay(TrainerConfig(scheduler="cosine", warmup_steps=4, total_steps=14, min_lr_ratio=0.1))
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(99) == pytest.approx(0.1)
    linear = WarmupDecay(TrainerConfig(scheduler="linear", total_steps=10))
    assert linear(5) == pytest.approx(0.5)
    assert WarmupDecay(TrainerConfig())(1000) == 1.0


def test_check_training_messages():
    batch = random_batch(128, 4, 12, seed=0)
    batch["old_logprobs"] = torch.zeros(4, 12)
    check_training(batch, ("old_logprobs", "advantages"))
    with pytest.raises(ValueError, match="missing 'ref_logprobs'"):
        check_training(batch, ("ref_logprobs",))
    with pytest.raises(ValueError, match=r"advantages has shape \(4, 11\)"):
        check_training({**batch, "advantages": torch.zeros(4, 11)}, ())
    with pytest.raises(ValueError, match="0/1"):
        check_training({**batch, "response_mask": batch["response_mask"] * 0.5}, ())
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=12\]"):
        check_training({**batch, "lengths": torch.tensor([3, 4, 13, 5])}, ())
    with pytest.raises(ValueError, match="temperature"):
        check_training({**batch, "temperature": 0.0}, ())
    padded = {**batch, "old_logprobs": torch.full((4, 12), float("nan"))}
    padded["old_logprobs"][batch["response_mask"] > 0] = -1.0
    check_training(padded, ("old_logprobs",))             # NaN off the mask is allowed


def test_row_sharding():
    assert split_even(7, 2) == [slice(0, 4), slice(4, 7)]
    assert split_even(1, 2) == [slice(0, 1), slice(1, 1)]
    shards = train_shards(8, 2, 2)                       # mini-batch m stays the same rows
    assert [s.tolist() for s in shards] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ValueError, match="num_minibatches=2"):
        train_shards(6, 2, 2)


def test_metric_reduction():
    acc = MetricAccumulator()
    acc.add({"loss": torch.tensor(0.25), "pg_clipfrac": torch.tensor(0.5), "ratio_max": torch.tensor(1.5)}, 10)
    acc.add({"loss": torch.tensor(0.5), "pg_clipfrac": torch.tensor(0.0), "ratio_max": torch.tensor(1.2)}, 30)
    acc.add({"skipped": torch.ones(())}, 0)
    out = acc.result(num_steps=1)
    assert out == {"loss": 0.75, "pg_clipfrac": 0.125, "ratio_max": 1.5, "skipped_microbatches": 1.0}
