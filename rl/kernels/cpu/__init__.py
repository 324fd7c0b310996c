"""Backend `cpu`: torch ops arranged so that every op satisfies the kernel contract.

What breaks invariance in plain torch on CPU, measured here, and what we do instead:
  - `torch.mm` picks its blocking and threading from M (fp32 rows differ for M<16 vs 1000;
    bf16 rows differ at M=64 and 257; with 2 threads a lone GEMM splits work differently):
    products of bf16 operands (projections, experts, router, lm_head) run our own AMX tile
    kernel (`tiles.py`, csrc/tiles.c), whose every element is one fixed chain of tile ops
    over k at any M (without AMX: one oneDNN call per fixed 32-row tile); fp32 products
    through `matmul.bmm_fixed` (rows padded to a fixed tile, at least two matrices per call
    so threads split the batch); the attention kernels' products and the RMSNorm statistic
    through `rows.bmm_rows`, our own C loop whose every element is one sum in a defined
    order, so a decode step computes only its own rows. (csrc/*.c is built once per machine
    with the system C compiler.)
  - `torch.sigmoid`, `F.silu` and `torch.pow` take a scalar path for the tail of a
    vector loop, so an element's bits depend on its position in the tensor: we build them
    from `exp`, `+`, `/` and `*`, which are position-independent (tests/test_kernels_*).
  - softmax rows of different lengths reduce in different orders: attention uses the exact
    row max (order-free) and sums in fixed-size blocks, in order.
  - MKL's vector math (ATen's exp/cos/sin/... on CPU) chooses its code path on its first
    call, racily when that call is split across threads: `vml.warm_up_vml` makes it once,
    single-threaded, when this backend loads.
  - AMX needs the OS's permission per process (refused, the bf16 products would take the
    oneDNN path with other bits): `amx.request` asks when this backend loads; the build
    fingerprint reports it.
Speed (the rollout engine's decode step is many small ops): weights are read once per product
at decode sizes (the tile kernel, prefetching ahead, the engine's packs on huge pages; a MoE
layer's experts in two grouped calls that gather their rows themselves); every rollout forward
(prefill and decode) runs both attention kinds in C on each new token's own rows, the general
path's arithmetic (csrc/lightning_steps.c stepping through the tokens with the state,
csrc/attention_rows.c over each token's visible key blocks); and without autograd RMSNorm (plain
and gated), RoPE, SwiGLU, the experts' weighted sum and the router's top-k run as one C pass
each (csrc/norm_rope.c, moe_rows.c, route.c; ATen's exp where the torch form takes it) with the
torch forms' bits, which the trainer keeps; tests compare every pair of forms bit for bit
(`native.py` builds the C once per machine).
"""
from rl.kernels.cpu import amx
from rl.kernels.cpu.malloc import keep_heap_top
from rl.kernels.cpu.vml import warm_up_vml
from rl.kernels.cpu.matmul import fused_linear, linear, prepack, prepack_fused
from rl.kernels.cpu.norm import gated_group_rms_norm, rms_norm
from rl.kernels.cpu.rope import rope
from rl.kernels.cpu.attention import softmax_attention
from rl.kernels.cpu.lightning import lightning_attention
from rl.kernels.cpu.moe import moe_experts, moe_route, prepack_experts
from rl.kernels.cpu.logprobs import log_softmax_logits, logprobs
from rl.kernels.cpu.elementwise import sigmoid, silu, swiglu

keep_heap_top()
warm_up_vml()
amx.request()

__all__ = ["linear", "prepack", "prepack_fused", "fused_linear", "rms_norm", "gated_group_rms_norm", "rope", "softmax_attention",
           "lightning_attention", "moe_route", "moe_experts", "prepack_experts", "log_softmax_logits", "logprobs",
           "sigmoid", "silu", "swiglu"]
