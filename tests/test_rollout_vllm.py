"""RolloutWorker on a real vLLM engine (tiny model): bitwise trainer = rollout, weight updates,
version tagging, per-prompt errors, engine death. One engine for the module (~30 s to start);
the last test restarts it. Chunked prefill / preemption / prefix caching:
test_rollout_vllm_stress.py; stock kernels: test_rollout_vllm_stock.py; Ray: test_rollout_ray.py.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from rl.model.checkpoint import load_model
from tests_paths import TINY

pytestmark = pytest.mark.slow

CHUNK = 16   # tiny's linear_chunk_size: prompt lengths straddle chunk boundaries, 40 new tokens cross 2-3 more
PROMPT_LENGTHS = (1, 15, 16, 17, 31, 33, 50, 70)


def make_prompts(lengths=PROMPT_LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (n,), generator=g).tolist() for n in lengths]


def assert_parity(batch, model, temperature=None):
    from rollout.parity import mismatches
    problems = mismatches(batch, model, temperature)
    assert not problems, "rollout logprobs differ from the trainer forward:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def worker():
    from rollout.worker import RolloutWorker
    w = RolloutWorker(TINY, seed=7, temperature=1.0,
                      engine={"enable_prefix_caching": False, "kv_cache_bytes": 128 << 20, "max_num_seqs": 64})
    yield w
    w.shutdown()


@pytest.fixture(scope="module")
def model_v0(worker):
    return load_model(worker.checkpoint).eval()


@pytest.fixture(scope="module")
def weights_v1():
    torch.manual_seed(99)
    return load_model(TINY).eval()


def test_generation_is_bitwise_equal_to_trainer_forward(worker, model_v0):
    batch = worker.generate(make_prompts(), {"max_new_tokens": 40, "seed": 1}, n=2)
    assert batch.weight_version == 0 and batch.num_errors == 0
    assert [(s.prompt_index, s.sample_index) for s in batch.samples] == [(i, j) for i in range(8) for j in range(2)]
    assert all(len(s.response_ids) == 40 and s.finish_reason == "length" for s in batch.samples)
    assert all(s.response_logprobs.dtype == torch.float32 for s in batch.samples)
    assert_parity(batch, model_v0, 1.0)


def test_engine_runs_this_process_build_and_a_difference_is_refused(worker, monkeypatch):
    from rl.model import fingerprint as F
    assert worker.fingerprint() == F.fingerprint()
    # this process now "has other source" than the engine it started: the start-up check refuses
    monkeypatch.setattr(F, "code_digest", lambda: "0" * 64)
    with pytest.raises(F.BuildMismatch, match="its vLLM engine process vs this RolloutWorker process: code: "):
        worker._check_engine_build()


def test_engine_trace_replays_bit_identically_and_names_a_differing_step(worker, model_v0, tmp_path):
    from rollout.engine_trace import replay, step_files
    worker.trace_engine(tmp_path)
    worker.generate(make_prompts(), {"max_new_tokens": 12, "seed": 3}, n=2)
    worker.trace_engine(None)
    files = step_files(tmp_path)
    assert len(files) >= 12                      # one prefill step at least, then 11 decode steps
    worker.generate(make_prompts()[:2], {"max_new_tokens": 4, "seed": 3})
    assert len(step_files(tmp_path)) == len(files), "the trace kept recording after it was stopped"
    steps, difference = replay(tmp_path, model_v0)
    assert difference is None, str(difference)
    assert steps == len(files)
    # an engine step that computed anything else is found: one element of step 3's output
    record = torch.load(files[2])
    row = int(record["metas"][0]["query_start_loc"][1])          # the second request's first token
    value = record["hidden"][row, 0]
    record["hidden"][row, 0] = 1.0 if value == 0 else -value
    torch.save(record, files[2])
    steps, difference = replay(tmp_path, model_v0)
    assert (steps, difference.step, difference.requests, difference.what) == (3, 3, [1], "hidden states")


def reference_tokens(model, prompts, max_new_tokens, temperature, seed):
    from rollout.reference import generate
    return [g.tokens for g in generate(model, prompts, max_new_tokens, temperature=temperature, seed=seed)]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_seeded_samples_equal_the_reference_decoder_and_repeat(worker, model_v0, temperature):
    """Sampling is rollout.sampling keyed by (request seed, position): vLLM draws exactly the
    reference decoder's tokens, and the same call on the same engine repeats them."""
    prompts = make_prompts(seed=5)
    sampling = {"max_new_tokens": 40, "seed": 3, "temperature": temperature}
    first = worker.generate(prompts, sampling)
    expected = reference_tokens(model_v0, prompts, 40, temperature, seed=3)
    assert [s.response_ids for s in first.samples] == expected
    assert [s.response_ids for s in worker.generate(prompts, sampling).samples] == expected
    # prompt_seeds pins each prompt's seeds whatever its index in the call (RolloutPool shards)
    seeds = [1000 + 17 * i for i in range(len(prompts))]
    base = {"max_new_tokens": 40, "temperature": temperature}
    pinned = worker.generate(prompts, base | {"prompt_seeds": seeds})
    reordered = worker.generate(prompts[::-1], base | {"prompt_seeds": seeds[::-1]})
    assert [s.response_ids for s in reordered.samples][::-1] == [s.response_ids for s in pinned.samples]


