"""Backend `triton`: the kernel set on CUDA, same functions and contract as the cpu backend.

Loaded by `rl.kernels.backend_for` when tensors are on CUDA in mode `lockstep`. What breaks
invariance in stock GPU code, and what this backend does instead:
  - cuBLAS picks its kernel (and split-K) from M: rows differ for M <= 16 at K = 4096.
    `linear` is one persistent Triton GEMM, one tile config per (N, K), fixed K blocks.
  - SDPA / flash decode computes a decode row differently from the same row in prefill
    (split-KV, different kernels): `softmax_attention` is one kernel for both, walking keys
    in fixed blocks from position 0.
  - fla's chunked prefill and recurrent decode round differently: `lightning_attention` runs
    the chunk form everywhere, decode included (fp32 state at the window boundary + pending).
  - torch reductions choose their order from the tensor shape: norms, log-softmax and the
    MoE combine are row-per-program Triton kernels with shapes fixed by the row length.
Each module's docstring states its invariance conditions; tests/gpu checks them bit for bit.
"""
from rl.kernels.triton.matmul import linear
from rl.kernels.triton.norm import gated_group_rms_norm, rms_norm
from rl.kernels.triton.rope import rope
from rl.kernels.triton.attention import softmax_attention
from rl.kernels.triton.lightning import lightning_attention
from rl.kernels.triton.moe import moe_experts, moe_route
from rl.kernels.triton.logprobs import log_softmax_logits, logprobs
from rl.kernels.triton.elementwise import sigmoid, silu

__all__ = ["linear", "rms_norm", "gated_group_rms_norm", "rope", "softmax_attention",
           "lightning_attention", "moe_route", "moe_experts", "log_softmax_logits", "logprobs",
           "sigmoid", "silu"]
