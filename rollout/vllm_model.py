"""Our Ring-linear model as a vLLM model: vLLM schedules and owns the memory, `rl.kernels` computes.

vLLM (0.32) finds this class through `rollout.vllm_plugin.register` under the architecture name
`BailingMoeLinearV2ForCausalLM`. It holds the very module the trainer runs
(`rl.model.BailingMoeLinearV2ForCausalLM`, same parameters, same dtype conversion as
`rl.model.checkpoint.load_model`) and, beside it, one cache holder per layer through which vLLM
allocates and binds the per-layer caches:

  - softmax layers: a vLLM `Attention` that is never called; vLLM allocates its paged KV cache
    (`[num_blocks, Hkv, block_size, 2*D]`, model dtype) and builds its metadata (block table,
    slot mapping), which `rl.kernels.softmax_attention` reads and writes;
  - linear-attention layers: a `MambaBase` layer of type LINEAR whose per-request state is the
    pair `(S [H, D, D] fp32, pending [H, C, 2D] fp32)` that `rl.kernels.lightning_attention`
    keeps; vLLM gives each request a state slot (`state_indices`).

Each forward turns vLLM's per-layer metadata into one `rl.kernels.BatchMeta` per KV-cache group
(groups have their own block tables) and runs our decoder layers on it. `compute_logits`
returns `log_softmax(logits / T)` in fp32 from `rl.kernels.log_softmax_logits`; the engine runs
with `logprobs_mode="raw_logits"` and samples at temperature 1.0, so the logprob vLLM reports
for a sampled token is exactly the trainer's, and the sampling distribution is softmax(logits/T).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from rl import kernels as K
from rl.kernels import BatchMeta
from rl.model.config import BailingMoeLinearV2Config
from rl.model.fingerprint import fingerprint
from rl.model.modeling import BailingMoeLinearV2ForCausalLM
from rollout.engine_trace import EngineTrace

# hf_config attributes the RolloutWorker sets through vLLM's `hf_overrides`
KERNELS_ATTR = "lockstep_kernels"
TEMPERATURE_ATTR = "lockstep_temperature"


def our_config(hf_config) -> BailingMoeLinearV2Config:
    """vLLM's hf_config is ours when the plugin registered the config class; else rebuild it."""
    if isinstance(hf_config, BailingMoeLinearV2Config):
        return hf_config
    fields = {k: v for k, v in hf_config.to_dict().items() if not k.startswith("lockstep_")}
    return BailingMoeLinearV2Config(**fields)


