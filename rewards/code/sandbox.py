"""Scorer side of the local code sandbox: slots, launching the jail, reading its verdict.

`Sandbox.run_stdio(program, stdins)` and `Sandbox.run_assert(program, units, entry_point)`
each start one jail process (rewards/code/jail, run as `python -I -S -B`) in its own
session, hand it the program and tests on stdin, and read one JSON result from its stdout.
Concurrency is bounded by `SandboxConfig.concurrency`; each run holds a *slot*, a pair of
unprivileged uids locked with flock across processes on this host, so RLIMIT_NPROC (counted
per uid) caps one run's processes without touching another's. The jail enforces the
deadlines; this side adds an outer timeout that kills the jail's whole process group if
the jail itself misbehaves, and removes the run's private directory.
"""
from __future__ import annotations

import compileall
import fcntl
import logging
import marshal
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rewards.code.tests_spec import free_names

log = logging.getLogger(__name__)
JAIL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail")
SYSTEM_PREFIXES = ("/usr", "/bin", "/lib", "/lib64", "/sbin")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program under test)."""


class SandboxConfig(BaseModel):
    """Limits and isolation for running untrusted programs (the `code` reward's sandbox)."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(5.0, gt=0, description="wall-clock limit per stdio test run, "
                             "or for a whole assert-style program with its tests")
    cpu_s: int | None = Field(None, gt=0, description="RLIMIT_CPU per process; default "
                              "ceil(timeout_s) + 1")
    memory_mb: int = Field(1024, ge=64, description="RLIMIT_AS per process")
    file_size_mb: int = Field(16, ge=1, description="RLIMIT_FSIZE")
    nproc: int = Field(32, ge=4, description="RLIMIT_NPROC for the run's uid (fork bombs "
                       "stop here)")
    nofile: int = Field(64, ge=16, description="RLIMIT_NOFILE")
    stdout_bytes: int = Field(1 << 20, ge=1024, description="stdout kept per run; more "
                              "ends the run as a failure")
    stderr_bytes: int = Field(1 << 14, ge=256, description="stderr kept per run")
    tmpfs_mb: int = Field(64, ge=8, description="size of the private root (holds /tmp)")
    isolation: Literal["auto", "namespaces", "basic"] = Field(
        "auto", description="namespaces: mount/PID/network/IPC/UTS namespaces, required; "
        "basic: uid, rlimits and seccomp only; auto: namespaces where the host allows")
    seccomp: bool = Field(True, description="block non-AF_UNIX sockets, io_uring, ptrace")
    uid_base: int = Field(61000, ge=1000, description="first sandbox uid; slot k uses "
                          "uid_base + 2k (program) and uid_base + 2k + 1 (checker)")
    max_slots: int = Field(64, ge=1, description="uid pairs reserved for sandboxes")
    concurrency: int = Field(4, ge=1, description="sandboxes running at once (per process)")
    python: str | None = Field(None, description="interpreter for programs; default: the "
                               "one running lockstep")
    ro_paths: list[str] = Field(default_factory=list, description="extra host paths "
                                "visible read-only inside the sandbox")


@dataclass
class RunResult:
    """One run of the program (one stdio test)."""

    stdout: str
    exit: int | None
    signal: int | None
    timed_out: bool
    stdout_overflow: bool
    stderr: str
    wall_s: float


@dataclass
class AssertResult:
    """Verdicts of assert-style tests, read from the checker's private report pipe."""

    passed: list[bool]
    load_error: str | None
    timed_out: bool
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


