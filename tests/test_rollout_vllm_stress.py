"""The logprob contract under vLLM's scheduler features, all forced at once on one engine:
chunked prefill (a 64-token budget: every prompt over 64 tokens is prefilled in pieces, mixed
with decodes), preemption (a pool of 32 cache blocks for 24 long sequences: requests are evicted
and recomputed), and prefix caching (prompts share a 260-token prefix; vLLM's "align" state
cache resumes from cached lightning states at block boundaries). Each feature is shown to
have happened (vLLM's counters, prompt lengths) and every token is bit-identical to the
trainer forward. (Prefix caching is on by default in RolloutWorker: this is why.)
"""
from __future__ import annotations

import pytest
import torch

from rl.model.checkpoint import load_model
from tests_paths import TINY

pytestmark = pytest.mark.slow

BUDGET = 64
ENGINE = {"max_num_batched_tokens": BUDGET, "max_num_seqs": 16, "num_kv_blocks": 32,
          "enable_prefix_caching": True, "kv_cache_bytes": 64 << 20}


def shared_prefix_prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(4, 128, (260,), generator=g).tolist()
    tails = ((130, 3), (260, 20), (200, 50), (5, 10), (259, 1), (140, 60))
    return [shared[:n] + torch.randint(4, 128, (k,), generator=g).tolist() for n, k in tails]


@pytest.fixture(scope="module")
def stressed():
    from rollout.worker import RolloutWorker
    w = RolloutWorker(TINY, seed=11, temperature=1.0, engine=ENGINE)
    yield w, load_model(w.checkpoint).eval()
    w.shutdown()


@pytest.mark.parametrize("round_", [0, 1])
def test_chunked_prefill_preemption_and_prefix_caching_keep_bitwise_parity(stressed, round_):
    from rollout.parity import mismatches
    worker, model = stressed
    prompts = shared_prefix_prompts()
    assert max(len(p) for p in prompts) > 4 * BUDGET                 # chunked prefill is forced
    before = worker.engine_counters()
    batch = worker.generate(prompts, {"max_new_tokens": 48, "seed": round_, "temperature": 0.8}, n=4)
    after = worker.engine_counters()
    delta = {k: after.get(k, 0) - before.get(k, 0)
             for k in ("vllm:num_preemptions", "vllm:prefix_cache_hits")}
    assert batch.num_errors == 0 and all(len(s.response_ids) == 48 for s in batch.samples)
    assert delta["vllm:num_preemptions"] > 0, f"no preemption happened: {delta}"
    assert delta["vllm:prefix_cache_hits"] > 0, f"no prefix-cache hit: {delta}"
    problems = mismatches(batch, model, 0.8)
    assert not problems, "rollout logprobs differ from the trainer forward:\n" + "\n".join(problems)
    # and sampling ignores the scheduling: sample 0 of each prompt is the reference decoder's
    from rollout.reference import generate
    expected = [g.tokens for g in generate(model, prompts, 48, temperature=0.8, seed=round_)]
    assert [s.response_ids for s in batch.samples if s.sample_index == 0] == expected
