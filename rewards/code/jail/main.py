"""The jail: isolates, runs and watches one sandboxed program, then reports.

Started by rewards.code.sandbox as `python -I -S -B rewards/code/jail`, the config
marshalled on stdin (marshal, not json: both ends are ours, and it imports nothing),
as root where the host allows (these machines) so it can make namespaces and drop to the
sandbox uids. It

1. kills leftovers of its slot's uids, then unshares mount, PID, network, IPC and UTS
   namespaces (a user namespace too when not root; nothing when neither works);
2. forks the namespace's init (pid 1, dies with us), which builds a minimal root
   filesystem (rootfs.py), writes the program and harness files, and runs the tests:
   `stdio` runs the program once per test feeding stdin; `assert` runs the program server
   (uid A) and the checker (uid B) wired by pipes;
3. kills every sandboxed process after each run and writes one marshalled result to
   stdout, a pipe only the scorer holds.

Pass/fail never comes from the program's exit status: stdio outputs are compared by the
scorer, and assert verdicts come from the checker's private report pipe.
"""
from __future__ import annotations

import marshal
import os
import sys
import time

from . import linux, rootfs, seccomp, supervise

NS_FLAGS = (linux.CLONE_NEWNS | linux.CLONE_NEWPID | linux.CLONE_NEWNET | linux.CLONE_NEWIPC
            | linux.CLONE_NEWUTS)
HARNESS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "harness")
HARNESS_FILES = ("_lockstep_wire.py", "_lockstep_serve.py", "_lockstep_check.py")


class Isolation:
    """What this run actually got (reported back, and shown by `lockstep rewards check`)."""

    def __init__(self) -> None:
        self.namespaces = False   # mount, PID, network, IPC, UTS
        self.user_ns = False      # the namespaces hang off a user namespace (non-root host)
        self.uid_drop = False     # programs run as the slot's unprivileged uids
        self.seccomp = False

    def as_dict(self) -> dict:
        network = "netns" if self.namespaces else ("seccomp" if self.seccomp else "none")
        return {"namespaces": self.namespaces, "user_ns": self.user_ns,
                "uid_drop": self.uid_drop, "seccomp": self.seccomp, "network": network}


def _enter_namespaces(mode: str, iso: Isolation) -> None:
    if mode == "basic":
        return
    try:
        if os.geteuid() == 0:
            linux.unshare(NS_FLAGS)
        else:
            uid, gid = os.getuid(), os.getgid()
            linux.unshare(NS_FLAGS | linux.CLONE_NEWUSER)
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                               ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            iso.user_ns = True
        iso.namespaces = True
    except OSError:
        if mode == "namespaces":
            raise


def _write(path: str, text: str, owner: int | None, mode: int = 0o644) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner, owner)


def _make_dir(path: str, owner: int | None) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


