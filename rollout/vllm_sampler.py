"""vLLM logits processor that makes every seeded request sample with rollout.sampling.

Registered per engine (`logits_processors` engine arg, set by RolloutWorker). For each request
whose SamplingParams.extra_args carry `lockstep_seed` and whose temperature is > 0, `apply`
draws the token with `rollout.sampling.sample` at position len(output so far) and leaves a
one-hot row (0 at that token, -inf elsewhere), which vLLM's sampler then picks whatever its own
RNG does. Rows arrive as rl.kernels' logprobs at the request temperature (the model's
`compute_logits`), after vLLM's min_tokens masking; the logprob reported back is captured
before any processor runs. Other requests pass through untouched.
"""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from rollout.sampling import SEED_KEY, sample


class SeededSampler(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        # batch row -> (seed, top_k, top_p, the request's live list of output token ids)
        self.rows: dict[int, tuple[int, int, float, list[int]]] = {}

    @classmethod
    def validate_params(cls, params) -> None:
        seed = (params.extra_args or {}).get(SEED_KEY)
        if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise ValueError(f"extra_args[{SEED_KEY!r}] must be an int in [0, 2**63), got {seed!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _row_state(params, _prompt_ids, output_ids):
        seed = (params.extra_args or {}).get(SEED_KEY)
        if seed is None or params.temperature <= 0:
            return None
        return seed, int(params.top_k or 0), float(params.top_p), output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._row_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        index = sorted(self.rows)
        state = [self.rows[i] for i in index]
        rows = torch.tensor(index, device=logits.device)
        tokens = sample(logits[rows],
                        torch.tensor([s[0] for s in state], dtype=torch.int64),
                        torch.tensor([len(s[3]) for s in state], dtype=torch.int64),
                        torch.tensor([s[1] for s in state], dtype=torch.int64),
                        torch.tensor([s[2] for s in state], dtype=torch.float64))
        logits[rows] = float("-inf")
        logits[rows, tokens.to(logits.device)] = 0.0
        return logits
