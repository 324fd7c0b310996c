"""Starting, watching and killing sandboxed processes (the jail's init side).

`spawn` forks and execs a program as the sandbox uid with rlimits, the seccomp filter and
a parent-death signal; `pump` feeds its stdin and reads its outputs under a deadline and a
byte cap; `kill_all` leaves no sandboxed process alive. Standard library only, and only
modules without import cost (`subprocess`, `selectors` and `signal` would add ~20 ms of
CPU to every sandbox run; the jail is single-threaded, so a plain fork/exec is safe).
"""
from __future__ import annotations

import _signal
import errno
import os
import resource
import select
import time

from . import linux, seccomp

SIGKILL = 9
SIGPIPE, SIGXFSZ = 13, 25
SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "TMPDIR": "/tmp", "PYTHONIOENCODING": "utf-8"}


class Limits:
    """Per-process resource limits (see rewards.code.sandbox.SandboxConfig for meanings)."""

    def __init__(self, d: dict):
        self.timeout_s = float(d["timeout_s"])
        self.cpu_s = int(d["cpu_s"])
        self.memory_mb = int(d["memory_mb"])
        self.file_size_mb = int(d["file_size_mb"])
        self.nproc = int(d["nproc"])
        self.nofile = int(d["nofile"])
        self.stdout_bytes = int(d["stdout_bytes"])
        self.stderr_bytes = int(d["stderr_bytes"])


class Child:
    """A spawned process: pid, the parent's ends of its pipes, its exit status once seen."""

    def __init__(self, pid: int, stdin: int | None, stdout: int, stderr: int):
        self.pid, self.stdin, self.stdout, self.stderr = pid, stdin, stdout, stderr
        self.status: int | None = None   # like Popen.returncode: -N for signal N

    def poll(self) -> int | None:
        if self.status is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.status = -SIGKILL  # reaped by kill_all: it did not exit on its own
                return self.status
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def close(self) -> None:
        for fd in (self.stdin, self.stdout, self.stderr):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.stdin = None


def _child(argv, cwd, uid, drop_caps, use_seccomp, limits, fds, pass_fds, report_fd):
    """In the forked child: plumbing, identity, limits, then exec. Never returns."""
    try:
        os.setpgid(0, 0)
        for target, source in enumerate(fds):
            os.dup2(source, target)
        keep = sorted(set(pass_fds) | {report_fd})
        low = 3
        for fd in keep:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        for sig in (SIGPIPE, SIGXFSZ):  # the interpreter ignores these; exec would keep that
            _signal.signal(sig, _signal.SIG_DFL)
        os.chdir(cwd)
        os.umask(0o077)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mb,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile,) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.nproc,) * 2)
        if drop_caps:
            linux.drop_all_capabilities()
        # after the uid change, which would clear it
        linux.prctl(linux.PR_SET_PDEATHSIG, SIGKILL)
        if use_seccomp:
            seccomp.install()
        os.execve(argv[0], argv, dict(SAFE_ENV, HOME=cwd))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then exit
        try:
            os.write(report_fd, f"{type(err).__name__}: {err}".encode()[:1000])
        finally:
            os._exit(127)


def spawn(argv: list[str], *, cwd: str, uid: int | None, drop_caps: bool, use_seccomp: bool,
          limits: Limits, stdin_pipe: bool = False, pass_fds: tuple[int, ...] = ()) -> Child:
    """Start `argv` as `uid` (None: keep ours) in its own process group.

    stdin is a pipe (`stdin_pipe`) or /dev/null; stdout and stderr are pipes. The parent-
    death signal is set after the uid change (which clears it), so the program dies with
    us; RLIMIT_NPROC then counts the sandbox uid's processes.
    """
    devnull = os.open(os.devnull, os.O_RDONLY)
    in_r, in_w = os.pipe() if stdin_pipe else (devnull, None)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _child(argv, cwd, uid, drop_caps, use_seccomp, limits, (in_r, out_w, err_w),
               pass_fds, rep_w)
    for fd in {devnull, in_r, out_w, err_w, rep_w}:
        os.close(fd)
    failure = b""
    while True:
        chunk = os.read(rep_r, 1024)
        if not chunk:
            break
        failure += chunk
    os.close(rep_r)
    child = Child(pid, in_w, out_r, err_r)
    if failure:
        os.waitpid(pid, 0)
        child.close()
        raise OSError(f"cannot start {argv[0]}: {failure.decode(errors='replace')}")
    return child


