"""TrainerWorker in-process (world size 1) on the tiny model: logprob parity across micro-batch
sizes and ZeRO stages, the PPO step, bad input, skipped steps, checkpoints, critic, reference."""
import json
import shutil

import pytest
import torch

from rl.model.checkpoint import load_model
from bits import assert_bits_equal
from tests_paths import TINY
from trainer.group import free_port
from trainer.synthetic import random_batch
from trainer.worker import TrainerWorker

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {"micro_batch_size": 3, "lr": 1e-3, "num_threads": 1, "seed": 0}




def make(role="actor", algo=None, **cfg):
    return TrainerWorker(role, str(TINY), {**BASE, **cfg}, algo or {"name": "grpo"}, 0, 1,
                         "127.0.0.1", free_port())


@pytest.fixture(scope="module")
def stage_workers():
    cache = {}

    def get(stage):
        if stage not in cache:
            cache[stage] = make(zero_stage=stage)
        return cache[stage]
    return get


def rl_batch(worker, rows=8, max_len=24, seed=0):
    batch = random_batch(worker.model_config.vocab_size, rows, max_len, seed=seed)
    batch["old_logprobs"] = worker.forward_logprobs(batch)
    return batch


def weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_forward_logprobs_bitwise_across_micro_batch_sizes_and_zero_stages(stage_workers):
    batch = random_batch(128, 8, 24, seed=1)
    weights = stage_workers(1).get_weights()
    model = load_model(TINY, torch.bfloat16)
    model.load_state_dict(weights)
    expected = model.sequence_logprobs(batch["input_ids"], batch["lengths"])
    for stage in (1, 2, 3):
        worker = stage_workers(stage)
        assert weights_equal(worker.get_weights(), weights), f"zero {stage}: different initial weights"
        for mbs in (1, 3, 8):
            worker.cfg = worker.cfg.model_copy(update={"forward_micro_batch_size": mbs})
            assert_bits_equal(worker.forward_logprobs(batch), expected, f"zero {stage}, micro-batch {mbs}")


def test_get_weights_hf_names_bf16_full(stage_workers):
    weights = stage_workers(3).get_weights()
    model = load_model(TINY, torch.bfloat16)
    assert set(weights) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert weights[key].shape == tensor.shape, key
        assert weights[key].dtype == tensor.dtype, key


def test_train_step_pi_old_from_rollout_is_exact(stage_workers):
    worker = stage_workers(2)
    batch = rl_batch(worker)
    before = worker.get_weights()
    metrics = worker.train_step(batch)
    # the first forward ran at the rollout's weights: ratio exactly 1, pre-update logprobs = rollout
    assert metrics["pre_update_rows"].all()
    assert_bits_equal(metrics["pre_update_logprobs"], batch["old_logprobs"], "pre-update logprobs")
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1.0 and metrics["ppo_kl"] == 0.0
    assert metrics["num_steps"] == 1 and metrics["skipped_steps"] == 0
    assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(1e-3)
    assert not weights_equal(worker.get_weights(), before)


def test_recompute_old_logprobs_minibatches_and_epochs():
    worker = make(algo={"name": "grpo", "old_logprobs": "recompute", "num_minibatches": 2,
                        "ppo_epochs": 2, "entropy_coef": 0.01}, zero_stage=1)
    batch = rl_batch(worker)
    expected = batch["old_logprobs"].clone()
    batch["old_logprobs"] = expected + 0.01 * batch["response_mask"]     # "rollout" drifted a bit
    metrics = worker.train_step(batch)
    assert metrics["num_steps"] == 4 and metrics["skipped_steps"] == 0
    assert_bits_equal(metrics["pre_update_logprobs"], expected, "recomputed pi_old")
    assert "entropy" in metrics and metrics["entropy"] > 0


def test_bad_input_raises_and_leaves_weights(stage_workers):
    worker = stage_workers(1)
    good = rl_batch(worker)
    before = worker.get_weights()
    no_tokens = {**good, "response_mask": torch.zeros_like(good["response_mask"])}
    with pytest.raises(ValueError, match="zero response tokens"):
        worker.train_step(no_tokens)
    nan_adv = {**good, "advantages": good["advantages"].clone()}
    nan_adv["advantages"][2, 10] = float("nan")        # as NaN rewards would produce
    with pytest.raises(ValueError, match="advantages holds 1 non-finite"):
        worker.train_step(nan_adv)
    first_token = {**good, "response_mask": good["response_mask"].clone()}
    first_token["response_mask"][0, 0] = 1.0
    with pytest.raises(ValueError, match="has no logprob"):
        worker.train_step(first_token)
    missing = {k: v for k, v in good.items() if k != "advantages"}
    with pytest.raises(ValueError, match="missing 'advantages'"):
        worker.train_step(missing)
    assert weights_equal(worker.get_weights(), before)


