"""Layers of the Ring-linear model: own the parameters, call `rl.kernels` for all math.

Parameter names match the released checkpoints (`query_key_value`, `g_proj`, `g_norm`,
`dense`, `gate.expert_bias`, `experts.{e}.gate_proj`, ...). Every layer takes flat tokens
`[N, hidden]` plus a `BatchMeta` (how the tokens split into sequences) and an optional
per-layer cache owned by the caller (the reference decoder or vLLM).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rl import kernels as K
from rl.kernels import BatchMeta
from rl.model.config import BailingMoeLinearV2Config


class Linear(nn.Module):
    """Bias-free projection y = x Wᵀ through `kernels.linear`; weight [out, in]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps)


class GatedGroupNorm(nn.Module):
    """`g_norm`: RMSNorm in `num_groups` groups, then times sigmoid(gate)."""

    def __init__(self, dim: int, num_groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.num_groups, self.eps = num_groups, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return K.gated_group_rms_norm(x, gate, self.weight, self.num_groups, self.eps)


class MLP(nn.Module):
    """SwiGLU MLP (the dense first layer and the shared expert)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def fused_groups(self) -> list[list[torch.Tensor]]:
        """Projections of one input, for an inference engine's `K.prepack_fused`."""
        return [[self.gate_proj.weight, self.up_proj.weight]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = K.fused_linear(x, [self.gate_proj.weight, self.up_proj.weight])
        gate, up = fused if fused is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(K.swiglu(gate, up))


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes s_h (H=16: 2^(-0.5(h+1)); H=32: 2^(-0.25(h+1)))."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def linear_log_decay(config: BailingMoeLinearV2Config, layer_idx: int) -> list[float]:
    """log λ_h = -s_h · f(l) per head (python floats, made fp32 where used);
    f(l) = 1 - l'/(L-1) + 1e-5 with l' = l ("engine") or l - 1 ("hf").
    One formula for trainer and rollout: it is a config field."""
    num_layers = config.num_hidden_layers
    l_eff = layer_idx if config.linear_decay_form == "engine" else layer_idx - 1
    factor = 1.0 - l_eff / max(num_layers - 1, 1) + 1e-5
    return [-s * factor for s in alibi_slopes(config.num_attention_heads)]


def _qk_norm_rope_apart(attn, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
    """The trainer's form of q/k norm + RoPE: q and k through the norm modules (ZeRO-3 gathers
    their weights in the modules' hooks), then rotated."""
    if attn.use_qk_norm:
        q, k = attn.query_layernorm(q), attn.key_layernorm(k)
    return (K.rope(q, positions, attn.rotary_dim, attn.rope_theta),
            K.rope(k, positions, attn.rotary_dim, attn.rope_theta))


def _qk_norm_rope_together(attn, qkv: torch.Tensor, hq: int, hkv: int, positions: torch.Tensor):
    """The inference engine's form of q/k norm + RoPE: the q heads and k heads (the first
    hq + hkv heads of the qkv rows) normed and rotated in one call each, each head with its own
    norm's weight. Per head row the same arithmetic as the two modules' separate calls (a norm
    row depends only on itself, RoPE is element-wise per token), so the same bits; it reads the
    norms' weights directly, so it is only for a model an engine prepared (no ZeRO-3 hooks)."""
    n, d = qkv.shape[0], attn.head_dim
    qk = qkv[:, :(hq + hkv) * d].view(n, hq + hkv, d)
    if attn.use_qk_norm:
        weight = torch.cat([attn.query_layernorm.weight.expand(hq, d), attn.key_layernorm.weight.expand(hkv, d)])
        qk = K.rms_norm(qk, weight, attn.query_layernorm.eps)
    qk = K.rope(qk, positions, attn.rotary_dim, attn.rope_theta)
    return qk[:, :hq], qk[:, hq:]


class LinearAttention(nn.Module):
    """Lightning-attention layer: MHA q/k/v, qk-norm, partial RoPE, decayed linear attention
    with an fp32 state, gated group norm, output projection."""

    def __init__(self, config: BailingMoeLinearV2Config, layer_idx: int):
        super().__init__()
        h, d = config.num_attention_heads, config.head_dim
        self.num_heads, self.head_dim = h, d
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.chunk_size = config.linear_chunk_size
        self.query_key_value = Linear(config.hidden_size, 3 * h * d)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(d, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.g_proj = Linear(config.hidden_size, h * d)
        self.g_norm = GatedGroupNorm(h * d, config.group_norm_size, config.rms_norm_eps)
        self.dense = Linear(h * d, config.hidden_size)
        # not a buffer: HF loading materialises non-persistent buffers from the meta device
        self.log_decay_values = linear_log_decay(config, layer_idx)
        self._log_decay_on: dict[torch.device, torch.Tensor] = {}   # the same values, one tensor a device

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-request state: S at the last chunk boundary [H, D, D] and the pending k/v of
        the partial chunk [H, C, 2D], both fp32."""
        h, d = self.num_heads, self.head_dim
        return (h, d, d), (h, self.chunk_size, 2 * d)

    def fused_groups(self) -> list[list[torch.Tensor]]:
        """Projections of one input, for an inference engine's `K.prepack_fused`."""
        return [[self.query_key_value.weight, self.g_proj.weight]]

    def forward(self, x: torch.Tensor, batch: BatchMeta, positions: torch.Tensor, state=None) -> torch.Tensor:
        n = x.shape[0]
        h, d = self.num_heads, self.head_dim
        fused = K.fused_linear(x, [self.query_key_value.weight, self.g_proj.weight])
        if fused is not None:           # an inference engine prepared this layer
            qkv, gate = fused
            q, k = _qk_norm_rope_together(self, qkv, h, h, positions)
            v = qkv[:, 2 * h * d:3 * h * d].view(n, h, d)
        else:
            gate = None
            q, k, v = self.query_key_value(x).view(n, 3, h, d).unbind(1)
            q, k = _qk_norm_rope_apart(self, q, k, positions)
        log_decay = self._log_decay_on.get(x.device)
        if log_decay is None:   # one tensor a device, so a backend can keep tables derived from it
            log_decay = torch.tensor(self.log_decay_values, dtype=torch.float32, device=x.device)
            self._log_decay_on[x.device] = log_decay
        o = K.lightning_attention(q, k, v, log_decay, batch, state, self.chunk_size)
        o = self.g_norm(o.reshape(n, h * d), self.g_proj(x) if gate is None else gate)
        return self.dense(o)


class SoftmaxAttention(nn.Module):
    """Causal GQA softmax attention over the paged KV cache, qk-norm, partial RoPE."""

    def __init__(self, config: BailingMoeLinearV2Config, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d = config.head_dim
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.query_key_value = Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * d)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(d, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.dense = Linear(self.num_heads * d, config.hidden_size)

    def fused_groups(self) -> list[list[torch.Tensor]]:
        """For an inference engine's `K.prepack_fused` (a group of one: the prepared copy also
        tells the layer that it runs in that engine)."""
        return [[self.query_key_value.weight]]

    def forward(self, x: torch.Tensor, batch: BatchMeta, positions: torch.Tensor, kv_cache=None) -> torch.Tensor:
        n, d = x.shape[0], self.head_dim
        hq, hkv = self.num_heads, self.num_kv_heads
        fused = K.fused_linear(x, [self.query_key_value.weight])
        qkv = self.query_key_value(x) if fused is None else fused[0]
        v = qkv[:, (hq + hkv) * d:].view(n, hkv, d)
        if fused is not None:           # an inference engine prepared this layer
            q, k = _qk_norm_rope_together(self, qkv, hq, hkv, positions)
        else:
            q, k = _qk_norm_rope_apart(self, qkv[:, : hq * d].view(n, hq, d),
                                       qkv[:, hq * d: (hq + hkv) * d].view(n, hkv, d), positions)
        o = K.softmax_attention(q, k, v, batch, kv_cache, d ** -0.5)
        return self.dense(o.reshape(n, self.num_heads * d))


class Router(nn.Module):
    """`mlp.gate`: fp32 router weight use, sigmoid scores, expert bias for selection only."""

    def __init__(self, config: BailingMoeLinearV2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scaling = config.norm_topk_prob, config.routed_scaling_factor

    def forward(self, x: torch.Tensor):
        return K.moe_route(x, self.weight, self.expert_bias, self.top_k, self.n_group, self.topk_group,
                           self.norm_topk_prob, self.scaling)


class MoE(nn.Module):
    def __init__(self, config: BailingMoeLinearV2Config):
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
                               if config.num_shared_experts else None)

    def forward(self, x: torch.Tensor, trace=None) -> torch.Tensor:
        weights, ids, logits = self.gate(x)
        if trace is not None:
            trace("router", logits)
        routed = K.moe_experts(x, ids, weights,
                               [e.gate_proj.weight for e in self.experts],
                               [e.up_proj.weight for e in self.experts],
                               [e.down_proj.weight for e in self.experts])
        if trace is not None:
            trace("experts", routed)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(x)
        return routed