def linear_state_shapes(config: BailingMoeLinearV2Config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(S, pending) shapes of one request's lightning state; see LinearAttention.state_shapes."""
    h, d, c = config.num_attention_heads, config.head_dim, config.linear_chunk_size
    return (h, d, d), (h, c, 2 * d)


class LinearStateHolder(nn.Module, MambaBase):
    """Declares one linear-attention layer's per-request state to vLLM; computes nothing.

    Registered in `static_forward_context[prefix]`, which is how the runner finds the layer,
    builds a `LinearAttentionMetadata` for it and binds `self.kv_cache = (S_pool, pending_pool)`.
    """

    def __init__(self, config: BailingMoeLinearV2Config, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.shapes = linear_state_shapes(config)
        context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"duplicate layer name {prefix!r}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self):
        return self.shapes

    def get_state_dtype(self):
        return torch.float32, torch.float32


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64)


def batch_from_attention(meta, num_reqs: int, num_tokens: int) -> BatchMeta:
    """vLLM CPU attention metadata (block_table, slot_mapping, seq_lens, query_start_loc)."""
    qsl = _i64(meta.query_start_loc[: num_reqs + 1])
    seq_lens = _i64(meta.seq_lens[:num_reqs])
    return BatchMeta(query_start_loc=qsl, context_lens=seq_lens - (qsl[1:] - qsl[:-1]),
                     block_table=meta.block_table[:num_reqs],
                     slot_mapping=_i64(meta.slot_mapping[:num_tokens]), max_query_len=int(meta.max_query_len))


def batch_from_linear(meta, num_reqs: int) -> BatchMeta:
    """vLLM LinearAttentionMetadata (state_indices_tensor: one state slot per request; with no
    prefills every request is a one-token decode, which the host then knows)."""
    qsl = _i64(meta.query_start_loc[: num_reqs + 1])
    seq_lens = _i64(meta.seq_lens[:num_reqs])
    return BatchMeta(query_start_loc=qsl, context_lens=seq_lens - (qsl[1:] - qsl[:-1]),
                     state_indices=_i64(meta.state_indices_tensor[:num_reqs]),
                     max_query_len=1 if meta.num_prefills == 0 else None)


class LockstepBailingForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM entry for `BailingMoeLinearV2ForCausalLM`, computing only through `rl.kernels`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        self.config = config = our_config(hf_config)
        self.kernels_mode = getattr(hf_config, KERNELS_ATTR, "lockstep")
        K.set_kernels(self.kernels_mode)         # process-wide: this process only runs this model
        self.temperature = float(getattr(hf_config, TEMPERATURE_ATTR, 1.0))
        # exactly what rl.model.checkpoint.load_model builds (buffers converted too)
        self.lm = BailingMoeLinearV2ForCausalLM(config).to(dtype=vllm_config.model_config.dtype)
        self.lm.eval().requires_grad_(False)      # inference only: no autograd bookkeeping
        # the source / torch / triton this engine computes with (RolloutWorker compares it with its own)
        self.build = fingerprint(self.lm.lm_head.weight.device)
        self.cache_layers = nn.ModuleList()
        for i in range(config.num_hidden_layers):
            name = f"{prefix}layers.{i}.cache" if not prefix else f"{prefix}.layers.{i}.cache"
            if config.is_softmax_layer(i):
                holder = Attention(config.num_attention_heads, config.head_dim, config.head_dim ** -0.5,
                                   num_kv_heads=config.num_key_value_heads,
                                   cache_config=vllm_config.cache_config, prefix=name)
            else:
                holder = LinearStateHolder(config, name)
            self.cache_layers.append(holder)
        # set by rollout.weight_transfer: the version of a complete, verified update (None
        # for the checkpoint or while an update is in progress / failed)
        self.weight_version: int | None = None
        self.update_error: str | None = None
        self.fault: str | None = None            # test hook: makes the next forward raise
        self.trace: EngineTrace | None = None     # set by RolloutWorker.trace_engine

    # -- vLLM model interface ----------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.word_embeddings(input_ids)

    def _batches(self, attn_metadata: dict) -> tuple[list[BatchMeta], int]:
        """One BatchMeta per layer (shared by the layers of a KV-cache group) and the number
        of real tokens in this step."""
        metas = [attn_metadata[h.prefix if isinstance(h, LinearStateHolder) else h.layer_name]
                 for h in self.cache_layers]
        linear = next((m for h, m in zip(self.cache_layers, metas) if isinstance(h, LinearStateHolder)), None)
        softmax = next((m for h, m in zip(self.cache_layers, metas) if not isinstance(h, LinearStateHolder)), None)
        if linear is not None:
            num_reqs = linear.num_prefills + linear.num_decodes
            num_tokens = linear.num_prefill_tokens + linear.num_decode_tokens
        else:
            num_tokens = int(softmax.num_actual_tokens)
            num_reqs = int(torch.searchsorted(softmax.query_start_loc, num_tokens).item())
        built: dict[int, BatchMeta] = {}
        batches = []
        for holder, meta in zip(self.cache_layers, metas):
            if id(meta) not in built:
                built[id(meta)] = (batch_from_linear(meta, num_reqs) if isinstance(holder, LinearStateHolder)
                                   else batch_from_attention(meta, num_reqs, num_tokens))
            batches.append(built[id(meta)])
        return batches, num_tokens

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None, **kwargs):
        if self.fault is not None:
            raise RuntimeError(self.fault)
        num_input = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        out = torch.zeros((num_input, self.config.hidden_size), dtype=self.lm.lm_head.weight.dtype)
        attn_metadata = get_forward_context().attn_metadata
        if not attn_metadata:          # profiling / dummy runs: no caches bound to this batch
            return out
        batches, num_tokens = self._batches(attn_metadata)
        # positions from the same metadata the kernels use (equal to vLLM's `positions`)
        pos = batches[0].positions()
        h = (self.lm.model.word_embeddings(input_ids[:num_tokens]) if inputs_embeds is None
             else inputs_embeds[:num_tokens])
        caches = [holder.kv_cache for holder in self.cache_layers]
        out[:num_tokens] = self.lm.model.run_layers(h, batches, pos, caches)
        if self.trace is not None and input_ids is not None:
            self.trace.record(input_ids[:num_tokens], positions[:num_tokens], batches, caches, out[:num_tokens])
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fp32 log_softmax(logits / T) [N, V] from rl.kernels (T = 1 for greedy runs), with
        the trainer's lm_head weight (bf16) and product (`prepack` packed it for the kernels)."""
        return K.log_softmax_logits(hidden_states, self.lm.lm_head.weight, self.temperature)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names (`model.layers.{l}...`, `lm_head.weight`) copied into our module's tensors."""
        targets = dict(self.lm.state_dict(keep_vars=True))
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in targets:
                    raise ValueError(f"lockstep vLLM model: unexpected weight {name!r}")
                dst = targets[name]
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(f"lockstep vLLM model: weight {name!r} has shape "
                                     f"{tuple(tensor.shape)}, model expects {tuple(dst.shape)}")
                dst.copy_(tensor)
                loaded.add(name)
        self.prepack()
        # vLLM's strict check compares against named_parameters of this module
        return {f"lm.{n}" for n in loaded}

    def prepack(self) -> int:
        """Weights into the kernels' packed / stacked layouts (`prepack_for_inference`; same
        bits). Redone after every load."""
        return self.lm.prepack_for_inference()

    # -- hybrid-state declarations (vLLM sizes pages and copies states from these) ------------
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return linear_state_shapes(our_config(vllm_config.model_config.hf_config))

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return torch.float32, torch.float32

    @classmethod
    def get_mamba_state_copy_func(cls):
        # both tensors are whole per-slot states: prefix caching ("align" mode) copies them as is
        return get_temporal_copy_spec, get_temporal_copy_spec
