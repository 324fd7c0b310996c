"""Position-independent elementwise activations.

ATen's `sigmoid`/`silu` use a vectorised body and a scalar tail with different math, so
an element's result depends on where it sits in the tensor. `exp`, `+`, `/`, `*` give the
same bits anywhere (checked in tests/test_kernels_invariance.py), so we compose from them.
`swiglu` without autograd takes ATen's exp and does the rest in one C pass
(csrc/moe_rows.c), the same bits.
"""
import ctypes
import functools

import torch

from rl.kernels.cpu.native import library


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * sigmoid(x)


@functools.lru_cache(maxsize=1)
def _swiglu_kernel():
    fn = library().swiglu_rows
    fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, ptr, i64, ptr, i64, ptr, ptr]
    return fn


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, rounded to gate's dtype; gate, up [..., I]. bf16 rows without
    autograd: exp(-gate) from ATen, the rest in one C pass (the same bits)."""
    if (gate.device.type == "cpu" and gate.dtype == up.dtype == torch.bfloat16 and gate.shape == up.shape
            and gate.dim() == 2
            and gate.stride(1) == 1 and up.stride(1) == 1
            and not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad))):
        gate_exp = gate.float().neg_().exp_()          # a fresh fp32 copy: in place is safe
        out = torch.empty(gate.shape, dtype=torch.bfloat16)
        _swiglu_kernel()(gate.shape[0], gate.shape[1], gate.data_ptr(), gate.stride(0), up.data_ptr(),
                         up.stride(0), gate_exp.data_ptr(), out.data_ptr())
        return out
    return (silu(gate.float()) * up.float()).to(gate.dtype)