def test_temperature_and_greedy(worker, model_v0):
    batch = worker.generate(make_prompts(seed=1), {"max_new_tokens": 24, "temperature": 0.6, "seed": 2})
    assert batch.temperature == 0.6
    assert_parity(batch, model_v0, 0.6)
    greedy = [worker.generate(make_prompts(seed=1)[:4], {"max_new_tokens": 24, "temperature": 0}) for _ in range(2)]
    assert [s.response_ids for s in greedy[0].samples] == [s.response_ids for s in greedy[1].samples]
    assert_parity(greedy[0], model_v0, 1.0)       # greedy reports logprobs at T = 1
    for s in greedy[0].samples:                   # and picks the trainer's most likely token
        with torch.no_grad():
            logits = model_v0(torch.tensor([s.prompt_ids + s.response_ids])).logits[0]
        assert logits[len(s.prompt_ids) - 1:-1].argmax(-1).tolist() == s.response_ids


def test_stop_token_ends_a_sample(worker, model_v0):
    prompts = make_prompts(seed=4)[:3]
    first = worker.generate(prompts, {"max_new_tokens": 12, "temperature": 0})    # greedy: repeatable
    stop = first.samples[0].response_ids[3]
    batch = worker.generate(prompts, {"max_new_tokens": 12, "temperature": 0, "stop_token_ids": [stop]})
    s0 = batch.samples[0]
    assert s0.finish_reason == "stop" and s0.response_ids[-1] == stop and len(s0.response_ids) <= 4
    assert s0.response_ids == first.samples[0].response_ids[:len(s0.response_ids)]
    assert_parity(batch, model_v0, 1.0)


def test_over_long_prompt_is_a_per_prompt_error(worker, model_v0):
    prompts = make_prompts()[:2] + [[5] * 600] + make_prompts(seed=5)[:1] + [[]]
    batch = worker.generate(prompts, {"max_new_tokens": 8, "seed": 0}, n=2)
    errors = {(s.prompt_index, s.sample_index): s.error for s in batch.samples if s.error}
    assert set(errors) == {(2, 0), (2, 1), (4, 0), (4, 1)}
    assert "context limit" in errors[(2, 0)] and "600" in errors[(2, 0)] and "empty" in errors[(4, 0)]
    done = [s for s in batch.samples if s.error is None]
    assert len(done) == 6 and all(len(s.response_ids) == 8 for s in done)
    assert_parity(batch, model_v0, 1.0)


def test_update_weights_then_parity_at_the_new_version(worker, model_v0, weights_v1):
    prompts = make_prompts(seed=6)
    assert worker.update_weights(1, weights_v1.state_dict()) == 1
    assert worker.weight_version == 1 and worker.health()["engine_state"]["weight_version"] == 1
    batch = worker.generate(prompts, {"max_new_tokens": 32, "seed": 3}, n=2)
    assert batch.weight_version == 1
    assert_parity(batch, weights_v1, 1.0)
    from rollout.parity import mismatches
    assert mismatches(batch, model_v0, 1.0), "the update did not change the engine's weights"
    worker.update_weights(2, model_v0.state_dict())
    batch = worker.generate(prompts, {"max_new_tokens": 32, "seed": 3})
    assert batch.weight_version == 2
    assert_parity(batch, model_v0, 1.0)


