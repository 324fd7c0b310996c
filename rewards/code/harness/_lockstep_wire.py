"""Wire format between the untrusted program server and the test checker.

Length-prefixed frames holding one value in a small tagged binary encoding of plain Python
data: None, bool, int (any size), float (incl. nan/inf), complex, str, bytes, list, tuple,
set, frozenset, dict. Decoding builds only builtin types, so whatever the untrusted side
sends, the checker never holds an object with user-defined behaviour (no forged `__eq__`),
and nothing is evaluated. Standard library only, and only `struct`, so the sandboxed
interpreters start fast; this file is copied into the sandbox next to `_lockstep_serve.py`
and `_lockstep_check.py`.
"""
import os
import struct

MAX_FRAME = 16 * 1024 * 1024
MAX_DEPTH = 100
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
_C128 = struct.Struct(">dd")


class WireError(Exception):
    """A value cannot be sent, or a frame is malformed."""


def _enc(value, out, depth):
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    d = depth + 1
    if value is None:
        out.append(b"N")
    elif value is True or value is False:
        out.append(b"T" if value else b"F")
    elif isinstance(value, bool):
        out.append(b"T" if bool.__bool__(value) else b"F")
    elif isinstance(value, int):
        n = int.__int__(value)
        if -(1 << 63) <= n < (1 << 63):
            out += (b"i", _I64.pack(n))
        else:
            raw = n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True)
            out += (b"I", _U32.pack(len(raw)), raw)
    elif isinstance(value, float):
        out += (b"f", _F64.pack(float.__float__(value)))
    elif isinstance(value, complex):
        out += (b"c", _C128.pack(complex.__complex__(value).real,
                                 complex.__complex__(value).imag))
    elif isinstance(value, str):
        raw = str.__str__(value).encode("utf-8", "surrogatepass")
        out += (b"s", _U32.pack(len(raw)), raw)
    elif isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        out += (b"b", _U32.pack(len(raw)), raw)
    elif isinstance(value, (list, tuple, set, frozenset)):
        base = list if isinstance(value, list) else tuple if isinstance(value, tuple) \
            else frozenset if isinstance(value, frozenset) else set
        items = list(base.__iter__(value))
        tag = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}[base]
        out += (tag, _U32.pack(len(items)))
        for item in items:
            _enc(item, out, d)
    elif isinstance(value, dict):
        items = list(dict.items(value))
        out += (b"d", _U32.pack(len(items)))
        for k, v in items:
            _enc(k, out, d)
            _enc(v, out, d)
    else:
        raise WireError(f"cannot send a value of type {type(value).__name__}")


def encode(value):
    out = []
    _enc(value, out, 0)
    return b"".join(out)


class _Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        end = self.pos + n
        if end > len(self.data):
            raise WireError("truncated value")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def value(self, depth):
        if depth > MAX_DEPTH:
            raise WireError("value nested too deeply")
        tag = self.take(1)
        if tag == b"N":
            return None
        if tag == b"T":
            return True
        if tag == b"F":
            return False
        if tag == b"i":
            return _I64.unpack(self.take(8))[0]
        if tag == b"I":
            return int.from_bytes(self.take(_U32.unpack(self.take(4))[0]), "big", signed=True)
        if tag == b"f":
            return _F64.unpack(self.take(8))[0]
        if tag == b"c":
            return complex(*_C128.unpack(self.take(16)))
        if tag == b"s":
            try:
                return self.take(_U32.unpack(self.take(4))[0]).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise WireError("malformed string") from None
        if tag == b"b":
            return bytes(self.take(_U32.unpack(self.take(4))[0]))
        count = _U32.unpack(self.take(4))[0]
        if count > len(self.data) - self.pos:
            raise WireError("bad length")
        if tag == b"d":
            out = {}
            for _ in range(count):
                key = self.value(depth + 1)
                try:
                    out[key] = self.value(depth + 1)
                except TypeError:
                    raise WireError("unhashable dict key") from None
            return out
        items = [self.value(depth + 1) for _ in range(count)]
        try:
            if tag == b"l":
                return items
            if tag == b"t":
                return tuple(items)
            if tag == b"S":
                return set(items)
            if tag == b"z":
                return frozenset(items)
        except TypeError:
            raise WireError("unhashable set member") from None
        raise WireError(f"unknown tag {tag!r}")


def decode(data):
    reader = _Reader(bytes(data))
    value = reader.value(0)
    if reader.pos != len(reader.data):
        raise WireError("trailing bytes")
    return value


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the channel")
        buf += chunk
    return bytes(buf)


def send(fd, message):
    data = encode(message)
    if len(data) > MAX_FRAME:
        raise WireError("message too large")
    view = memoryview(_U32.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def recv(fd):
    (size,) = _U32.unpack(_read_exact(fd, 4))
    if size > MAX_FRAME:
        raise WireError("frame too large")
    message = decode(_read_exact(fd, size))
    if type(message) is not dict:
        raise WireError("malformed frame")
    return message
