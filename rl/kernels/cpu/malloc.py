"""Memory placement for speed, no effect on any bit: keep freed heap memory for reuse (glibc's
M_TOP_PAD), set once when the cpu backend loads; back the large buffers a decode step reads
(the engine's packed weights) with huge pages (`huge_pages`).

The cpu kernels allocate and free MB-sized temporaries on every call. With glibc's defaults the
top of the heap can be trimmed back to the OS and page-faulted in again on the next call:
measured here (bench/kernels_cpu.py), gated_group_rms_norm on 1024 x 128 took 1.3 ms instead of
0.25 ms depending on what had run before it; a 256 MiB top pad made it steady. Performance
only (no effect on any bit); a no-op where the C library has no mallopt.
"""
from __future__ import annotations

import ctypes

import torch

from rl.kernels.cpu.libc import libc

M_TOP_PAD = -2
TOP_PAD_BYTES = 256 << 20
MADV_HUGEPAGE = 14
HUGE_PAGE_BYTES = 2 << 20


def keep_heap_top() -> bool:
    """Ask malloc to keep TOP_PAD_BYTES at the heap top; True if the C library accepted it."""
    lib = libc()
    try:
        return bool(lib is not None and lib.mallopt(M_TOP_PAD, TOP_PAD_BYTES))
    except AttributeError:           # a C library without mallopt
        return False


def huge_pages(t: torch.Tensor) -> int:
    """Ask the kernel to back the whole 2 MiB pages inside contiguous t with transparent huge
    pages as they are first touched (MADV_HUGEPAGE: for memory about to be written; pages
    already touched stay as they are). A decode step streams every packed weight once; on 4
    KiB pages a small MoE's expert stream ran at ~10.6 GB/s here, on huge pages ~12.5, and the
    small model's rollout inside vLLM took ~6.2-7.0 s against ~7.2-8.9 s (A/B in alternation);
    the engine's packs take it before they are written (prepack 1.3 -> 2.4 s the first time,
    1.4 s after, as at a weight update). Not for vLLM's state pools and KV cache: they are
    touched when allocated, and moving a 1 GiB pool onto huge pages (MADV_COLLAPSE) took 3.4 s
    (0.1 GiB: 0.06 s). Speed only; a no-op where the kernel or C library refuses. Returns the
    bytes advised (0: none)."""
    lib = libc()
    if lib is None or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    start = t.data_ptr()
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = (start + t.numel() * t.element_size()) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if last <= first:
        return 0
    try:
        madvise = lib.madvise
    except AttributeError:
        return 0
    madvise.restype, madvise.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return last - first if madvise(first, last - first, MADV_HUGEPAGE) == 0 else 0
