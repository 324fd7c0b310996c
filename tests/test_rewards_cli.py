"""`lockstep rewards list|check` through the real console entry (rl/cli.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lockstep(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "rl.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_list_shows_builtins():
    out = lockstep("rewards", "list")
    assert out.returncode == 0, out.stderr
    for name in ("math", "code", "format", "length"):
        assert name in out.stdout


def test_check_math_file_with_malformed_rows(tmp_path):
    rows = [{"solution_str": "#### 18", "ground_truth": "18"},
            {"response": "\\boxed{3}", "ground_truth": "4", "data_source": "x"},
            {"solution_str": "19", "ground_truth": "19", "data_source": "arith"}]
    lines = [json.dumps(r) for r in rows] + ["not json", json.dumps({"ground_truth": 1}),
                                             json.dumps({"solution_str": "1"})]
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = lockstep("rewards", "check", "math", "--data", str(data), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["rows"] == 3 and summary["skipped"] == 3
    assert summary["mean"] == summary["pass_fraction"] == 2 / 3
    assert summary["metrics"]["reward/math/timeouts"] == 0
    assert f"{data}:4: not JSON" in out.stderr
    assert f"{data}:5: missing string field 'solution_str'" in out.stderr
    assert f"{data}:6: missing field 'ground_truth'" in out.stderr


def test_check_code_reports_sandbox_isolation(tmp_path):
    gt = {"tests": [{"stdin": "2", "stdout": "4"}]}
    data = tmp_path / "code.jsonl"
    data.write_text("\n".join(json.dumps({"solution_str": s, "ground_truth": gt}) for s in
                              ["print(int(input()) * 2)", "print(5)"]) + "\n")
    out = lockstep("rewards", "check", "code", "--data", str(data))
    assert out.returncode == 0, out.stderr
    assert "mean               0.5" in out.stdout
    assert "'network': 'netns'" in out.stdout


def test_check_errors_exit_2(tmp_path):
    out = lockstep("rewards", "check", "nonexistent_reward", "--data", "x.jsonl")
    assert out.returncode == 2 and "nonexistent_reward" in out.stderr
    out = lockstep("rewards", "check", "math", "--data", str(tmp_path / "missing.jsonl"))
    assert out.returncode == 2 and "--data" in out.stderr
    out = lockstep("rewards", "check", "math", "--data", "x", "--kwargs", "[1]")
    assert out.returncode == 2 and "--kwargs" in out.stderr