def test_incomplete_update_is_refused_before_touching_the_engine(worker, model_v0, weights_v1):
    partial = dict(weights_v1.state_dict())
    partial.pop("lm_head.weight")
    with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
        worker.update_weights(3, partial)
    assert worker.weight_version == 2 and worker.health()["weights_consistent"]
    batch = worker.generate(make_prompts()[:2], {"max_new_tokens": 8})
    assert batch.weight_version == 2
    assert_parity(batch, model_v0, 1.0)


def test_update_failing_part_way_blocks_generation_until_a_good_one(worker, model_v0, weights_v1, monkeypatch):
    """Buckets before the bad tensor are already loaded: the engine holds mixed weights, so
    the worker refuses to generate rather than report a version."""
    import rollout.weight_transfer as wt
    monkeypatch.setattr(wt, "BUCKET_BYTES", 64 << 10)
    bad = {k: v.clone() for k, v in weights_v1.state_dict().items()}
    bad["model.norm.weight"][0] = float("nan")        # sorted late: earlier buckets load first
    with pytest.raises(Exception, match="non-finite"):
        worker.update_weights(3, bad)
    assert worker.weight_version == 2 and worker.health()["weights_consistent"] is False
    with pytest.raises(RuntimeError, match="update failed part-way"):
        worker.generate(make_prompts()[:1], {"max_new_tokens": 4})
    worker.update_weights(3, model_v0.state_dict())
    batch = worker.generate(make_prompts()[:2], {"max_new_tokens": 8})
    assert batch.weight_version == 3
    assert_parity(batch, model_v0, 1.0)


def test_generation_requested_during_an_update_waits(worker, model_v0, weights_v1):
    """An update and a generation never overlap: each waits for the other; the batch is
    entirely at the version in force when it ran, and says so."""
    prompts = make_prompts(seed=7)
    events, results = [], {}

    def generate():
        results["batch"] = worker.generate(prompts, {"max_new_tokens": 48, "seed": 9}, n=2)
        events.append(("generate done", time.monotonic()))

    def update():
        worker.update_weights(4, weights_v1.state_dict())
        events.append(("update done", time.monotonic()))

    gen = threading.Thread(target=generate)
    gen.start()
    deadline = time.monotonic() + 30
    while not worker.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.01)                              # until the generation holds the engine
    upd = threading.Thread(target=update)
    upd.start()
    gen.join()
    upd.join()
    assert [name for name, _ in events] == ["generate done", "update done"]
    assert results["batch"].weight_version == 3
    assert_parity(results["batch"], model_v0, 1.0)
    after = worker.generate(prompts[:3], {"max_new_tokens": 16})
    assert after.weight_version == 4
    assert_parity(after, weights_v1, 1.0)


def test_engine_death_is_reported_and_the_worker_restarts(worker, model_v0):
    """Killed engine: health says so and why; restart brings the checkpoint back (version 0).
    Fatal error inside the engine: the error names the cause from the engine log."""
    assert worker.health()["alive"]
    pid = worker.engine_pids()[0]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker.health()["alive"] and time.monotonic() < deadline:
        time.sleep(0.2)
    health = worker.health()
    assert not health["alive"] and "SIGKILL" in health["error"], health
    from rollout.worker import EngineDead
    with pytest.raises(EngineDead, match="SIGKILL"):
        worker.generate(make_prompts()[:1], {"max_new_tokens": 4})

    health = worker.restart()
    assert health["alive"] and health["weight_version"] == 0, health
    batch = worker.generate(make_prompts(), {"max_new_tokens": 40, "seed": 1}, n=2)
    assert batch.weight_version == 0
    assert_parity(batch, model_v0, 1.0)
    assert [s.response_ids for s in batch.samples if s.sample_index == 0] == \
        reference_tokens(model_v0, make_prompts(), 40, 1.0, seed=1), "a restarted engine samples by seed"

    worker.inject_fault("lockstep test: injected fault in forward")
    with pytest.raises(EngineDead, match="injected fault in forward"):
        worker.generate(make_prompts()[:1], {"max_new_tokens": 4})
    health = worker.health()
    assert not health["alive"] and "RuntimeError: lockstep test: injected fault in forward" in health["error"], health
