"""The `code` reward: program extraction, output comparison, ground-truth parsing, stdio and
assert tests in the local sandbox, score modes, the HTTP backend, and HumanEval acceptance
(all 164 canonical solutions score 1.0, each with its body replaced by `pass` scores 0.0)."""
from __future__ import annotations

import gzip
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rewards.code.compare import outputs_match
from rewards.code.extract import extract_program
from rewards.code.reward import CodeReward
from rewards.code.sandbox import Sandbox, SandboxConfig
from rewards.code.tests_spec import AssertTests, StdioTests, parse_tests

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / \
    "HumanEval.jsonl.gz"
ADD = {"tests": [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "10 -4", "stdout": "6"},
                 {"stdin": "0 0", "stdout": "0"}]}
ADD_PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


@pytest.fixture(scope="module")
def code_reward():
    return CodeReward(timeout_s=5.0, concurrency=4, uid_base=64000, max_slots=16)


@pytest.mark.parametrize("text, want", [
    ("Here:\n```python\nprint(1)\n```\nand\n```python\nprint(2)\n```\n", "print(2)\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```\nplain\n```\nthen ```python inline``` text", "plain\n"),
    ("```python\nprint(1)\n```\n```text\noutput\n```", "print(1)\n"),
    ("```python\ntruncated = 1", "truncated = 1"),
    ("print(3)", "print(3)"),
])
def test_extract_program(text, want):
    assert extract_program(text) == want


@pytest.mark.parametrize("actual, expected, want", [
    ("3\n", "3", True), ("  3  \n\n", "3\n", True), ("1 2\n3\n", "1 2\n3", True),
    ("0.3333333", "0.33333333", True), ("10", "10.0", True), ("1e-7", "0", True),
    ("3", "4", False), ("1 2", "1  2 3", False), ("a\nb", "a", False), ("", "0", False),
    ("0.33", "0.34", False), ("nan", "nan", True), ("inf", "1e308", False),
])
def test_outputs_match(actual, expected, want):
    assert outputs_match(actual, expected) is want


def test_parse_tests_forms_and_errors():
    assert isinstance(parse_tests(ADD), StdioTests)
    assert isinstance(parse_tests(json.dumps(ADD)), StdioTests)
    t = parse_tests({"assert": "assert f(1) == 1", "entry_point": "f"})
    assert isinstance(t, AssertTests) and t.units == ["assert f(1) == 1"]
    for bad, field in [({"tests": []}, "ground_truth.tests"),
                       ({"tests": [{"stdin": "1"}]}, r"ground_truth.tests\[0\].stdout"),
                       ({"tests": [{"stdin": 1, "stdout": "1"}]}, r"tests\[0\].stdin"),
                       ({"assert": "assert 1", "entry_point": "not valid"}, "entry_point"),
                       ({"assert": [1], "entry_point": "f"}, r"assert\[0\]"),
                       ("not json", "not JSON"), ({"x": 1}, "'tests'")]:
        with pytest.raises(ValueError, match=field):
            parse_tests(bad)


def test_stdio_tests(code_reward):
    res = code_reward("code", f"```python\n{ADD_PROGRAM}```", ADD)
    assert res["score"] == 1.0 and res["pass_rate"] == 1.0
    partial = "a, b = map(int, input().split())\nprint(a + b if a else 1)\n"
    res = code_reward("code", partial, ADD)
    assert res["score"] == pytest.approx(2 / 3)
    assert code_reward("code", "print(", ADD)["score"] == 0.0


def test_all_or_nothing_mode():
    reward = CodeReward(score_mode="all_or_nothing", uid_base=64000, max_slots=16)
    partial = "a, b = map(int, input().split())\nprint(a + b if a else 1)\n"
    assert reward("code", partial, ADD)["score"] == 0.0
    assert reward("code", ADD_PROGRAM, ADD)["score"] == 1.0


def test_exit_code_is_not_the_verdict(code_reward):
    # exits 0 with the wrong output, and exits 1 after the right output
    assert code_reward("code", "import sys\nsys.exit(0)", ADD)["score"] == 0.0
    right_then_fail = ADD_PROGRAM + "import sys\nsys.stdout.flush()\nsys.exit(1)\n"
    assert code_reward("code", right_then_fail, ADD)["score"] == 1.0


def test_assert_tests_fraction_and_builtins(code_reward):
    gt = {"assert": ["assert f(2) == 4", "assert f(3) == 9", "assert f(-1) == 1",
                     "assert f(0) == 1"], "entry_point": "f"}
    assert code_reward("code", "def f(x):\n    return x * x\n", gt)["score"] == 0.75


