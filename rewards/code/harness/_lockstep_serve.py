"""Untrusted side of an assert-style test: loads the program and answers calls.

Runs inside the sandbox as the program's uid: `python -I -S _lockstep_serve.py REQ_FD
REP_FD`. It executes solution.py, then serves the checker's requests (describe names, call
functions) over two pipes. Nothing it sends can make a test pass by itself: the checker,
in another process under another uid, holds the tests and compares the plain values it
gets back.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _lockstep_wire as wire  # noqa: E402

REQ_FD, REP_FD = int(sys.argv[1]), int(sys.argv[2])
_send, _recv, _encode, _WireError = wire.send, wire.recv, wire.encode, wire.WireError


def _load():
    with open("solution.py", encoding="utf-8", errors="replace") as f:
        source = f.read()
    namespace = {"__name__": "__lockstep_solution__", "__builtins__": __builtins__}
    exec(compile(source, "solution.py", "exec"), namespace)  # noqa: S102
    return namespace


def _describe(namespace, names):
    out = {}
    for name in names:
        if name not in namespace:
            out[name] = "missing"
        elif callable(namespace[name]):
            out[name] = "callable"
        else:
            try:
                _encode(namespace[name])
                out[name] = ("value", namespace[name])
            except Exception:  # noqa: BLE001 - any failure means "not sendable"
                out[name] = "unsupported"
    return out


def _call(namespace, msg):
    fn = namespace.get(msg["name"])
    if not callable(fn):
        return {"exc": ("NameError", f"name {msg['name']!r} is not defined")}
    args, kwargs = list(msg["args"]), dict(msg["kwargs"])
    try:
        result = fn(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001 - report every failure as the call's
        return {"exc": (type(err).__name__, str(err)[:2000])}
    reply = {"ok": result, "args": args}
    try:
        _encode(reply)
    except Exception as err:  # noqa: BLE001
        return {"exc": ("TypeError", f"result cannot be checked: {err}"[:2000])}
    return reply


def main():
    try:
        namespace = _load()
    except BaseException as err:  # noqa: BLE001 - SystemExit too: it ended before the tests
        _send(REP_FD, {"load_error": f"{type(err).__name__}: {err}"[:2000]})
        return
    _send(REP_FD, {"hello": True})
    while True:
        try:
            msg = _recv(REQ_FD)
        except EOFError:
            return
        op = msg.get("op")
        if op == "names":
            reply = _describe(namespace, msg["names"])
            reply = {"names": reply}
        elif op == "call":
            try:
                reply = _call(namespace, msg)
            except Exception as err:  # noqa: BLE001
                reply = {"exc": ("TypeError", str(err)[:2000])}
        else:
            return
        _send(REP_FD, reply)


main()
