"""The C library of this process, loaded once (ctypes), for the cpu backend's process settings
(`malloc.keep_heap_top`, `amx.permitted`); None where it cannot be loaded."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
