"""Position-independent elementwise activations.

ATen's `sigmoid`/`silu` use a vectorised body and a scalar tail with different math, so
an element's result depends on where it sits in the tensor. `exp`, `+`, `/`, `*` give the
same bits anywhere (checked in tests/test_kernels_invariance.py), so we compose from them.
"""
import torch


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * sigmoid(x)
