"""Keep the tail of what a vLLM engine process writes, so a dead engine can name its cause.

vLLM runs its engine core in a child process that inherits file descriptors 1 and 2 of the
process creating the `LLM`. `EngineLog.capture()` points those two descriptors at a pipe while
the engine is being created (the child inherits the pipe), then restores them; a daemon
thread forwards everything from the pipe to the original stderr, unchanged, and keeps the last
lines. When the engine dies, `cause()` picks the lines that say why (the last traceback or
error line vLLM logged). Our own process's output is untouched outside the `capture` block.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading
import time

ERROR_LINE = re.compile(r"(Error|Exception|error|FATAL|Fatal|Killed|Traceback|died|fatal)")
# vLLM's own wrapper messages; the root cause is what precedes them
WRAPPER_LINE = re.compile(r"EngineDeadError|Engine core proc .* died unexpectedly|EngineCore encountered a fatal error"
                          r"|Worker failed with error|Engine core initialization failed")


class EngineLog:
    def __init__(self, max_lines: int = 400):
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._count = 0

    @contextlib.contextmanager
    def capture(self):
        """Inside the block, fds 1 and 2 go through a pipe that this object reads."""
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        saved = os.dup(1), os.dup(2)
        forward_fd = os.dup(2)
        thread = threading.Thread(target=self._pump, args=(read_fd, forward_fd), daemon=True,
                                  name="lockstep-engine-log")
        thread.start()
        self._threads.append(thread)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        try:
            yield self
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, write_fd):
                os.close(fd)

    def _pump(self, read_fd: int, forward_fd: int) -> None:
        buffered = b""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                try:
                    os.write(forward_fd, chunk)
                except OSError:
                    pass
                buffered += chunk
                *complete, buffered = buffered.split(b"\n")
                with self._lock:
                    self._count += len(complete)
                    self.lines.extend(line.decode("utf-8", "replace") for line in complete)
        with self._lock:
            if buffered:
                self.lines.append(buffered.decode("utf-8", "replace"))
        os.close(forward_fd)

    def settle(self, quiet_s: float = 0.3, timeout_s: float = 3.0) -> None:
        """Wait until the pipe is closed (every engine process exited) or has been quiet for
        `quiet_s`, so a dying engine's last lines are in."""
        deadline = time.monotonic() + timeout_s
        last = -1
        while time.monotonic() < deadline:
            if all(not t.is_alive() for t in self._threads):
                return
            with self._lock:
                count = self._count
            if count == last:
                return
            last = count
            time.sleep(quiet_s)

    def tail(self, n: int = 40) -> list[str]:
        with self._lock:
            return list(self.lines)[-n:]

    def cause(self) -> str | None:
        """The most specific error line in the tail: the last exception line of the last
        traceback that is not vLLM's own "engine died" wrapper, else the last error-ish line."""
        lines = self.tail(len(self.lines))
        for line in reversed(lines):
            text = line.strip()
            if not text or WRAPPER_LINE.search(text):
                continue
            if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", text.split("] ")[-1]):
                return text.split("] ")[-1]
        for line in reversed(lines):
            if ERROR_LINE.search(line) and not WRAPPER_LINE.search(line):
                return line.strip()
        return None
