"""Wire format between the untrusted program server and the test checker.

Length-prefixed JSON frames carrying plain Python values with tags for the types JSON lacks
(tuple, set, frozenset, dict with any keys, bytes, complex, big ints, nan/inf). Decoding
builds only builtin types, so whatever the untrusted side sends, the checker never holds an
object with user-defined behaviour (no forged `__eq__`). Standard library only: this file is
copied into the sandbox and imported by `_lockstep_serve.py` and `_lockstep_check.py`.
"""
import base64
import json
import math
import os
import struct

MAX_FRAME = 16 * 1024 * 1024
MAX_DEPTH = 100
_HEADER = struct.Struct(">I")


class WireError(Exception):
    """A value cannot be sent, or a frame is malformed."""


def encode(value, depth=0):
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    d = depth + 1
    if value is None or isinstance(value, bool):
        return None if value is None else bool(value)
    if isinstance(value, int):
        n = int.__int__(value)
        return n if -(1 << 53) < n < (1 << 53) else {"$": "I", "v": format(n, "x")}
    if isinstance(value, float):
        x = float.__float__(value)
        return x if math.isfinite(x) else {"$": "f", "v": repr(x)}
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return {"$": "b", "v": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, complex):
        return {"$": "c", "v": [encode(value.real, d), encode(value.imag, d)]}
    if isinstance(value, list):
        return [encode(x, d) for x in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"$": "t", "v": [encode(x, d) for x in tuple.__iter__(value)]}
    if isinstance(value, frozenset):
        return {"$": "F", "v": [encode(x, d) for x in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"$": "s", "v": [encode(x, d) for x in set.__iter__(value)]}
    if isinstance(value, dict):
        return {"$": "d", "v": [[encode(k, d), encode(v, d)] for k, v in dict.items(value)]}
    raise WireError(f"cannot send a value of type {type(value).__name__}")


def decode(obj, depth=0):
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    d = depth + 1
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if type(obj) is list:
        return [decode(x, d) for x in obj]
    if type(obj) is not dict or set(obj) != {"$", "v"}:
        raise WireError("malformed value")
    tag, v = obj["$"], obj["v"]
    if tag == "I":
        return int(v, 16)
    if tag == "f":
        if v not in ("nan", "inf", "-inf"):
            raise WireError("malformed float")
        return float(v)
    if tag == "b":
        return base64.b64decode(v)
    if tag == "c":
        return complex(decode(v[0], d), decode(v[1], d))
    if tag == "t":
        return tuple(decode(x, d) for x in v)
    if tag == "F":
        return frozenset(decode(x, d) for x in v)
    if tag == "s":
        return {decode(x, d) for x in v}
    if tag == "d":
        return {decode(k, d): decode(x, d) for k, x in v}
    raise WireError(f"unknown tag {tag!r}")


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the channel")
        buf += chunk
    return bytes(buf)


def send(fd, message):
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise WireError("message too large")
    data = _HEADER.pack(len(data)) + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def recv(fd):
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    if size > MAX_FRAME:
        raise WireError("frame too large")
    try:
        message = json.loads(_read_exact(fd, size))
    except (ValueError, RecursionError) as err:
        raise WireError(f"malformed frame: {err}") from None
    if type(message) is not dict:
        raise WireError("malformed frame")
    return message
