"""BailingMoeLinearV2Config: the Ring-linear hybrid model's HF config, with validation.

Field names follow the released Ring-linear-2.0 `config.json`, so real checkpoints load
unchanged. `load_model_config(path)` is the strict loader the CLI and tests use: unknown
fields and invalid values raise `ValueError` naming the field and what is allowed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import PretrainedConfig

DECAY_FORMS = ("engine", "hf")
SCORE_FUNCTIONS = ("sigmoid",)

# HF bookkeeping fields a real config.json may carry; accepted and ignored.
HF_META_FIELDS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "attention_dropout", "output_dropout", "embedding_dropout", "output_router_logits",
    "use_rmsnorm", "rope_scaling", "rope_parameters", "router_dtype", "moe_shared_expert_intermediate_size",
    "use_qkv_bias", "use_bias", "hidden_act", "linear_silu", "head_dim_linear", "max_window_layers",
    "num_nextn_predict_layers", "mtp_loss_scaling_factor", "using_split_qkv_in_self_attention",
    "use_linear_silu", "rope_interleave", "kv_lora_rank", "tie_word_embeddings", "_name_or_path",
}


class BailingMoeLinearV2Config(PretrainedConfig):
    model_type = "bailing_moe_linear"

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int = 128,
        layer_group_size: int = 5,
        group_norm_size: int = 4,
        use_qk_norm: bool = True,
        partial_rotary_factor: float = 0.5,
        rope_theta: float = 1e6,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 32768,
        first_k_dense_replace: int = 1,
        num_experts: int = 256,
        num_experts_per_tok: int = 8,
        num_shared_experts: int = 1,
        moe_intermediate_size: int = 512,
        score_function: str = "sigmoid",
        moe_router_enable_expert_bias: bool = True,
        n_group: int = 8,
        topk_group: int = 4,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 2.5,
        linear_decay_form: str = "engine",
        linear_chunk_size: int = 64,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.layer_group_size = layer_group_size
        self.group_norm_size = group_norm_size
        self.use_qk_norm = use_qk_norm
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.first_k_dense_replace = first_k_dense_replace
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.score_function = score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.linear_decay_form = linear_decay_form
        self.linear_chunk_size = linear_chunk_size
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_fields()

    # softmax layers at (i+1) % layer_group_size == 0, linear attention elsewhere
    def is_softmax_layer(self, layer: int) -> bool:
        return (layer + 1) % self.layer_group_size == 0

    def layer_kinds(self) -> list[str]:
        return ["attention" if self.is_softmax_layer(i) else "linear_attention"
                for i in range(self.num_hidden_layers)]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def validate_fields(self) -> None:
        def need(cond: bool, field: str, allowed: str) -> None:
            if not cond:
                raise ValueError(f"model config: invalid {field}={getattr(self, field)!r}; allowed: {allowed}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "layer_group_size",
                  "group_norm_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "n_group", "topk_group", "max_position_embeddings", "linear_chunk_size"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, "a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"a divisor of num_attention_heads ({self.num_attention_heads})")
        need(self.head_dim % 2 == 0, "head_dim", "an even integer")
        need(0 < self.partial_rotary_factor <= 1 and self.rotary_dim % 2 == 0, "partial_rotary_factor",
             "a value in (0, 1] giving an even number of rotary dims")
        need((self.num_attention_heads * self.head_dim) % self.group_norm_size == 0, "group_norm_size",
             f"a divisor of num_attention_heads*head_dim ({self.num_attention_heads * self.head_dim})")
        need(self.num_experts % self.n_group == 0, "n_group", f"a divisor of num_experts ({self.num_experts})")
        need(self.topk_group <= self.n_group, "topk_group", f"<= n_group ({self.n_group})")
        need(self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok", f"<= num_experts ({self.num_experts})")
        need(self.num_experts // self.n_group >= 2 or self.n_group == 1, "n_group",
             "at most num_experts/2 (group score is the sum of a group's top-2)")
        need(self.num_experts_per_tok <= self.topk_group * (self.num_experts // self.n_group), "num_experts_per_tok",
             "<= topk_group * experts per group")
        need(self.score_function in SCORE_FUNCTIONS, "score_function", ", ".join(SCORE_FUNCTIONS))
        need(self.linear_decay_form in DECAY_FORMS, "linear_decay_form", ", ".join(DECAY_FORMS))
        need(isinstance(self.first_k_dense_replace, int) and 0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             "first_k_dense_replace", "an integer in [0, num_hidden_layers]")
        need(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0, "num_shared_experts",
             "an integer >= 0")
        need(self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps), "rms_norm_eps", "a positive float")
        need(self.rope_theta > 0, "rope_theta", "a positive float")


KNOWN_FIELDS = set(BailingMoeLinearV2Config().to_dict()) | HF_META_FIELDS


def load_model_config(path: str | Path) -> BailingMoeLinearV2Config:
    """Read a model config JSON (a file or a checkpoint directory) strictly."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"model config not found: {file}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if data.get("model_type", "bailing_moe_linear") != "bailing_moe_linear":
        raise ValueError(f"{file}: model_type {data['model_type']!r} is not 'bailing_moe_linear' "
                         f"(architecture {data.get('architectures')}): lockstep runs Ring-linear models only")
    unknown = sorted(set(data) - KNOWN_FIELDS)
    if unknown:
        allowed = ", ".join(sorted(KNOWN_FIELDS - HF_META_FIELDS))
        raise ValueError(f"{file}: unknown model config field(s) {unknown}; allowed fields: {allowed}")
    try:
        return BailingMoeLinearV2Config(**data)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
