"""rl/data.py: GSM8K / HumanEval / prompt loaders (malformed rows skipped with file and
line) and the synthetic arithmetic and coding task generators (deterministic, disjoint
splits, answers the rewards accept)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rl.data import (arithmetic_tasks, code_tasks, load_gsm8k, load_humaneval, load_prompts,
                     split_of)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gsm8k_loader_maps_rows_and_skips_malformed(tmp_path, caplog):
    path = _write(tmp_path / "g.jsonl", [
        json.dumps({"question": "2+2?", "answer": "It is 4.\n#### 4"}),
        json.dumps({"question": "Big?", "answer": "#### 1,234"}),
        "{not json",
        json.dumps({"question": "no final", "answer": "just words"}),
        json.dumps({"answer": "#### 3"}),
        json.dumps([1, 2]),
        "",
    ])
    rows = load_gsm8k(path)
    assert [r["ground_truth"] for r in rows] == ["4", "1234"]
    assert rows[0]["data_source"] == "gsm8k" and rows[0]["prompt"].startswith("2+2?")
    assert rows[0]["extra_info"]["solution"] == "It is 4.\n#### 4"
    assert [m.split(": ", 1)[0] for m in rows.skipped] == [f"{path}:3", f"{path}:4",
                                                           f"{path}:5", f"{path}:6"]
    assert "field 'question'" in rows.skipped[2]
    assert "skipped 4 malformed rows" in caplog.text
    with pytest.raises(ValueError, match=f"{path}:3"):
        load_gsm8k(path, strict=True)


def test_humaneval_loader_handles_gzip_and_bad_rows(tmp_path):
    good = {"task_id": "T/0", "prompt": "def f(x):\n", "test": "def check(c):\n    pass\n",
            "entry_point": "f"}
    path = tmp_path / "he.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(good) + "\n" + json.dumps(dict(good, entry_point="bad name")) + "\n")
    rows = load_humaneval(path)
    assert len(rows) == 1 and rows.skipped == [f"{path}:2: field 'entry_point' is not an "
                                               "identifier: 'bad name'"]
    gt = rows[0]["ground_truth"]
    assert gt["entry_point"] == "f" and gt["assert"].endswith("check(f)\n")
    assert gt["prefix"] == "def f(x):\n"


def test_prompt_loader(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "1+1=", "ground_truth": "2", "data_source": "arith"}),
        json.dumps({"prompt": "x", "ground_truth": "y", "extra_info": 3}),
        json.dumps({"prompt": "", "ground_truth": "y"})])
    rows = load_prompts(path)
    assert rows == [{"prompt": "1+1=", "ground_truth": "2", "data_source": "arith",
                     "extra_info": {}}]
    assert len(rows.skipped) == 2 and "extra_info" in rows.skipped[0]


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_real_datasets_load_cleanly():
    assert len(load_gsm8k(SHARED / "gsm8k" / "test.jsonl", strict=True)) == 1319
    assert len(load_humaneval(SHARED / "humaneval" / "HumanEval.jsonl.gz", strict=True)) == 164


def test_arithmetic_tasks_are_deterministic_and_correct():
    big = list(arithmetic_tasks(50, seed=7, digits=4))  # sampled, not enumerated
    assert big == list(arithmetic_tasks(50, seed=7, digits=4))
    assert all(t["answer"] == str(eval(t["prompt"][:-1])) for t in big)
    a = list(arithmetic_tasks(200, seed=7))
    assert a == list(arithmetic_tasks(200, seed=7))
    assert a != list(arithmetic_tasks(200, seed=8))
    for task in a:
        left, right = task["prompt"].rstrip("=").split(task["prompt"].strip("0123456789=")[0])
        assert task["prompt"].endswith("=") and task["data_source"] == "arith"
        assert task["answer"] == task["ground_truth"] == str(eval(task["prompt"][:-1]))
        assert int(left) < 100 and int(right) < 100
        assert set(task["prompt"] + task["answer"]) <= set("0123456789+-*=")


@pytest.mark.parametrize("digits, ops", [(1, "+"), (3, "*-"), (2, "+-*")])
def test_arithmetic_difficulty_settings(digits, ops):
    tasks = list(arithmetic_tasks(100, seed=1, digits=digits, ops=ops))
    for t in tasks:
        body = t["prompt"][:-1]
        op = next(c for c in body[1:] if c in "+-*")
        assert op in ops
        assert all(len(x) <= digits for x in body.split(op))


def test_arithmetic_splits_never_overlap():
    train = {t["prompt"] for seed in range(3) for t in arithmetic_tasks(3000, seed=seed)}
    test = [t["prompt"] for t in arithmetic_tasks(300, seed=0, split="test")]
    assert len(set(test)) == len(test)  # held-out problems are distinct
    assert not train & set(test)
    assert all(split_of(p) == "test" for p in test)
    small = [t["prompt"] for t in arithmetic_tasks(300, seed=0, digits=1, ops="+-",
                                                    split="test")]
    distinct = len(set(small))
    assert 5 < distinct < 60  # ~10% of the 200 one-digit problems
    assert len(set(small[:distinct])) == distinct  # all distinct before any repeats
    assert not set(small) & {t["prompt"] for t in arithmetic_tasks(5000, seed=1, digits=1,
                                                                       ops="+-")}
    with pytest.raises(ValueError, match="split"):
        list(arithmetic_tasks(1, split="valid"))
    with pytest.raises(ValueError, match="ops"):
        list(arithmetic_tasks(1, ops="/"))


def test_arithmetic_answers_score_one_with_the_math_reward():
    from rewards.math import MathReward
    reward = MathReward()
    for task in arithmetic_tasks(20, seed=3):
        assert reward(task["data_source"], task["answer"], task["ground_truth"], None)["score"] == 1
        wrong = str(int(task["answer"]) + 1)
        assert reward(task["data_source"], wrong, task["ground_truth"], None)["score"] == 0


def test_code_tasks_are_deterministic_disjoint_and_solvable():
    train = list(code_tasks(300, seed=0))
    assert train == list(code_tasks(300, seed=0))
    test = list(code_tasks(5, seed=0, split="test"))
    assert not {t["answer"] for t in train} & {t["answer"] for t in test}
    from rewards.code.reward import CodeReward
    reward = CodeReward(uid_base=64400, max_slots=4)
    for task in test[:3]:
        assert task["prompt"].endswith("def f(x):\n    return ")
        assert reward(task["data_source"], task["answer"], task["ground_truth"])["score"] == 1.0
        assert reward(task["data_source"], "x", task["ground_truth"])["score"] < 1.0
