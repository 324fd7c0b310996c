"""Reward throughput: math verifications/s and sandboxed code executions/s, as JSON.

    .venv/bin/python bench/rewards.py [--math N] [--code N] [--workers W] [--concurrency C]

Math: N simple answers (`\\boxed{k}` against k, a third of them wrong) through the batch API
and the killable worker pool, plus a LaTeX set (`\\frac{2k}{2}`) that takes the math-verify
path. Code: N trivial stdin/stdout programs, one test each, then assert-style (HumanEval
shape) programs, through the local sandbox with the configured isolation. Targets on 2 cores:
>= 200 math/s on simple answers, >= 20 code runs/s. Correctness is checked first and the
script refuses to report numbers if a check fails. The load average is printed because
these machines are shared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import build  # noqa: E402


def check_correctness(math_fn, code_fn) -> None:
    items = [{"data_source": "gsm8k", "solution_str": s, "ground_truth": g} for s, g in
             [("\\boxed{18}", "18"), ("#### 18.0", "18"), ("\\boxed{\\frac{36}{2}}", "18"),
              ("\\boxed{19}", "18"), ("\\boxed{[1,2)}", "[1, 2)")]]
    scores, _ = math_fn.score_batch(items)
    if scores != [1.0, 1.0, 1.0, 0.0, 1.0]:
        raise SystemExit(f"math correctness check failed: {scores}")
    gt = {"tests": [{"stdin": "41", "stdout": "42"}]}
    items = [{"data_source": "c", "solution_str": s, "ground_truth": gt}
             for s in ["print(int(input()) + 1)", "print(41)"]]
    scores, _ = code_fn.score_batch(items)
    if scores != [1.0, 0.0]:
        raise SystemExit(f"code correctness check failed: {scores}")


def _cpu_s() -> float:
    """CPU time of this process and of its waited-for children (the sandbox jails)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def rate(scorer, items) -> tuple[float, dict, float]:
    """(items/s wall-clock, metrics, CPU ms per item of us and our children)."""
    start, cpu = time.perf_counter(), _cpu_s()
    _, metrics = scorer.score_batch(items)
    elapsed = time.perf_counter() - start
    return len(items) / elapsed, metrics, 1000 * (_cpu_s() - cpu) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--math", type=int, default=3000)
    parser.add_argument("--code", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2, help="math worker processes")
    parser.add_argument("--concurrency", type=int, default=4, help="sandboxes at once")
    args = parser.parse_args()

    math_fn = build(["math"], concurrency=16, math={"workers": args.workers})
    code_fn = build(["code"], concurrency=2 * args.concurrency,
                    code={"concurrency": args.concurrency})
    check_correctness(math_fn, code_fn)

    simple = [{"data_source": "gsm8k", "solution_str": f"so \\boxed{{{k}}}",
               "ground_truth": str(k if k % 3 else k + 1)} for k in range(args.math)]
    latex = [{"data_source": "math", "solution_str": f"\\boxed{{\\sqrt{{{k * k}}}}}",
              "ground_truth": str(k)} for k in range(args.math // 10)]
    math_simple, m_metrics, _ = rate(math_fn, simple)
    math_latex, _, _ = rate(math_fn, latex)

    stdio_gt = {"tests": [{"stdin": "41", "stdout": "42"}]}
    trivial = [{"data_source": "c", "solution_str": "print(int(input()) + 1)",
                "ground_truth": stdio_gt} for _ in range(args.code)]
    assert_gt = {"assert": "def check(candidate):\n    assert candidate(2) == 4\n"
                           "    assert candidate(-3) == 9\n\ncheck(f)\n", "entry_point": "f"}
    asserts = [{"data_source": "c", "solution_str": "def f(x):\n    return x * x\n",
                "ground_truth": assert_gt} for _ in range(args.code // 2)]
    code_stdio, c_metrics, stdio_cpu_ms = rate(code_fn, trivial)
    code_assert, _, assert_cpu_ms = rate(code_fn, asserts)
    sandbox = code_fn.components[0].fn.sandbox

    report = {
        "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
        "math_workers": args.workers, "code_concurrency": args.concurrency,
        "math_simple_per_s": round(math_simple, 1),
        "math_latex_per_s": round(math_latex, 1),
        "math_timeouts": m_metrics["reward/math/timeouts"],
        "code_trivial_runs_per_s": round(code_stdio, 1),
        "code_assert_runs_per_s": round(code_assert, 1),
        # CPU per run (scorer + jail + program); with the host's other load it bounds what
        # an idle machine with these cores would do: cores * 1000 / cpu_ms
        "code_trivial_cpu_ms_per_run": round(stdio_cpu_ms, 1),
        "code_assert_cpu_ms_per_run": round(assert_cpu_ms, 1),
        "code_trivial_runs_per_s_cpu_bound": round(os.cpu_count() * 1000 / stdio_cpu_ms, 1),
        "code_sandbox_errors": c_metrics["reward/code/sandbox_errors"],
        "code_isolation": sandbox.isolation(),
        "targets_met": {"math_simple>=200/s": math_simple >= 200,
                        "code_trivial>=20/s": code_stdio >= 20},
    }
    math_fn.close()
    code_fn.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
