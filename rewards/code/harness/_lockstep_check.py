"""Trusted side of an assert-style test: runs the tests against the remote program.

Runs inside the sandbox under its own uid (the program cannot signal, trace or read it):
`python -I -S _lockstep_check.py REP_FD REQ_FD REPORT_FD`, reading tests.json from its
private directory. Names the tests use but do not define (the entry point, helpers the
program defines) become proxies whose calls run in the program's process; results come
back as plain values. One JSON line per test goes to REPORT_FD, which only the jail reads.
"""
import ast
import builtins
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _lockstep_wire as wire  # noqa: E402

REP_FD, REQ_FD, REPORT_FD = (int(a) for a in sys.argv[1:4])
_EXC = {name: obj for name, obj in vars(builtins).items()
        if isinstance(obj, type) and issubclass(obj, Exception)}


class RemoteError(Exception):
    """The program raised an exception that is not a builtin Exception type."""


def report(obj):
    data = (json.dumps(obj) + "\n").encode()
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
        wire.send(REQ_FD, {"op": "call", "name": self.__name__,
                           "args": wire.encode(list(args)),
                           "kwargs": [[k, wire.encode(v)] for k, v in kwargs.items()]})
        reply = wire.recv(REP_FD)
        if "exc" in reply:
            kind, message = reply["exc"]
            raise _EXC.get(str(kind), RemoteError)(str(message))
        if "ok" not in reply:
            raise RemoteError("malformed reply")
        for original, new in zip(args, reply.get("args") or []):
            _copy_back(original, wire.decode(new))
        return wire.decode(reply["ok"])


def free_names(sources, entry_point):
    loads, bound = set(), set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name):
                (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
    names = (loads - bound - set(dir(builtins))) | {entry_point}
    return sorted(n for n in names if not n.startswith("__"))


def main():
    with open("tests.json", encoding="utf-8") as f:
        spec = json.load(f)
    units, setup, entry = spec["units"], spec.get("setup") or "", spec["entry_point"]
    hello = wire.recv(REP_FD)
    if "hello" not in hello:
        report({"load_error": str(hello.get("load_error", "no hello"))[-4000:]})
        return
    wire.send(REQ_FD, {"op": "names", "names": free_names([setup] + units, entry)})
    namespace = {"__name__": "__lockstep_check__", "__builtins__": builtins}
    for name, kind in wire.recv(REP_FD)["names"].items():
        if kind == "callable":
            namespace[name] = Remote(name)
        elif isinstance(kind, dict) and "value" in kind:
            namespace[name] = wire.decode(kind["value"])
    if setup:
        exec(compile(setup, "setup", "exec"), namespace)  # noqa: S102
    for i, unit in enumerate(units):
        try:
            exec(compile(unit, f"test_{i}", "exec"), namespace)  # noqa: S102
            report({"i": i, "ok": True})
        except BaseException as err:  # noqa: BLE001 - any failure fails this test only
            report({"i": i, "ok": False, "err": f"{type(err).__name__}: {err}"[:500]})
    report({"done": len(units)})


try:
    main()
except BaseException as err:  # noqa: BLE001
    report({"error": f"{type(err).__name__}: {err}"[:2000]})