def test_all_masked_micro_batch_is_a_counted_skip(stage_workers):
    worker = stage_workers(2)
    batch = rl_batch(worker)
    batch["response_mask"][3:6] = 0.0                   # micro-batch 2 of 3 has no response token
    batch["advantages"] = batch["advantages"] * batch["response_mask"]
    metrics = worker.train_step(batch)
    assert metrics["skipped_microbatches"] == 1 and metrics["skipped_steps"] == 0
    assert all(torch.isfinite(w.float()).all() for w in worker.get_weights().values())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_non_finite_loss_skips_the_step(stage_workers, stage, monkeypatch):
    worker = stage_workers(stage)
    batch = rl_batch(worker)
    before, steps_before = worker.get_weights(), worker.engine.skipped_steps
    forward = type(worker.objective).forward

    def poisoned(self, engine, mb):
        out, entropy = forward(self, engine, mb)
        return out * float("nan"), entropy
    monkeypatch.setattr(type(worker.objective), "forward", poisoned)
    metrics = worker.train_step(batch)
    monkeypatch.undo()
    assert metrics["skipped_steps"] == 1 and "non-finite" in metrics["failure"]
    assert worker.engine.skipped_steps == steps_before + 1
    assert weights_equal(worker.get_weights(), before), "a skipped step must not touch the weights"
    assert worker.train_step(rl_batch(worker))["skipped_steps"] == 0   # and training goes on


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_checkpoint_resume_is_bitwise(tmp_path, stage):
    cfg = {"zero_stage": stage, "scheduler": "cosine", "warmup_steps": 1, "total_steps": 10,
           "weight_decay": 0.01}
    first = make(**cfg)
    batches = [rl_batch(first, seed=s) for s in (0, 1)]
    first.train_step(batches[0])
    path = tmp_path / "ckpt"
    (tmp_path / ".ckpt.tmp").mkdir()                    # a stale staging dir from a crash
    first.save(str(path))
    first.save(str(path))                               # overwriting is atomic too
    saved = first.get_weights()
    batches[1]["old_logprobs"] = first.forward_logprobs(batches[1])
    uninterrupted = first.train_step(batches[1])

    resumed = make(**cfg)
    state = resumed.load(str(path))
    assert state["steps"] == 1 and weights_equal(resumed.get_weights(), saved)
    hf = load_model(path, torch.bfloat16)                # the directory is an HF checkpoint too
    assert weights_equal(hf.state_dict(), saved)
    again = resumed.train_step(batches[1])
    assert again["loss"] == uninterrupted["loss"] and again["lr"] == uninterrupted["lr"]
    assert weights_equal(resumed.get_weights(), first.get_weights()), "resume changed the next step"


def test_load_refuses_other_architecture(tmp_path, stage_workers):
    worker = stage_workers(1)
    path = tmp_path / "ckpt"
    worker.save(str(path))
    before = worker.get_weights()
    other = tmp_path / "other"
    shutil.copytree(path, other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] = 64
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architecture mismatch in hidden_size"):
        worker.load(str(other))
    from safetensors.torch import load_file, save_file
    shutil.rmtree(other)
    shutil.copytree(path, other)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :64].contiguous()
    save_file(tensors, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="'lm_head.weight' has shape"):
        worker.load(str(other))
    shutil.rmtree(other / "trainer_state")
    with pytest.raises(ValueError, match="no trainer_state"):
        worker.load(str(other))
    assert weights_equal(worker.get_weights(), before)


def test_critic_values_and_value_loss():
    critic = make(role="critic", algo={"name": "ppo", "value_clip": None}, zero_stage=3, lr=1e-4)
    batch = random_batch(128, 6, 16, seed=2)
    values = critic.forward_values(batch)
    valid = torch.arange(16)[None] < batch["lengths"][:, None]
    assert (values[:, 0] == 0).all() and (values[~valid] == 0).all()
    assert (values[:, 1:][valid[:, 1:]] != 0).all()
    batch.update(values=values, returns=torch.where(batch["response_mask"] > 0, 1.0, 0.0))
    losses = [critic.train_step(batch)["vf_loss"] for _ in range(4)]
    assert losses[-1] < losses[0]
    assert "value_head.weight" in critic.get_weights()
    with pytest.raises(ValueError, match="forward_values"):
        critic.forward_logprobs(batch)


@pytest.mark.parametrize("ref_stage", [1, 3])
def test_reference_is_frozen_and_matches_actor(stage_workers, ref_stage):
    reference = make(role="reference", zero_stage=ref_stage)
    batch = random_batch(128, 5, 16, seed=4)
    actor = make(zero_stage=1)
    assert_bits_equal(reference.forward_logprobs(batch), actor.forward_logprobs(batch), "reference vs actor")
    with pytest.raises(ValueError, match="frozen"):
        reference.train_step({**batch, "old_logprobs": torch.zeros(5, 16)})