class _Slots:
    """Cross-process allocation of uid pairs via flock on one file per slot."""

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self.dir = os.path.join(tempfile.gettempdir(), "lockstep-sandbox-slots")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._cond = threading.Condition()

    def acquire(self) -> tuple[int, int]:
        with self._cond:
            while True:
                for k in range(self.cfg.max_slots):
                    fd = os.open(os.path.join(self.dir, f"slot-{self.cfg.uid_base + 2 * k}"),
                                 os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        os.close(fd)
                        continue
                    return k, fd
                self._cond.wait(0.05)

    def release(self, fd: int) -> None:
        os.close(fd)
        with self._cond:
            self._cond.notify()


def _python_for_programs(cfg: SandboxConfig) -> tuple[str, list[str]]:
    """The interpreter programs run with, and the install prefix to bind into the sandbox."""
    python = os.path.realpath(cfg.python or sys.executable)
    prefix = os.path.realpath(sys.base_prefix) if cfg.python is None else \
        os.path.dirname(os.path.dirname(python))
    paths = [] if prefix.startswith(SYSTEM_PREFIXES) or prefix == "/" else [prefix]
    return python, paths + list(cfg.ro_paths)


class Sandbox:
    """Runs untrusted Python programs; thread-safe, bounded by `cfg.concurrency`."""

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        self._gate = threading.BoundedSemaphore(self.cfg.concurrency)
        self._slots = _Slots(self.cfg)
        self._python, self._ro_paths = _python_for_programs(self.cfg)
        self._isolation: dict | None = None
        self._probe_lock = threading.Lock()
        # The jail runs with -B; byte-compiling it once here saves ~15 ms of CPU per run.
        compileall.compile_dir(JAIL_DIR, quiet=2)

    def _limits(self) -> dict:
        c = self.cfg
        return {"timeout_s": c.timeout_s, "cpu_s": c.cpu_s or math.ceil(c.timeout_s) + 1,
                "memory_mb": c.memory_mb, "file_size_mb": c.file_size_mb, "nproc": c.nproc,
                "nofile": c.nofile, "stdout_bytes": c.stdout_bytes,
                "stderr_bytes": c.stderr_bytes, "tmpfs_mb": c.tmpfs_mb}

    def _launch(self, job: dict, outer_timeout_s: float) -> dict:
        with self._gate:
            slot, lock_fd = self._slots.acquire()
            base = tempfile.mkdtemp(prefix="lockstep-sbx-")
            try:
                uid_u = self.cfg.uid_base + 2 * slot
                cfg = dict(job, base_dir=base, uids=[uid_u, uid_u + 1],
                           isolation=self.cfg.isolation, seccomp=self.cfg.seccomp,
                           python=self._python, ro_paths=self._ro_paths,
                           limits=self._limits())
                return self._run_jail(cfg, outer_timeout_s)
            finally:
                shutil.rmtree(base, ignore_errors=True)
                self._slots.release(lock_fd)

    def _run_jail(self, cfg: dict, outer_timeout_s: float) -> dict:
        argv = [os.path.realpath(sys.executable), "-I", "-S", "-B", JAIL_DIR]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        try:
            out, err = proc.communicate(marshal.dumps(cfg), timeout=outer_timeout_s)
        except BaseException as exc:
            # The jail is not reaped yet, so its process group id is still ours to kill; its
            # init and programs die with it (parent-death signals, PID namespace).
            _kill_group(proc.pid)
            proc.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise SandboxError(f"jail did not finish within {outer_timeout_s:.1f}s") \
                    from None
            raise
        try:
            result = marshal.loads(out)
            if not isinstance(result, dict):
                raise ValueError("not a dict")
        except (ValueError, EOFError, TypeError):
            raise SandboxError(f"jail exited {proc.returncode} without a result: "
                               f"{err.decode(errors='replace')[-2000:]}") from None
        if "error" in result:
            raise SandboxError(result["error"])
        runs = result.get("tests") or [result.get("check") or {}]
        if not all(run.get("clean", True) for run in runs):
            log.warning("code sandbox: some processes of a run could not be killed within 5 s "
                        "(isolation %s)", result.get("isolation"))
        return result

    def run_stdio(self, program: str, stdins: list[str]) -> list[RunResult]:
        """Run `program` once per stdin; results in order (one per test, always)."""
        if not stdins:
            return []
        self.isolation()
        outer = 5.0 + len(stdins) * (self.cfg.timeout_s + 1.0)
        res = self._launch({"mode": "stdio", "program": program,
                            "tests": [{"stdin": s} for s in stdins]}, outer)
        runs = [RunResult(stdout=t["stdout"], exit=t["exit"], signal=t["signal"],
                          timed_out=t["timed_out"], stdout_overflow=t["stdout_overflow"],
                          stderr=t["stderr"], wall_s=t["wall_s"]) for t in res["tests"]]
        if len(runs) != len(stdins):
            raise SandboxError(f"jail ran {len(runs)} tests, {len(stdins)} given")
        return runs

    def run_assert(self, program: str, units: list[str], entry_point: str,
                   setup: str = "") -> AssertResult:
        """Run `program` as a server and check `units` (assert code) against it."""
        self.isolation()
        res = self._launch({"mode": "assert", "program": program,
                            "check": {"units": units, "entry_point": entry_point,
                                      "setup": setup,
                                      "names": free_names([setup, *units], entry_point)}},
                           5.0 + self.cfg.timeout_s + 1.0)["check"]
        passed = [False] * len(units)
        errors: list[str] = []
        load_error = None
        done = None
        for words in res["report"]:  # lines "ok I" | "fail I MSG" | "done N" | "load_error MSG"
            kind, rest = words[0], words[1:]
            if kind == "load_error":
                load_error = " ".join(rest)
            elif kind == "error":
                errors.append(" ".join(rest))
            elif kind in ("ok", "fail") and rest and rest[0].isdigit() \
                    and int(rest[0]) < len(units):
                passed[int(rest[0])] = kind == "ok"
                errors.extend(rest[1:])
            elif kind == "done" and rest and rest[0].isdigit():
                done = int(rest[0])
        if done is not None and done != len(units):  # it must have run every test given
            passed = [False] * len(units)
            errors.append(f"checker ran {done} tests, {len(units)} given")
        return AssertResult(passed=passed, load_error=load_error, timed_out=res["timed_out"],
                            errors=errors, wall_s=res["wall_s"])

    def isolation(self) -> dict:
        """What isolation this host gives (probed once with a trivial program)."""
        with self._probe_lock:
            if self._isolation is None:
                res = self._launch({"mode": "stdio", "program": "print(6 * 7)",
                                    "tests": [{"stdin": ""}]}, 5.0 + self.cfg.timeout_s + 1)
                run = res["tests"][0]
                if run["stdout"].strip() != "42":
                    raise SandboxError(
                        f"the sandbox cannot run Python ({self._python}): exit {run['exit']}, "
                        f"stderr {run['stderr'][-500:]!r}; set code.python to an "
                        "interpreter the sandbox uids can read")
                self._isolation = res["isolation"]
                if not self._isolation["namespaces"] or not (
                        self._isolation["uid_drop"] or self._isolation["user_ns"]):
                    log.warning("code sandbox runs with reduced isolation %s (see "
                                "rewards/README.md)", self._isolation)
            return dict(self._isolation)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