class Stream:
    """One pipe the supervisor reads, keeping at most `cap` bytes."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap = fd, cap
        self.data = bytearray()
        self.overflow = False
        self.eof = False

    def take(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.overflow |= len(chunk) > room


def _read_ready(poller, fd_map, timeout_s: float) -> bool:
    """One poll round over the streams; False when a stream overflowed."""
    for fd, _ in poller.poll(max(timeout_s, 0.0) * 1000):
        s = fd_map.get(fd)
        if s is None:
            continue
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            s.eof = True
            poller.unregister(fd)
            continue
        s.take(chunk)
        if s.overflow:
            return False
    return True


def pump(*, streams: list[Stream], watched: list[Child], deadline: float,
         stdin_fd: int | None = None, stdin_data: bytes = b"", stop_on_overflow: bool = True,
         grace_s: float = 0.05) -> bool:
    """Move bytes until every watched process exited and its pipes closed, or the deadline.

    Returns True when the deadline passed first. A stream over its cap ends the run at once
    when `stop_on_overflow` (huge output is a failure, not something to wait for). Pipes
    still held open by a lingering grandchild get `grace_s` after the last watched process
    exits; the caller kills everything afterwards.
    """
    poller = select.poll()
    fd_map = {}
    for s in streams:
        os.set_blocking(s.fd, False)
        poller.register(s.fd, select.POLLIN)
        fd_map[s.fd] = s
    pending = memoryview(stdin_data)
    if stdin_fd is not None:
        os.set_blocking(stdin_fd, False)
    exited_at: float | None = None
    try:
        while True:
            if stdin_fd is not None:
                try:
                    while pending:
                        pending = pending[os.write(stdin_fd, pending[:65536]):]
                except BlockingIOError:
                    pass
                except OSError:  # the program closed its stdin: fine
                    pending = pending[:0]
                if not pending:
                    os.close(stdin_fd)
                    stdin_fd = None
            now = time.monotonic()
            if exited_at is None and all(c.poll() is not None for c in watched):
                exited_at = now
            if exited_at is not None and (all(s.eof for s in streams)
                                          or now - exited_at > grace_s):
                return False
            if now >= deadline:
                return True
            wait = min(deadline - now, 0.005 if stdin_fd is not None else 0.01)
            if not _read_ready(poller, fd_map, wait if exited_at is None else min(wait, grace_s)):
                if stop_on_overflow:
                    return False
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)


def drain(streams: list[Stream], limit_s: float = 0.5) -> None:
    """After the kill: read what is left (all writers are dead, so EOF comes quickly)."""
    poller = select.poll()
    fd_map = {s.fd: s for s in streams if not s.eof}
    for fd in fd_map:
        poller.register(fd, select.POLLIN)
    end = time.monotonic() + limit_s
    while any(not s.eof for s in fd_map.values()) and time.monotonic() < end:
        _read_ready(poller, fd_map, end - time.monotonic())


def _reap_nohang() -> bool:
    """Reap every exited child; True when no child is left at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


def kill_uid(uid: int) -> None:
    """Kill every process of `uid`: a helper that becomes `uid` and signals -1."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_all(*, pid_ns: bool, uids: list[int], limit_s: float = 5.0) -> bool:
    """SIGKILL every sandboxed process and reap it; True when none is left.

    In our own PID namespace (we are its init) kill(-1) reaches exactly the sandbox. Without
    one we are a child subreaper: orphans re-parent to us, so our descendants are the
    sandbox; they are killed by uid (a helper per sandbox uid) and by walking /proc.
    """
    end = time.monotonic() + limit_s
    while True:
        if pid_ns:
            try:
                os.kill(-1, SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for uid in uids:
                kill_uid(uid)
            for pid in _descendants(os.getpid()):
                try:
                    os.kill(pid, SIGKILL)
                except OSError as err:
                    if err.errno not in (errno.ESRCH, errno.EPERM):
                        raise
        if _reap_nohang():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
