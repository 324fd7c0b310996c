"""The `math` reward: answer extraction, number decisions, math-verify equivalence, the
killable worker pool, adversarial inputs, and the GSM8K acceptance check."""
from __future__ import annotations

import os
import time
from fractions import Fraction
from pathlib import Path

import pytest

from rewards.answer import extract_answer, gold_answer, last_boxed
from rewards.batch import RewardFn, Component
from rewards.math import MathReward
from rewards.numbers import parse_number
from rewards.procpool import ProcessPool

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
TIMEOUT_S = 1.0  # for the adversarial inputs; correctness tests allow 5 s on a busy host


@pytest.fixture(scope="module")
def math_reward():
    return MathReward(timeout_s=5.0)


def score(reward, completion, gold, data_source="gsm8k", extra_info=None):
    return reward(data_source, completion, gold, extra_info)["score"]


@pytest.mark.parametrize("text, want", [
    ("so \\boxed{18}.", "18"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("first \\boxed{7} then truncated \\boxed{\\frac{1", "7"),
    ("\\boxed 5 apples", "5"),
    ("\\fbox{3}", "3"),
    ("no box", None),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


@pytest.mark.parametrize("text, pattern, want", [
    ("Natalia sold 48\n#### 72", None, "72"),
    ("#### 1\nlater #### 2\n", None, "2"),
    ("\\boxed{3} and #### 4", None, "3"),
    ("The answer is 42.", r"answer is (\-?[\d\.]+)", "42."),
    ("The answer is 42.", None, None),
    ("  19\n", "whole", "19"),
    ("\\boxed{3}", "whole", "\\boxed{3}"),
])
def test_extract_answer(text, pattern, want):
    assert extract_answer(text, pattern) == want


def test_gold_answer_forms():
    assert gold_answer("He pays 3*6=18\n#### 18") == "18"
    assert gold_answer(18) == "18"
    assert gold_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    with pytest.raises(ValueError, match="ground_truth"):
        gold_answer({"x": 1})


@pytest.mark.parametrize("text, want", [
    ("18", 18), ("18.0", 18), ("$18", 18), ("\\$18", 18), ("18%", 18), ("18\\%", 18),
    ("1,000", 1000), ("1{,}000", 1000), ("1.8e1", 18), ("36/2", 18), ("\\frac{36}{2}", 18),
    ("-\\frac{1}{2}", Fraction(-1, 2)), (".5", Fraction(1, 2)), ("18.", 18),
    ("$18.00$", 18), ("\\text{18}", 18), ("-$5", -5),
    ("18 apples", None), ("1,00", None), ("x", None), ("", None), ("1e400", None),
    ("\\frac{1}{0}", None), ("1" * 100, None),
])
def test_parse_number(text, want):
    assert parse_number(text) == want


# Decisions (rewards/README.md): $ and % are units, dropped; 18% is not 0.18.
@pytest.mark.parametrize("pred", ["18", "18.0", "18.00", "$18", "\\$18", "18%", "18\\%",
                                  "1.8e1", "\\frac{36}{2}", "18\\text{ dollars}", "1.8\\times 10^{1}"])
def test_equivalent_forms_of_18(math_reward, pred):
    assert score(math_reward, f"so \\boxed{{{pred}}}", "18") == 1.0


@pytest.mark.parametrize("pred", ["19", "0.18", "180", "-18", "18.1", "1.8"])
def test_wrong_numbers_score_zero(math_reward, pred):
    assert score(math_reward, f"\\boxed{{{pred}}}", "18") == 0.0


def test_percent_is_a_unit_not_a_scale(math_reward):
    assert score(math_reward, "\\boxed{18\\%}", "0.18") == 0.0
    assert score(math_reward, "\\boxed{18\\%}", "18\\%") == 1.0


@pytest.mark.parametrize("gold, pred, want", [
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac{1}{2}", "1/2", 1.0),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", 1.0),
    ("x^2+2x+1", "(x+1)^2", 1.0),
    ("x^2+2x+1", "(x+1)^3", 0.0),
    ("[1,2)", "[1, 2)", 1.0),
    ("[1,2)", "(1,2)", 0.0),
    ("\\{1,2\\}", "\\{2,1\\}", 1.0),
    ("3", "x=3", 1.0),
    ("\\pi", "3.14159265", 1.0),
    ("\\pi", "3.14", 0.0),
])
def test_math_verify_equivalence(math_reward, gold, pred, want):
    assert score(math_reward, f"The answer is \\boxed{{{pred}}}.", gold) == want


def test_arith_answers_are_the_whole_completion(math_reward):
    assert score(math_reward, "19", "19", data_source="arith") == 1.0
    assert score(math_reward, " 19\n", "19", data_source="arith") == 1.0
    assert score(math_reward, "-4", "-4", data_source="arith") == 1.0
    assert score(math_reward, "19 19", "19", data_source="arith") == 0.0
    assert score(math_reward, "191", "19", data_source="arith") == 0.0
    # other data sources need a box or ####; extra_info can ask for the whole completion
    assert score(math_reward, "19", "19") == 0.0
    assert score(math_reward, "19", "19", extra_info={"answer_pattern": "whole"}) == 1.0


def test_no_answer_and_parse_errors_are_counted(math_reward):
    assert math_reward("gsm8k", "I don't know", "18", None)["no_answer"] == 1
    res = math_reward("gsm8k", "\\boxed{\\frac{1}{}}", "18", None)
    assert res["score"] == 0.0 and res["parse_errors"] == 1


def test_bad_answer_pattern_fails_at_construction():
    with pytest.raises(ValueError, match="answer_pattern"):
        MathReward(answer_pattern="(unclosed")


ADVERSARIAL = {
    "tower": "\\boxed{9^{9^{9^{9}}}}",
    "factorial_tower": "\\boxed{(10^{10^{10}})!}",
    "nested_frac": "\\boxed{" + "\\frac{1}{" * 80 + "2" + "}" * 80 + "}",
    "nested_sqrt": "\\boxed{" + "\\sqrt{" * 120 + "2" + "}" * 120 + "}",
    "nested_parens": "\\boxed{" + "(" * 400 + "1" + ")" * 400 + "}",
    "megabyte_digits": "\\boxed{" + "7" * 1_000_000 + "}",
    "megabyte_digits_bare": "7" * 1_000_000,
    "megabyte_braces": "\\boxed{" + "{" * 500_000 + "}" * 500_000 + "}",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_return_in_time_and_score_zero(name):
    math_reward = MathReward(timeout_s=TIMEOUT_S)  # shares the module's worker pool
    start = time.monotonic()
    res = math_reward("arith" if name.endswith("bare") else "gsm8k", ADVERSARIAL[name], "18", None)
    elapsed = time.monotonic() - start
    assert res["score"] == 0.0
    assert elapsed < TIMEOUT_S + 1.0, f"{name} took {elapsed:.2f}s"


def test_timeouts_and_parse_errors_reach_batch_metrics():
    math_reward = MathReward(timeout_s=TIMEOUT_S)
    scorer = RewardFn([Component("math", 1.0, math_reward, math_reward.count_metrics)],
                      concurrency=4)
    items = [{"data_source": "gsm8k", "solution_str": s, "ground_truth": "18"} for s in
             ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{1}{}}", "#### 18", "nothing"]]
    scores, metrics = scorer.score_batch(items)
    scorer.close()
    assert scores == [0.0, 0.0, 1.0, 0.0]
    assert metrics["reward/math/timeouts"] == 1
    assert metrics["reward/math/parse_errors"] == 1
    assert metrics["reward/math/no_answer"] == 1
    assert metrics["reward/math/mean"] == 0.25


def test_pool_replaces_a_stuck_worker_and_keeps_working():
    pool = ProcessPool(1, memory_mb=512)
    try:
        start = time.monotonic()
        assert pool.call("time:sleep", (30,), 0.5) == ("timeout", None)
        assert time.monotonic() - start < 1.5
        assert pool.num_replaced == 1
        assert pool.call("math:factorial", (5,), 5) == ("ok", 120)
        status, message = pool.call("math:factorial", (-1,), 5)
        assert status == "error" and "ValueError" in message
    finally:
        pool.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop applies when running as root")
def test_pool_workers_are_unprivileged_and_offline():
    pool = ProcessPool(1, memory_mb=512)
    try:
        assert pool.call("os:getuid", (), 5) == ("ok", 65534)
        status, _ = pool.call("socket:create_connection", (("1.1.1.1", 53), 1), 5)
        assert status == "error"
        assert pool.call("socket:if_nameindex", (), 5)[1] == [(1, "lo")]
    finally:
        pool.close()


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="needs ../shared/data/gsm8k")
def test_gsm8k_gold_in_many_forms_scores_one_and_wrong_scores_zero(math_reward):
    from rl.data import load_gsm8k
    rows = load_gsm8k(GSM8K_TEST)
    assert len(rows) == 1319 and not rows.skipped
    items, want = [], []
    for row in rows:
        g = row["ground_truth"]
        n = int(g)
        forms = [f"#### {g}", f"The answer is \\boxed{{{g}}}.", f"\\boxed{{{g}.0}}",
                 f"\\boxed{{\\${g}}}", f"\\boxed{{{g}.00}}", f"#### {n:,}",
                 f"\\boxed{{\\frac{{{2 * n}}}{{2}}}}", f"\\boxed{{{g} \\text{{ dollars}}}}"]
        for text in forms:
            items.append({"data_source": "gsm8k", "solution_str": text, "ground_truth": g})
            want.append(1.0)
        items.append({"data_source": "gsm8k", "solution_str": f"#### {n + 1}",
                      "ground_truth": row["extra_info"]["solution"]})
        want.append(0.0)
    scorer = RewardFn([Component("math", 1.0, math_reward, math_reward.count_metrics)],
                      concurrency=8)
    scores, metrics = scorer.score_batch(items)
    scorer.close()
    wrong = [(items[i]["solution_str"], items[i]["ground_truth"]) for i in range(len(items))
             if scores[i] != want[i]]
    assert not wrong, f"{len(wrong)} mis-scored, e.g. {wrong[:5]}"
    assert metrics["reward/math/timeouts"] == 0 and metrics["reward/math/errors"] == 0
