"""rl.kernels — THE kernel set: every op that touches a token's logprob.

Trainer (full sequence, autograd) and rollout (prefill + decode with caches, inside vLLM)
both call these functions, so a token's logprob is computed by the same arithmetic on both
sides. Ops (shapes in each backend's docstrings):

    linear, rms_norm, gated_group_rms_norm, rope, softmax_attention,
    lightning_attention, moe_route, moe_experts, silu, swiglu, logprobs, log_softmax_logits

and `prepack(weights)` / `prepack_fused(groups)` / `prepack_experts(gate_w, up_w, down_w)`,
which an inference engine calls after loading weights (cpu: keeps the bf16 product's packed
layout of the weights, projections of one input stacked into one product (`fused_linear`), and each MoE
layer's experts stacked for decode batches; same bits).

Contract (DESIGN.md §2; each property has a bitwise test): batch invariance, prefill/decode
invariance, run-to-run determinism, trainer = rollout, the paper's precision rules.

Backends: `cpu` (torch ops arranged to be invariant) and `triton` (GPU). The mode `stock`
swaps in plain torch ops with no invariance, only so `lockstep mismatch` can show what drift
looks like. Select with `set_kernels("lockstep"|"stock")` or the `kernels(...)` context
manager; the backend follows the tensors' device. The model never branches on either.
"""
from __future__ import annotations

import contextlib
import importlib
from types import ModuleType

import torch

MODES = ("lockstep", "stock")
_mode = "lockstep"
_backends: dict[str, ModuleType] = {}


def set_kernels(mode: str) -> None:
    """Select the kernel mode for this process: `lockstep` (invariant) or `stock`."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernels: unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    _mode = mode


def get_kernels() -> str:
    return _mode


@contextlib.contextmanager
def kernels(mode: str):
    """Context manager form of `set_kernels`."""
    previous = _mode
    set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(previous)


def _backend_name(device: torch.device) -> str:
    if _mode == "stock":
        return "stock"
    return "triton" if device.type == "cuda" else "cpu"


def backend_for(device: torch.device) -> ModuleType:
    """The module implementing the ops for tensors on `device` in the current mode."""
    name = _backend_name(device)
    if name not in _backends:
        _backends[name] = importlib.import_module(f"rl.kernels.{name}")
    return _backends[name]


def linear(x, weight, out_dtype=None):
    return backend_for(x.device).linear(x, weight, out_dtype)


def prepack(weights) -> int:
    """Inference only: let `linear` keep weights in the backend's packed layout (same bits,
    less work per call). Backends without one (triton, stock) do nothing. Returns the count."""
    weights = list(weights)
    if not weights:
        return 0
    backend = backend_for(weights[0].device)
    return backend.prepack(weights) if hasattr(backend, "prepack") else 0


def prepack_fused(groups) -> list[bool]:
    """Inference only: for each group of weights that multiply the same input, let
    `fused_linear` run them as one product (cpu; same bits). Returns per group whether the
    backend keeps such a copy (backends without one: all False)."""
    groups = [list(g) for g in groups]
    if not groups:
        return []
    backend = backend_for(groups[0][0].device)
    return backend.prepack_fused(groups) if hasattr(backend, "prepack_fused") else [False] * len(groups)


def fused_linear(x, weights):
    """[linear(x, w) for w in weights] as one product where `prepack_fused` prepared this very
    group and it is still current (same tensors, unchanged) and no gradient is needed; else
    None, and the caller runs its projections (its modules) one by one."""
    backend = backend_for(x.device)
    return backend.fused_linear(x, weights) if hasattr(backend, "fused_linear") else None


def prepack_experts(gate_w, up_w, down_w) -> int:
    """Inference only: let `moe_experts` (without autograd) keep one MoE layer's expert weights
    stacked where the backend can use that (cpu; same bits). Call again after they change."""
    backend = backend_for(gate_w[0].device)
    return backend.prepack_experts(gate_w, up_w, down_w) if hasattr(backend, "prepack_experts") else 0


def rms_norm(x, weight, eps):
    return backend_for(x.device).rms_norm(x, weight, eps)


def gated_group_rms_norm(x, gate, weight, num_groups, eps):
    return backend_for(x.device).gated_group_rms_norm(x, gate, weight, num_groups, eps)


def rope(x, positions, rotary_dim, theta):
    return backend_for(x.device).rope(x, positions, rotary_dim, theta)


def softmax_attention(q, k, v, batch, kv_cache=None, scale=None):
    return backend_for(q.device).softmax_attention(q, k, v, batch, kv_cache, scale)


def lightning_attention(q, k, v, log_decay, batch, state=None, chunk_size=64):
    return backend_for(q.device).lightning_attention(q, k, v, log_decay, batch, state, chunk_size)


def moe_route(x, gate_weight, expert_bias, top_k, n_group, topk_group, norm_topk_prob,
              routed_scaling_factor):
    return backend_for(x.device).moe_route(x, gate_weight, expert_bias, top_k, n_group,
                                           topk_group, norm_topk_prob, routed_scaling_factor)


def moe_experts(x, topk_ids, topk_weights, gate_w, up_w, down_w):
    return backend_for(x.device).moe_experts(x, topk_ids, topk_weights, gate_w, up_w, down_w)


def silu(x):
    return backend_for(x.device).silu(x)


def swiglu(gate, up):
    """SwiGLU's element-wise step: silu(gate) * up in fp32, rounded to gate's dtype. Backends
    with a one-pass form of it (cpu, without autograd; same bits) run that; the others run
    `silu(gate.float()) * up.float()`."""
    backend = backend_for(gate.device)
    if hasattr(backend, "swiglu"):
        return backend.swiglu(gate, up)
    return (backend.silu(gate.float()) * up.float()).to(gate.dtype)


def log_softmax_logits(hidden, lm_head_weight, temperature=1.0):
    return backend_for(hidden.device).log_softmax_logits(hidden, lm_head_weight, temperature)


def logprobs(hidden, lm_head_weight, token_ids, temperature=1.0):
    return backend_for(hidden.device).logprobs(hidden, lm_head_weight, token_ids, temperature)


from rl.kernels.batch import BatchMeta  # noqa: E402  (plain data, no backend import)

__all__ = [
    "BatchMeta", "MODES", "set_kernels", "get_kernels", "kernels", "backend_for", "linear", "prepack", "prepack_experts",
    "prepack_fused", "fused_linear",
    "rms_norm", "gated_group_rms_norm", "rope", "softmax_attention", "lightning_attention",
    "moe_route", "moe_experts", "silu", "swiglu", "log_softmax_logits", "logprobs",
]
