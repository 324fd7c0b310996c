"""Optional backend: a SandboxFusion-compatible HTTP service (`POST {url}/run_code`).

For users who already run such a service. Request `{"code", "language": "python", "stdin",
"run_timeout"}`; response `{"status", "run_result": {"status", "return_code", "stdout",
"stderr", "execution_time"}}`. Stdio tests run one request per test and compare stdout
here, which is sound. Assert tests run the program followed by the tests in one request
and read a marker line with a random nonce; the program can read its own source and forge
that marker, so this path trusts the program as much as the service does — use the local
sandbox for untrusted RL rollouts.
"""
from __future__ import annotations

import json
import secrets
import threading
import urllib.error
import urllib.request

from rewards.code.sandbox import AssertResult, RunResult, SandboxConfig, SandboxError

_ASSERT_RUNNER = '''
import json as _lockstep_json
_lockstep_passed = []
for _lockstep_unit in {units}:
    try:
        exec(_lockstep_unit, globals())
        _lockstep_passed.append(True)
    except BaseException:
        _lockstep_passed.append(False)
print("\\n{marker}" + _lockstep_json.dumps(_lockstep_passed))
'''


class HttpSandbox:
    def __init__(self, url: str, cfg: SandboxConfig):
        self.url = url.rstrip("/") + "/run_code"
        self.cfg = cfg
        self._gate = threading.BoundedSemaphore(cfg.concurrency)

    def _run(self, code: str, stdin: str) -> RunResult:
        body = json.dumps({"code": code, "language": "python", "stdin": stdin,
                           "run_timeout": self.cfg.timeout_s}).encode()
        request = urllib.request.Request(self.url, data=body,
                                         headers={"Content-Type": "application/json"})
        with self._gate:
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s + 30) as resp:
                    reply = json.loads(resp.read())
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise SandboxError(f"HTTP sandbox {self.url}: {err}") from None
        run = reply.get("run_result") or {}
        if reply.get("status") == "SandboxError" or not isinstance(run, dict):
            raise SandboxError(f"HTTP sandbox {self.url}: {reply.get('message', reply)}")
        stdout = str(run.get("stdout") or "")
        return RunResult(stdout=stdout[: self.cfg.stdout_bytes],
                         exit=run.get("return_code"), signal=None,
                         timed_out=run.get("status") == "TimeLimitExceeded",
                         stdout_overflow=len(stdout) > self.cfg.stdout_bytes,
                         stderr=str(run.get("stderr") or "")[-2000:],
                         wall_s=float(run.get("execution_time") or 0.0))

    def run_stdio(self, program: str, stdins: list[str]) -> list[RunResult]:
        return [self._run(program, stdin) for stdin in stdins]

    def run_assert(self, program: str, units: list[str], entry_point: str,
                   setup: str = "") -> AssertResult:
        marker = "LOCKSTEP-" + secrets.token_hex(16) + ":"
        code = "\n".join([program, setup, _ASSERT_RUNNER.format(units=repr(units),
                                                                  marker=marker)])
        run = self._run(code, "")
        passed = [False] * len(units)
        for line in run.stdout.splitlines():
            if line.startswith(marker):
                try:
                    got = json.loads(line[len(marker):])
                except ValueError:
                    break
                if isinstance(got, list) and len(got) == len(units):
                    passed = [x is True for x in got]
        return AssertResult(passed=passed, load_error=None, timed_out=run.timed_out)
