"""`lockstep mismatch --backend vllm --kernels stock` reports drift: with plain torch ops in
the engine (and in the trainer recompute) the diagnostic sees prefill/decode and batch-shape
differences, so it can tell the two kernel sets apart. (The lockstep-kernel run of the same
diagnostic reports 0.0 / 1.0: tests/test_rollout_vllm.py and the README's acceptance run.)"""
from __future__ import annotations

import pytest

from rl import kernels as K
from tests_paths import TINY

pytestmark = pytest.mark.slow


def test_stock_kernels_show_drift_through_the_vllm_backend():
    from alignment.mismatch import run_mismatch
    try:
        result = run_mismatch(str(TINY), backend="vllm", num_prompts=6, max_new_tokens=24, samples=2,
                              temperature=1.0, seed=0, kernels="stock", micro_batch_size=4,
                              engine_kwargs={"kv_cache_bytes": 64 << 20, "max_num_seqs": 16})
    finally:
        K.set_kernels("lockstep")        # run_mismatch sets the mode for this process
    assert result["backend"] == "vllm" and result["kernels"] == "stock"
    assert result["max_abs_logprob_diff"] > 0.0 and result["frac_bitwise_equal"] < 1.0, result
