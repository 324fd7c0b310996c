"""A small seccomp-BPF filter for sandboxed programs.

Blocks every socket family except AF_UNIX (the network fallback when no network namespace
can be made, and defence in depth when one can), io_uring (which can open sockets without
the socket syscall), ptrace and cross-process memory access, the x32 ABI and any foreign
architecture. Everything else is allowed: rlimits, uids and namespaces do the rest.
Standard library only (runs in the jail). Supported on x86_64 and aarch64; `supported()`
says whether this machine is one of them.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

from . import linux

SECCOMP_MODE_FILTER = 2
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06

AF_UNIX = 1
# machine -> (audit arch, socket nr, denied syscall numbers, has x32 ABI)
_ARCH = {
    "x86_64": (0xC000003E, 41, (101, 310, 311, 425, 426, 427), True),
    "aarch64": (0xC00000B7, 198, (117, 270, 271, 425, 426, 427), False),
}


def supported() -> bool:
    return os.uname().machine in _ARCH


def build_filter(machine: str | None = None) -> bytes:
    """The filter program as packed `struct sock_filter` records."""
    arch, nr_socket, denied, has_x32 = _ARCH[machine or os.uname().machine]
    eperm = _RET_ERRNO | errno.EPERM
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, 4),            # A = seccomp_data.arch
        (_JEQ_K, 1, 0, arch),
        (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, 0),            # A = seccomp_data.nr
    ]
    if has_x32:
        prog += [(_JGE_K, 0, 1, 0x40000000), (_RET_K, 0, 0, eperm)]
    for nr in denied:
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, eperm)]
    prog += [
        (_JEQ_K, 1, 0, nr_socket),
        (_RET_K, 0, 0, RET_ALLOW),
        (_LD_W_ABS, 0, 0, 16),           # A = low 32 bits of args[0]: the address family
        (_JEQ_K, 0, 1, AF_UNIX),
        (_RET_K, 0, 0, RET_ALLOW),
        (_RET_K, 0, 0, _RET_ERRNO | errno.EACCES),
    ]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    """Install the filter on the calling thread (and its future children). Irreversible."""
    code = build_filter()
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.prctl_ptr(linux.PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog))
