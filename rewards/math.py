"""The `math` reward: extract the final answer, decide equivalence in a killable worker.

compute_score-compatible: `MathReward(...)(data_source, solution_str, ground_truth,
extra_info)` returns `{"score": 1.0 | 0.0, "timeouts": 0|1, "parse_errors": 0|1,
"no_answer": 0|1}`; the batch API sums the last three into `reward/math/timeouts` etc.
Extraction (rewards/answer.py) happens here, cheaply; equivalence (rewards/math_equiv.py)
runs in a shared ProcessPool with a hard per-answer timeout. A timeout or parse failure
scores 0 and is counted, never raised.

The answer pattern for an item comes from, in order: `extra_info["answer_pattern"]`, the
`answer_patterns` entry for its data_source (default: `arith` -> "whole"), `answer_pattern`.
"""
from __future__ import annotations

import os
import threading

from pydantic import BaseModel, ConfigDict, Field

from rewards.answer import extract_answer, gold_answer
from rewards.procpool import ProcessPool


class MathConfig(BaseModel):
    """Settings of the `math` reward (run config section `rewards.math`)."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(5.0, gt=0, description="hard limit per verification")
    workers: int | None = Field(None, ge=1, description="worker processes; default: CPU count"
                                " (at least 2)")
    memory_mb: int = Field(2048, ge=256, description="RLIMIT_AS of each worker")
    isolate_workers: bool = Field(True, description="workers drop to uid nobody and lose "
                                  "the network when the pool runs as root")
    answer_pattern: str | None = Field(None, description="regex (group 1 = answer) tried "
                                       "after \\boxed and ####; 'whole' = entire completion")
    answer_patterns: dict[str, str] = Field(default_factory=lambda: {"arith": "whole"},
                                            description="answer pattern per data_source")
    max_answer_chars: int = Field(1000, ge=1, description="longer answers are parse errors")


_pools: dict[tuple, ProcessPool] = {}
_pools_lock = threading.Lock()


def shared_pool(workers: int, memory_mb: int, isolate: bool) -> ProcessPool:
    """One pool per setting per process: many reward instances share the workers."""
    key = (workers, memory_mb, isolate)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None or pool._closed:
            pool = _pools[key] = ProcessPool(workers, memory_mb=memory_mb,
                                             drop_privileges=isolate,
                                             preload=("rewards.math_equiv",))
        return pool


class MathReward:
    """Final-answer math reward (GSM8K `####`, MATH `\\boxed{}`, bare answers)."""

    name = "math"
    config_section = "math"
    count_metrics = ("timeouts", "parse_errors", "no_answer")

    def __init__(self, **kwargs):
        self.cfg = MathConfig(**kwargs)
        for pattern in [self.cfg.answer_pattern, *self.cfg.answer_patterns.values()]:
            if pattern and pattern != "whole":
                extract_answer("", pattern)  # invalid regexes fail here, at config load
        self._workers = self.cfg.workers or max(2, os.cpu_count() or 1)

    @property
    def pool(self) -> ProcessPool:
        return shared_pool(self._workers, self.cfg.memory_mb, self.cfg.isolate_workers)

    def _pattern(self, data_source, extra_info) -> str | None:
        if isinstance(extra_info, dict) and extra_info.get("answer_pattern"):
            return str(extra_info["answer_pattern"])
        return self.cfg.answer_patterns.get(str(data_source), self.cfg.answer_pattern)

    def __call__(self, data_source, solution_str, ground_truth, extra_info=None) -> dict:
        result = {"score": 0.0, "timeouts": 0, "parse_errors": 0, "no_answer": 0}
        gold = gold_answer(ground_truth)
        pred = extract_answer(str(solution_str), self._pattern(data_source, extra_info))
        if pred is None:
            result["no_answer"] = 1
            return result
        if len(pred) > self.cfg.max_answer_chars or len(gold) > self.cfg.max_answer_chars:
            result["parse_errors"] = 1
            return result
        status, verdict = self.pool.call("rewards.math_equiv:judge", (gold, pred),
                                         self.cfg.timeout_s)
        if status == "timeout":
            result["timeouts"] = 1
        elif status == "error" or verdict == "parse_error":
            result["parse_errors"] = 1
        elif verdict == "correct":
            result["score"] = 1.0
        return result
