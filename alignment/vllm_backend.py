"""Generation side of `lockstep mismatch --backend vllm`: sample with our model inside vLLM.

`generate_vllm` starts a `rollout.worker.RolloutWorker` (vLLM engine + the lockstep plugin),
samples `samples` completions per prompt and returns, in prompt-major order (the samples
of prompt 0, then of prompt 1, ...), `(prompt_ids, response_ids, response_logprobs fp32)`.
The recompute and the metrics are alignment.mismatch's.

Engine settings come from `engine_kwargs`, over the JSON object in the environment variable
`LOCKSTEP_VLLM_ENGINE` (so the CLI can force configurations without new flags), e.g.

    LOCKSTEP_VLLM_ENGINE='{"max_num_batched_tokens": 64, "max_num_seqs": 16}'   # chunked prefill
    LOCKSTEP_VLLM_ENGINE='{"num_kv_blocks": 40, "max_num_seqs": 32}'            # preemption
    LOCKSTEP_VLLM_ENGINE='{"enable_prefix_caching": false}'
"""
from __future__ import annotations

import json
import os

ENV_ENGINE = "LOCKSTEP_VLLM_ENGINE"


def engine_kwargs_from_env() -> dict:
    raw = os.environ.get(ENV_ENGINE, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{ENV_ENGINE}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{ENV_ENGINE}: expected a JSON object of vLLM engine options")
    return value


def generate_vllm(model_path_or_config, prompts: list[list[int]], max_new_tokens: int, samples: int,
                  temperature: float, seed: int, kernels: str = "lockstep", engine_kwargs: dict | None = None,
                  trace: str | None = None) -> list[tuple[list[int], list[int], list[float]]]:
    """A config JSON gets the random weights `torch.manual_seed(seed); load_model(config)` gives,
    the same the recompute side builds. `trace`: record the engine's forwards there
    (rollout.engine_trace; prefix caching is turned off for a traced run, since its state copies
    happen outside the forwards a replay re-runs)."""
    from rollout.worker import RolloutWorker   # lazy: only this backend needs vLLM

    engine = {**engine_kwargs_from_env(), **(engine_kwargs or {})}
    if trace is not None:
        engine["enable_prefix_caching"] = False
    worker = RolloutWorker(model_path_or_config, kernels=kernels, temperature=temperature,
                           engine=engine, seed=seed)
    try:
        if trace is not None:
            worker.trace_engine(trace)
        batch = worker.generate(prompts, {"max_new_tokens": max_new_tokens, "seed": seed,
                                          "temperature": temperature}, n=samples)
    finally:
        worker.shutdown()
    failed = [s for s in batch.samples if s.error is not None]
    if failed:
        raise ValueError(f"vLLM rejected prompt {failed[0].prompt_index}: {failed[0].error}")
    return [(s.prompt_ids, s.response_ids, s.response_logprobs.tolist()) for s in batch.samples]
