"""A pool of worker processes where every call has a hard timeout.

A call that overruns its timeout has its worker SIGKILLed and replaced; the caller gets
`("timeout", None)`, never an exception. This is how the `math` reward survives inputs that
hang sympy in C code (`9^{9^{9^{9}}}`), where math-verify's own `signal.alarm` timeout
neither works off the main thread nor interrupts C, and its timeout exception is a
BaseException. Workers come from a forkserver that has the heavy modules imported already,
so a replacement costs milliseconds. Each worker has RLIMIT_AS, no core dumps and, when the
pool runs as root, no network (own network namespace) and an unprivileged uid: sympy's
`parse_expr` evaluates text, so workers are treated as handling untrusted input.

Jobs name their function as "module:function" (importable in the worker).
"""
from __future__ import annotations

import atexit
import importlib
import multiprocessing
import os
import queue
import resource
import signal
import threading
import weakref
from typing import Any

NOBODY = 65534
_ALL_POOLS: "weakref.WeakSet[ProcessPool]" = weakref.WeakSet()


def _isolate(memory_mb: int, drop_privileges: bool) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if drop_privileges and os.geteuid() == 0:
        from rewards.code.jail import linux
        try:
            linux.unshare(linux.CLONE_NEWNET)
        except OSError:
            pass
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)


def _worker_main(conn, memory_mb: int, drop_privileges: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    _isolate(memory_mb, drop_privileges)
    functions: dict[str, Any] = {}
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        target, args = job
        try:
            fn = functions.get(target)
            if fn is None:
                module, _, name = target.partition(":")
                fn = functions[target] = getattr(importlib.import_module(module), name)
            reply = ("ok", fn(*args))
        except BaseException as err:  # noqa: BLE001 - incl. math-verify's TimeoutException
            reply = ("error", f"{type(err).__name__}: {str(err)[:500]}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


class _Worker:
    def __init__(self, ctx, memory_mb: int, drop_privileges: bool):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_mb, drop_privileges),
                                daemon=True, name="lockstep-reward-worker")
        self.proc.start()
        child.close()

    def kill(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass
        self.proc.join(5)
        self.conn.close()


class ProcessPool:
    """`num_workers` processes; `call` blocks until one is free, then runs the job."""

    def __init__(self, num_workers: int, *, memory_mb: int = 2048, drop_privileges: bool = True,
                 preload: tuple[str, ...] = ()):
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.ctx = multiprocessing.get_context("forkserver")
        if preload:
            self.ctx.set_forkserver_preload(list(preload))
        self.memory_mb, self.drop_privileges = memory_mb, drop_privileges
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.num_replaced = 0
        for _ in range(num_workers):
            self._add()
        _ALL_POOLS.add(self)

    def _add(self) -> None:
        worker = _Worker(self.ctx, self.memory_mb, self.drop_privileges)
        with self._lock:
            self._all.add(worker)
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            self.num_replaced += 1
            closed = self._closed
        if not closed:
            self._add()

    def call(self, target: str, args: tuple, timeout_s: float) -> tuple[str, Any]:
        """Run target(*args) in a worker: ("ok", value) | ("error", text) | ("timeout", None)."""
        if self._closed:
            raise RuntimeError("pool is closed")
        worker = self._idle.get()
        try:
            worker.conn.send((target, args))
            if worker.conn.poll(timeout_s):
                reply = worker.conn.recv()
                self._idle.put(worker)
                return reply
        except (EOFError, OSError) as err:  # the worker died (e.g. killed by the kernel)
            self._replace(worker)
            return ("error", f"worker died: {type(err).__name__}")
        self._replace(worker)
        return ("timeout", None)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._all)
            self._all.clear()
        for worker in workers:
            worker.kill()


@atexit.register
def _close_all() -> None:
    for pool in list(_ALL_POOLS):
        pool.close()
