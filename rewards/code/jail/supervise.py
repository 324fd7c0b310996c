"""Starting, watching and killing sandboxed processes (the jail's init side).

`spawn` starts a program as the sandbox uid with rlimits, the seccomp filter and a
parent-death signal; `pump` feeds its stdin and reads its outputs under a deadline and a
byte cap; `kill_all` leaves no sandboxed process alive. Standard library only.
"""
from __future__ import annotations

import errno
import os
import resource
import selectors
import signal
import subprocess
import time

from . import linux, seccomp

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


def spawn(argv: list[str], *, cwd: str, uid: int | None, drop_caps: bool, use_seccomp: bool,
          limits: Limits, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start `argv` as `uid` (None: keep ours) in a fresh process group.

    subprocess applies setgroups/setgid/setuid before `_limit` runs, so the parent-death
    signal survives the uid change and RLIMIT_NPROC counts the sandbox uid's processes.
    """
    def _limit() -> None:
        os.umask(0o077)
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb,) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mb,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.nofile,) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.nproc,) * 2)
        if drop_caps:
            linux.drop_all_capabilities()
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if use_seccomp:
            seccomp.install()

    ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    env = dict(SAFE_ENV, HOME=cwd)
    return subprocess.Popen(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                            pass_fds=pass_fds, close_fds=True, preexec_fn=_limit,
                            process_group=0, **ids)


class Stream:
    """One pipe the supervisor reads, keeping at most `cap` bytes."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap = fd, cap
        self.data = bytearray()
        self.overflow = False
        self.eof = False


def pump(*, streams: list[Stream], watched: list[subprocess.Popen], deadline: float,
         stdin_fd: int | None = None, stdin_data: bytes = b"", stop_on_overflow: bool = True,
         grace_s: float = 0.05) -> bool:
    """Move bytes until every watched process exited and its pipes closed, or the deadline.

    Returns True when the deadline passed first. A stream over its cap ends the run at once
    when `stop_on_overflow` (huge output is a failure, not something to wait for). Pipes
    still held open by a lingering grandchild get `grace_s` after the last watched process
    exits; the caller kills everything afterwards.
    """
    sel = selectors.DefaultSelector()
    for s in streams:
        os.set_blocking(s.fd, False)
        sel.register(s.fd, selectors.EVENT_READ, s)
    pending = memoryview(stdin_data)
    if stdin_fd is not None:
        os.set_blocking(stdin_fd, False)
        if pending:
            sel.register(stdin_fd, selectors.EVENT_WRITE, None)
        else:
            os.close(stdin_fd)
            stdin_fd = None
    exited_at: float | None = None
    timed_out = False
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and all(p.poll() is not None for p in watched):
                exited_at = now
            if exited_at is not None and (all(s.eof for s in streams)
                                          or now - exited_at > grace_s):
                break
            if now >= deadline:
                timed_out = True
                break
            wait = min(deadline - now, 0.01 if exited_at is None else grace_s)
            for key, _ in sel.select(timeout=max(wait, 0.0)):
                if key.data is None:  # stdin is writable
                    try:
                        n = os.write(stdin_fd, pending[:65536])
                        pending = pending[n:]
                    except BlockingIOError:
                        n = 0
                    except (BrokenPipeError, OSError):
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(stdin_fd)
                        os.close(stdin_fd)
                        stdin_fd = None
                    continue
                s: Stream = key.data
                try:
                    chunk = os.read(s.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    s.eof = True
                    sel.unregister(s.fd)
                    continue
                room = s.cap - len(s.data)
                if len(chunk) > room:
                    s.data += chunk[:max(room, 0)]
                    s.overflow = True
                    if stop_on_overflow:
                        return False
                else:
                    s.data += chunk
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)
        sel.close()
    return timed_out


def drain(streams: list[Stream], limit_s: float = 0.5) -> None:
    """After the kill: read what is left (all writers are dead, so EOF comes quickly)."""
    open_streams = [s for s in streams if not s.eof]
    if not open_streams:
        return
    sel = selectors.DefaultSelector()
    for s in open_streams:
        sel.register(s.fd, selectors.EVENT_READ, s)
    end = time.monotonic() + limit_s
    try:
        while sel.get_map() and time.monotonic() < end:
            for key, _ in sel.select(timeout=max(end - time.monotonic(), 0.0)):
                s = key.data
                try:
                    chunk = os.read(s.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    s.eof = True
                    sel.unregister(s.fd)
                    continue
                room = s.cap - len(s.data)
                s.data += chunk[:max(room, 0)]
                s.overflow |= len(chunk) > room
    finally:
        sel.close()


def _reap_nohang() -> bool:
    """Reap every exited child; True when no child is left at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


def _kill_uid(uid: int) -> None:
    """Kill every process of `uid`: a helper that becomes `uid` and signals -1."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
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
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for uid in uids:
                _kill_uid(uid)
            for pid in _descendants(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as err:
                    if err.errno not in (errno.ESRCH, errno.EPERM):
                        raise
        if _reap_nohang():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