def test_assert_tests_see_types_exceptions_mutation_and_helpers(code_reward):
    program = (
        "def helper(x):\n    return x + 1\n"
        "def f(xs, d=None):\n"
        "    if xs is None:\n        raise ValueError('none')\n"
        "    xs.sort()\n"
        "    return (tuple(xs), {1, 2}, {'a': [1.5, None]}, 2 ** 100, b'\\x00', float('inf'))\n"
        "LIMIT = 7\n")
    gt = {"entry_point": "f", "assert": [
        "r = f([3, 1, 2])\nassert r[0] == (1, 2, 3) and isinstance(r[0], tuple)",
        "assert f([1])[1] == {1, 2} and f([1])[2] == {'a': [1.5, None]}",
        "assert f([1])[3] == 2 ** 100 and f([1])[4] == b'\\x00' and f([1])[5] > 1e308",
        "xs = [2, 1]\nf(xs)\nassert xs == [1, 2]",
        "try:\n    f(None)\n    assert False\nexcept ValueError:\n    pass",
        "assert helper(1) == 2 and LIMIT == 7",
        "assert f([1]) != 'anything'",
    ]}
    res = code_reward("code", program, gt)
    assert res["score"] == 1.0, res


def test_prefix_lets_a_completion_be_the_body(code_reward):
    gt = {"assert": "assert f(3) == 6", "entry_point": "f", "prefix": "def f(x):\n    return "}
    assert code_reward("code", "x * 2", gt)["score"] == 1.0
    assert code_reward("code", "def f(x):\n    return 2 * x\n", gt)["score"] == 1.0
    assert code_reward("code", "x * 3", gt)["score"] == 0.0


def test_sandbox_reports_namespace_isolation_here():
    iso = Sandbox(SandboxConfig(uid_base=64000, max_slots=16)).isolation()
    assert iso == {"namespaces": True, "user_ns": False, "uid_drop": True, "seccomp": True,
                   "network": "netns"}


def test_basic_isolation_still_runs_programs():
    reward = CodeReward(isolation="basic", uid_base=64100, max_slots=4,
                        python="/usr/bin/python3")
    assert reward.sandbox.isolation()["network"] == "seccomp"
    assert reward("code", ADD_PROGRAM, ADD)["score"] == 1.0


class _FusionHandler(BaseHTTPRequestHandler):
    """A SandboxFusion-compatible /run_code endpoint backed by our local sandbox."""

    sandbox: Sandbox

    def do_POST(self):  # noqa: N802
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        run = self.sandbox.run_stdio(req["code"], [req.get("stdin", "")])[0]
        body = json.dumps({"status": "Success", "run_result": {
            "status": "TimeLimitExceeded" if run.timed_out else "Finished",
            "return_code": run.exit, "stdout": run.stdout, "stderr": run.stderr,
            "execution_time": run.wall_s}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_http_backend_against_a_sandboxfusion_compatible_service():
    handler = type("H", (_FusionHandler,), {"sandbox": Sandbox(SandboxConfig(
        uid_base=64200, max_slots=4))})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        reward = CodeReward(backend="http", url=url)
        assert reward("code", ADD_PROGRAM, ADD)["score"] == 1.0
        gt = {"assert": ["assert f(2) == 4", "assert f(3) == 9"], "entry_point": "f"}
        assert reward("code", "def f(x):\n    return x + x\n", gt)["score"] == 0.5
        dead = CodeReward(backend="http", url="http://127.0.0.1:9")
        assert dead("code", ADD_PROGRAM, ADD) == {"score": 0.0, "pass_rate": 0.0,
                                                  "timeouts": 0, "sandbox_errors": 1}
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="code.url"):
        CodeReward(backend="http")


@pytest.mark.skipif(not HUMANEVAL.exists(), reason="needs ../shared/data/humaneval")
def test_humaneval_canonical_solutions_pass_and_pass_bodies_fail(code_reward):
    from rl.data import load_humaneval
    with gzip.open(HUMANEVAL, "rt") as f:
        raw = [json.loads(line) for line in f]
    rows = load_humaneval(HUMANEVAL)
    assert len(rows) == len(raw) == 164

    def run(i):
        gt = rows[i]["ground_truth"]
        good = code_reward("humaneval", raw[i]["prompt"] + raw[i]["canonical_solution"], gt)
        bad = code_reward("humaneval", raw[i]["prompt"] + "    pass\n", gt)
        body_only = code_reward("humaneval", raw[i]["canonical_solution"], gt) \
            if i % 20 == 0 else {"score": 1.0}
        return raw[i]["task_id"], good["score"], bad["score"], body_only["score"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(len(raw))))
    failures = [r for r in results if r[1:] != (1.0, 0.0, 1.0)]
    assert not failures, failures
