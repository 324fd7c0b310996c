"""Trusted side of an assert-style test: runs the tests against the remote program.

Runs inside the sandbox under its own uid (the program cannot signal, trace or read it):
`python -I -S _lockstep_check.py REP_FD REQ_FD REPORT_FD`, reading its tests from
tests.marshal in its private directory. Names the tests use but do not define (the entry
point, helpers the program defines; computed by the scorer) become proxies whose calls
run in the program's process; results come back as plain values. One line per test goes
to REPORT_FD, a pipe only the jail reads: `ok I`, `fail I MESSAGE`, then `done N`.
"""
import builtins
import marshal
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _lockstep_wire as wire  # noqa: E402

REP_FD, REQ_FD, REPORT_FD = (int(a) for a in sys.argv[1:4])
_EXC = {name: obj for name, obj in vars(builtins).items()
        if isinstance(obj, type) and issubclass(obj, Exception)}


class RemoteError(Exception):
    """The program raised an exception that is not a builtin Exception type."""


def report(*words):
    line = " ".join(str(w).replace("\\", "\\\\").replace("\n", "\\n") for w in words) + "\n"
    data = line.encode("utf-8", "replace")
    while data:
        data = data[os.write(REPORT_FD, data):]


def _copy_back(original, new):
    if isinstance(original, list) and isinstance(new, list):
        original[:] = new
    elif isinstance(original, dict) and isinstance(new, dict):
        original.clear()
        original.update(new)
    elif isinstance(original, set) and isinstance(new, set):
        original.clear()
        original.update(new)


class Remote:
    """A function that lives in the program's process."""

    def __init__(self, name):
        self.__name__ = name

    def __repr__(self):
        return f"<remote {self.__name__}>"

    def __call__(self, *args, **kwargs):
        wire.send(REQ_FD, {"op": "call", "name": self.__name__, "args": list(args),
                           "kwargs": kwargs})
        reply = wire.recv(REP_FD)
        if "exc" in reply:
            kind, message = reply["exc"]
            raise _EXC.get(str(kind), RemoteError)(str(message))
        if "ok" not in reply:
            raise RemoteError("malformed reply")
        new_args = reply.get("args")
        if isinstance(new_args, list):
            for original, new in zip(args, new_args):
                _copy_back(original, new)
        return reply["ok"]


def main():
    with open("tests.marshal", "rb") as f:
        spec = marshal.load(f)
    units, setup = spec["units"], spec["setup"]
    hello = wire.recv(REP_FD)
    if "hello" not in hello:
        report("load_error", str(hello.get("load_error", "no hello"))[-2000:])
        return
    wire.send(REQ_FD, {"op": "names", "names": spec["names"]})
    described = wire.recv(REP_FD)["names"]
    namespace = {"__name__": "__lockstep_check__", "__builtins__": builtins}
    for name in spec["names"]:
        kind = described.get(name) if isinstance(described, dict) else None
        if kind == "callable":
            namespace[name] = Remote(name)
        elif isinstance(kind, tuple) and len(kind) == 2 and kind[0] == "value":
            namespace[name] = kind[1]
    if setup:
        exec(compile(setup, "setup", "exec"), namespace)  # noqa: S102
    for i, unit in enumerate(units):
        try:
            exec(compile(unit, f"test_{i}", "exec"), namespace)  # noqa: S102
            report("ok", i)
        except BaseException as err:  # noqa: BLE001 - any failure fails this test only
            report("fail", i, f"{type(err).__name__}: {err}"[:500])
    report("done", len(units))


try:
    main()
except BaseException as err:  # noqa: BLE001
    report("error", f"{type(err).__name__}: {err}"[:2000])
