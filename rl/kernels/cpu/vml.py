"""Initialise MKL's vector math library in one thread, once, when the cpu backend loads.

ATen computes fp32/fp64 `exp`, `log`, `cos`, `sin`, `sqrt`, `tanh`, ... on CPU through MKL's
VML (`vmsCos` etc., linked into libtorch_cpu), splitting tensors above 2048 elements across
the OpenMP threads. VML picks its code path lazily, on its first call in the process, and that
first call is not safe when made by two threads at once: measured here (2 cores, other
processes keeping them busy), a process whose first VML call was a parallel `torch.cos` of
65536 elements got one thread's half of the result from another code path in 11 of 80 fresh
processes (cos a few ulp apart; the second call in the same process was right). In the model
that first call is the RoPE tables of the first forward, so now and then a process's first
recompute differed from every later one (the intermittent rollout-parity failure of sessions
7-8: one bit-flip of the tables changes a logprob by 0.08 at `small`). One call of each
function on a few elements runs in the calling thread alone and settles the choice for the
whole process: 0 of 80 processes differed after it (`tests/test_vml_warmup.py` re-checks).
"""
from __future__ import annotations

import torch

_FUNCTIONS = (torch.exp, torch.log, torch.cos, torch.sin, torch.sqrt, torch.rsqrt, torch.tanh,
              torch.expm1, torch.log1p, torch.erf)


def warm_up_vml() -> None:
    """Make the process's first VML calls here, single-threaded (inputs far below ATen's
    parallel grain), for fp32 and fp64."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((8,), 0.5, dtype=dtype)
        for fn in _FUNCTIONS:
            fn(x)
