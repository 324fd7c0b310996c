"""The `code` reward: run the completion's program against the tests in `ground_truth`.

compute_score-compatible: `CodeReward(...)(data_source, solution_str, ground_truth,
extra_info)` returns `{"score", "pass_rate", "timeouts", "sandbox_errors"}`. The program is
the completion's last fenced python block (rewards/code/extract.py); tests are stdin/stdout
pairs or HumanEval-style asserts (rewards/code/tests_spec.py). Execution is the local
sandbox (rewards/code/sandbox.py) or, with `backend: http`, a SandboxFusion-compatible
service (rewards/code/http_backend.py). Score: the fraction of tests passed, or 1/0 with
`score_mode: all_or_nothing`. A sandbox failure scores 0 and is counted; malformed ground
truth raises ValueError naming the field (the batch API counts it as that item's error).
"""
from __future__ import annotations

import logging
import re
from typing import Literal

from pydantic import Field

from rewards.code.compare import outputs_match
from rewards.code.extract import extract_program
from rewards.code.sandbox import Sandbox, SandboxConfig, SandboxError
from rewards.code.tests_spec import AssertTests, parse_tests

log = logging.getLogger(__name__)


class CodeConfig(SandboxConfig):
    """Settings of the `code` reward (run config section `rewards.code`): sandbox limits
    plus how to score."""

    score_mode: Literal["fraction", "all_or_nothing"] = Field(
        "fraction", description="fraction of tests passed, or 1 only if all pass")
    backend: Literal["local", "http"] = Field("local", description="local sandbox, or a "
                                              "SandboxFusion-compatible HTTP service")
    url: str | None = Field(None, description="base URL of the HTTP sandbox service")
    tolerance: float = Field(1e-6, ge=0, description="numeric tolerance comparing stdout")


def defines(program: str, name: str) -> bool:
    return re.search(rf"(?m)^(?:async\s+)?def\s+{re.escape(name)}\s*\(|^{re.escape(name)}\s*=",
                     program) is not None


class CodeReward:
    """Program-execution reward with a sandbox per call; thread-safe and bounded."""

    name = "code"
    config_section = "code"
    count_metrics = ("timeouts", "sandbox_errors")

    def __init__(self, **kwargs):
        self.cfg = CodeConfig(**kwargs)
        if self.cfg.backend == "http":
            if not self.cfg.url:
                raise ValueError("code.url is required with code.backend: http")
            from rewards.code.http_backend import HttpSandbox
            self.sandbox = HttpSandbox(self.cfg.url, self.cfg)
        else:
            self.sandbox = Sandbox(SandboxConfig(**{k: getattr(self.cfg, k)
                                                    for k in SandboxConfig.model_fields}))

    def run_tests(self, program: str, tests) -> tuple[list[bool], bool]:
        """(passed per test, any timeout)."""
        if isinstance(tests, AssertTests):
            if tests.prefix and not defines(program, tests.entry_point):
                program = tests.prefix + program
            res = self.sandbox.run_assert(program, tests.units, tests.entry_point, tests.setup)
            return res.passed, res.timed_out
        runs = self.sandbox.run_stdio(program, tests.stdins)
        passed = [not r.timed_out and not r.stdout_overflow
                  and outputs_match(r.stdout, want, self.cfg.tolerance)
                  for r, want in zip(runs, tests.stdouts, strict=True)]
        return passed, any(r.timed_out for r in runs)

    def __call__(self, data_source, solution_str, ground_truth, extra_info=None) -> dict:
        tests = parse_tests(ground_truth)
        program = extract_program(str(solution_str))
        try:
            passed, timed_out = self.run_tests(program, tests)
        except SandboxError as err:
            log.warning("code reward: sandbox failure: %s", err)
            return {"score": 0.0, "pass_rate": 0.0, "timeouts": 0, "sandbox_errors": 1}
        rate = sum(passed) / len(passed)
        score = rate if self.cfg.score_mode == "fraction" else float(all(passed))
        return {"score": score, "pass_rate": rate, "timeouts": int(timed_out),
                "sandbox_errors": 0}