class Init:
    """Pid 1 of the sandbox (or, without namespaces, a child subreaper)."""

    def __init__(self, cfg: dict, iso: Isolation):
        self.cfg, self.iso = cfg, iso
        self.limits = supervise.Limits(cfg["limits"])
        uids = cfg.get("uids") if os.geteuid() == 0 and not iso.user_ns else None
        self.uid_u, self.uid_t = (uids[0], uids[1]) if uids else (None, None)
        iso.uid_drop = uids is not None
        iso.seccomp = bool(cfg.get("seccomp", True)) and seccomp.supported()
        self.python = cfg["python"]
        self.harness = {}
        for name in HARNESS_FILES:
            with open(os.path.join(HARNESS_DIR, name), encoding="utf-8") as f:
                self.harness[name] = f.read()

    def setup(self) -> None:
        base = self.cfg["base_dir"]
        if self.iso.namespaces:
            linux.sethostname("sandbox")
            rootfs.build(base, ro_paths=list(self.cfg.get("ro_paths", [])),
                         tmpfs_mb=int(self.cfg["limits"]["tmpfs_mb"]))
            top = "/tmp"
        else:
            top = base
            os.chmod(base, 0o711)  # the sandbox uids may enter their own subdirectory only
        self.dir_u = _make_dir(os.path.join(top, "u"), self.uid_u)
        self.dir_t = _make_dir(os.path.join(top, "t"), self.uid_t)
        _write(os.path.join(self.dir_u, "solution.py"), self.cfg["program"], self.uid_u)

    def _spawn(self, argv, *, cwd, uid, **kw):
        return supervise.spawn(argv, cwd=cwd, uid=uid, drop_caps=self.iso.user_ns,
                               use_seccomp=self.iso.seccomp, limits=self.limits, **kw)

    def _cleanup(self) -> bool:
        uids = [u for u in (self.uid_u, self.uid_t) if u is not None]
        return supervise.kill_all(pid_ns=self.iso.namespaces, uids=uids)

    def run_stdio(self) -> list[dict]:
        results = []
        argv = [self.python, "-I", "-S", "-B", "solution.py"]
        for test in self.cfg["tests"]:
            start = time.monotonic()
            proc = self._spawn(argv, cwd=self.dir_u, uid=self.uid_u, stdin_pipe=True)
            out = supervise.Stream(proc.stdout, self.limits.stdout_bytes)
            err = supervise.Stream(proc.stderr, self.limits.stderr_bytes)
            stdin_fd, proc.stdin = proc.stdin, None
            timed_out = supervise.pump(streams=[out, err], watched=[proc],
                                       deadline=start + self.limits.timeout_s,
                                       stdin_fd=stdin_fd,
                                       stdin_data=str(test.get("stdin", "")).encode())
            status = proc.poll()
            clean = self._cleanup()
            supervise.drain([out, err])
            proc.close()
            results.append({
                "exit": status if status is not None and status >= 0 else None,
                "signal": -status if status is not None and status < 0 else None,
                "timed_out": timed_out, "stdout": out.data.decode("utf-8", "replace"),
                "stdout_overflow": out.overflow,
                "stderr": err.data.decode("utf-8", "replace")[-2000:],
                "wall_s": round(time.monotonic() - start, 4), "clean": clean})
        return results

    def run_assert(self) -> dict:
        check = self.cfg["check"]
        for name in HARNESS_FILES[:2]:
            _write(os.path.join(self.dir_u, name), self.harness[name], None)
        for name in (HARNESS_FILES[0], HARNESS_FILES[2]):
            _write(os.path.join(self.dir_t, name), self.harness[name], None)
        path = os.path.join(self.dir_t, "tests.marshal")
        with open(path, "wb") as f:
            marshal.dump(check, f)
        os.chmod(path, 0o600)
        if self.uid_t is not None:
            os.chown(path, self.uid_t, self.uid_t)
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        rpt_r, rpt_w = os.pipe()
        start = time.monotonic()
        server = self._spawn([self.python, "-I", "-S", "-B", "_lockstep_serve.py",
                              str(req_r), str(rep_w)], cwd=self.dir_u, uid=self.uid_u,
                             pass_fds=(req_r, rep_w))
        checker = self._spawn([self.python, "-I", "-S", "-B", "_lockstep_check.py",
                               str(rep_r), str(req_w), str(rpt_w)], cwd=self.dir_t,
                              uid=self.uid_t, pass_fds=(rep_r, req_w, rpt_w))
        for fd in (req_r, req_w, rep_r, rep_w, rpt_w):
            os.close(fd)
        report = supervise.Stream(rpt_r, 1 << 20)
        streams = [report]
        for proc, cap in ((server, self.limits.stdout_bytes), (checker, 1 << 16)):
            streams.append(supervise.Stream(proc.stdout, cap))
            streams.append(supervise.Stream(proc.stderr, self.limits.stderr_bytes))
        timed_out = supervise.pump(streams=streams, watched=[checker],
                                   deadline=start + self.limits.timeout_s,
                                   stop_on_overflow=False)
        clean = self._cleanup()
        supervise.drain(streams)
        for proc in (server, checker):
            proc.close()
        os.close(rpt_r)
        lines = [_unescape(raw.decode("utf-8", "replace")).split(" ", 2)
                 for raw in bytes(report.data).splitlines()]
        return {"report": lines, "timed_out": timed_out, "clean": clean,
                "wall_s": round(time.monotonic() - start, 4),
                "server_stderr": streams[2].data.decode("utf-8", "replace")[-2000:],
                "checker_stderr": streams[4].data.decode("utf-8", "replace")[-2000:]}

    def run(self) -> dict:
        self.setup()
        result = {"isolation": self.iso.as_dict()}
        if self.cfg["mode"] == "stdio":
            result["tests"] = self.run_stdio()
        else:
            result["check"] = self.run_assert()
        return result


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append("\n" if text[i + 1] == "n" else text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _kill_stale(uids: list[int]) -> None:
    """A previous scorer that died mid-run may have left processes under these uids."""
    if os.geteuid() == 0:
        for uid in uids:
            supervise.kill_uid(uid)


def _emit(result: dict) -> None:
    data = marshal.dumps(result)
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def main() -> int:
    cfg = marshal.loads(sys.stdin.buffer.read())
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)
    iso = Isolation()
    try:
        _kill_stale(list(cfg.get("uids") or []))
        _enter_namespaces(cfg.get("isolation", "auto"), iso)
    except Exception as err:  # noqa: BLE001 - reported to the scorer, which raises
        _emit({"error": f"isolation failed: {type(err).__name__}: {err}"})
        return 3
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    if iso.namespaces:
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status) if status else 0
        linux.prctl(linux.PR_SET_PDEATHSIG, supervise.SIGKILL)
    else:
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    try:
        init = Init(cfg, iso)
        result = init.run()
    except Exception as err:  # noqa: BLE001
        result = {"error": f"jail failed: {type(err).__name__}: {err}",
                  "isolation": iso.as_dict()}
        try:
            supervise.kill_all(pid_ns=iso.namespaces, uids=list(cfg.get("uids") or []))
        except Exception:  # noqa: BLE001
            pass
    _emit(result)
    if iso.namespaces:
        os._exit(0)  # leaving pid 1 tears the namespace down
    return 0
