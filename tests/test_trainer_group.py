"""TrainerGroup with Ray, world size 2 on CPU (gloo), against an in-process world-size-1 worker:
bitwise logprobs and gathered weights, the loss curve for the same global batches, checkpoint
resume under ZeRO-3, and a bad shard that must raise on every rank instead of hanging."""
import pytest
import torch

from tests_paths import TINY
from trainer.group import TrainerGroup, free_port
from trainer.synthetic import random_batch
from trainer.worker import TrainerWorker

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CFG = {"zero_stage": 3, "micro_batch_size": 2, "lr": 1e-3, "num_threads": 1, "seed": 0, "grad_clip": 1.0}
ALGO = {"name": "grpo", "clip_high": 0.28}
STEPS = 5




@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def group(ray_cluster):
    g = TrainerGroup("actor", str(TINY), CFG, ALGO, world_size=2, num_cpus_per_worker=1)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def single():
    return TrainerWorker("actor", str(TINY), CFG, ALGO, 0, 1, "127.0.0.1", free_port())


def batches():
    return [random_batch(128, 8, 20, seed=100 + i) for i in range(STEPS)]


def test_ws2_logprobs_and_weights_bitwise_equal_ws1(group, single):
    batch = random_batch(128, 7, 20, seed=9)           # 4 + 3 rows: uneven ZeRO-3 forwards
    assert torch.equal(group.forward_logprobs(batch), single.forward_logprobs(batch))
    ws2, ws1 = group.get_weights(), single.get_weights()
    assert ws2.keys() == ws1.keys() and all(torch.equal(ws2[k], ws1[k]) for k in ws1)


def test_ws2_loss_curve_bitwise_equals_ws1(group, single):
    """Same global batches, same micro-batches (the group keeps mini-batches whole): the loss
    curve and the weights after STEPS steps are bit-identical. Why it holds: each micro-batch's
    gradient is bf16 (the parameters' dtype) and DeepSpeed sums them in fp32 (accumulation and
    cross-rank reduction, `grad_reduce_dtype: fp32`); a few bf16 numbers add exactly in fp32, so
    the order (a+b)+(c+d) vs ((a+b)+c)+d does not matter. Not guaranteed when the summands
    span more than ~16 binary orders of magnitude, or with bf16 reductions or fp32 training."""
    curves = {}
    for name, trainer in (("ws1", single), ("ws2", group)):
        curve = []
        for batch in batches():
            batch["old_logprobs"] = trainer.forward_logprobs(batch)   # the rollout at its weights
            curve.append(trainer.train_step(batch))
        curves[name] = curve
    for step, (m1, m2) in enumerate(zip(curves["ws1"], curves["ws2"])):
        assert m1["loss"] == m2["loss"], f"step {step}: loss {m1['loss']!r} (ws1) vs {m2['loss']!r} (ws2)"
        # the norm is reduced over partitions in another order: equal to rounding only
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-6)
    w1, w2 = single.get_weights(), group.get_weights()
    differing = {k: int((w1[k] != w2[k]).sum()) for k in w1 if not torch.equal(w1[k], w2[k])}
    assert not differing, f"weights differ after {STEPS} steps: {differing}"


def test_ws2_resume_is_bitwise(group, tmp_path):
    first, second = random_batch(128, 8, 20, seed=1), random_batch(128, 8, 20, seed=2)
    first["old_logprobs"] = group.forward_logprobs(first)
    group.train_step(first)
    group.save(str(tmp_path / "ckpt"))
    second["old_logprobs"] = group.forward_logprobs(second)
    expected = group.train_step(second)
    after = group.get_weights()
    group.load(str(tmp_path / "ckpt"))
    again = group.train_step(second)
    assert again["loss"] == expected["loss"]
    weights = group.get_weights()
    assert all(torch.equal(weights[k], after[k]) for k in after)


def test_ws2_bad_shard_raises_on_every_rank(group):
    import ray
    batch = random_batch(128, 8, 20, seed=5)
    batch["old_logprobs"] = group.forward_logprobs(batch)
    before = group.get_weights()
    batch["advantages"][6, 12] = float("nan")         # only rank 1's shard is bad
    batch["response_mask"][6, 12] = 1.0
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        group.train_step(batch)
    assert "advantages holds 1 non-finite" in str(info.value)     # rank 0 reports rank 1's error
    # both ranks returned (no rank left in a collective): the group still works
    batch["advantages"][6, 12] = 0.0
    batch["response_mask"][4:8] = 0.0                 # rank 1 has no response token: a skip
    metrics = group.train_step(batch)
    assert metrics["skipped_microbatches"] == 2 and metrics["skipped_steps"] == 0
    assert any(not torch.equal(v, before[k]) for k, v in group.get_weights().items())


def test_process_launcher_matches_ws1_and_fails_loudly():
    """`launcher="process"` (hosts without Ray: bench/multi_gpu.py on the GPU machines) runs the
    same TrainerWorker ranks as local processes: world size 2 = world size 1 bit for bit, a rank's
    error reaches the caller after both ranks have answered, a dead rank process is named, and
    shutdown ends the live ranks cleanly (exit code 0)."""
    from trainer.ranks import RankFailed
    from bits import assert_bits_equal

    single = TrainerGroup("actor", str(TINY), CFG, ALGO, world_size=1, launcher="process")
    pair = TrainerGroup("actor", str(TINY), CFG, ALGO, world_size=2, launcher="process")
    try:
        batch = random_batch(128, 8, 20, seed=3)
        logprobs = single.forward_logprobs(batch)
        assert_bits_equal(pair.forward_logprobs(batch), logprobs, "ws2 vs ws1 logprobs")
        batch["old_logprobs"] = logprobs
        assert pair.train_step(batch)["loss"] == single.train_step(batch)["loss"]
        w1, w2 = single.get_weights(), pair.get_weights()
        assert w1.keys() == w2.keys()
        for name in w1:
            assert_bits_equal(w2[name], w1[name], f"weights {name} after a step")
        bad = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        bad["advantages"][6, 12] = float("nan")          # only rank 1's shard is bad
        bad["response_mask"][6, 12] = 1.0
        with pytest.raises(RankFailed, match="advantages holds 1 non-finite"):
            pair.train_step(bad)
        assert_bits_equal(pair.forward_logprobs(batch), single.forward_logprobs(batch), "after the error")
        single.ranks.procs[0].kill()
        with pytest.raises(RankFailed, match="rank 0 process died"):
            single.forward_logprobs(batch)
        procs = list(pair.ranks.procs)
        pair.shutdown()               # each rank leaves the process group, then exits
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        single.shutdown()
        pair.shutdown()
