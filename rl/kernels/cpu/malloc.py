"""Keep freed heap memory for reuse (glibc's M_TOP_PAD), set once when the cpu backend loads.

The cpu kernels allocate and free MB-sized temporaries on every call. With glibc's defaults the
top of the heap can be trimmed back to the OS and page-faulted in again on the next call:
measured here (bench/kernels_cpu.py), gated_group_rms_norm on 1024 x 128 took 1.3 ms instead of
0.25 ms depending on what had run before it; a 256 MiB top pad made it steady. Performance
only (no effect on any bit); a no-op where the C library has no mallopt.
"""
from __future__ import annotations

from rl.kernels.cpu.libc import libc

M_TOP_PAD = -2
TOP_PAD_BYTES = 256 << 20


def keep_heap_top() -> bool:
    """Ask malloc to keep TOP_PAD_BYTES at the heap top; True if the C library accepted it."""
    lib = libc()
    try:
        return bool(lib is not None and lib.mallopt(M_TOP_PAD, TOP_PAD_BYTES))
    except AttributeError:           # a C library without mallopt
        return False
