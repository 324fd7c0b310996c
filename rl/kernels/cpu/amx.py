"""AMX for this process: asked for early, and whether the process has it.

On Linux a process may use AMX tiles only after asking the kernel (arch_prctl
ARCH_REQ_XCOMP_PERM). oneDNN asks on its first bf16 product; the kernel refuses while any
thread of the process has a signal stack too small for the AMX state, and oneDNN then runs
AVX512-BF16 kernels for the rest of the process, silently, with other bits (measured: a small
sigaltstack on the main thread before the first product moved one logprob of `small` from
-10.2358 to -10.2915). The cpu backend asks when it loads, usually before other libraries
start threads; `permitted()` reports the outcome for the build fingerprint, so a process
running without AMX on an AMX machine shows up as other hardware. Our own bf16 product
(`tiles.py`) runs only where `permitted()` (else the oneDNN path, with other bits).
"""
from __future__ import annotations

import ctypes
import platform

import torch

from rl.kernels.cpu.libc import libc

ARCH_GET_XCOMP_PERM = 0x1022
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158            # x86_64


def supported() -> bool:
    """The CPU has AMX tiles."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def request() -> bool:
    """Ask for AMX now (through torch's own request); True if the process may use it."""
    init = getattr(torch.cpu, "_init_amx", None)
    return bool(supported() and init and init())


def permitted() -> bool | None:
    """Whether this process may use AMX tiles now; None where that cannot be asked."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    lib = libc()
    if lib is None:
        return None
    mask = ctypes.c_uint64(0)
    syscall = lib.syscall
    syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p]
    if syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        return None
    return bool(mask.value >> XFEATURE_XTILEDATA & 1)
