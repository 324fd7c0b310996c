"""BailingMoeLinearV2ForCausalLM (Ring-linear 2.0) as a transformers PreTrainedModel.

Architecture only (DESIGN.md §3); all math is in `rl.kernels` via `rl.model.layers`.
One forward for everyone: `forward_tokens(input_ids [N], batch, caches)` over flat tokens
(the vLLM layout). The trainer's full-sequence forward is the case with no caches and
`context_lens == 0`; the reference decoder and the vLLM plugin pass per-layer caches.
HF `forward(input_ids [B, T], attention_mask)` packs the rows and calls the same path.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from rl import kernels as K
from rl.kernels import BatchMeta
from rl.model.config import BailingMoeLinearV2Config
from rl.model.layers import MLP, GatedGroupNorm, Linear, LinearAttention, MoE, RMSNorm, Router, SoftmaxAttention
from rl.model.trace import Trace


class DecoderLayer(nn.Module):
    def __init__(self, config: BailingMoeLinearV2Config, layer_idx: int):
        super().__init__()
        self.is_softmax = config.is_softmax_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        attn_cls = SoftmaxAttention if self.is_softmax else LinearAttention
        self.attention = attn_cls(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, h, batch: BatchMeta, positions, cache=None, trace=None):
        x = self.input_layernorm(h)
        trace and trace("input_layernorm", x)
        attn = self.attention(x, batch, positions, cache)
        trace and trace("attention" if self.is_softmax else "linear_attention", attn)
        h = h + attn
        x = self.post_attention_layernorm(h)
        trace and trace("post_attention_layernorm", x)
        out = self.mlp(x, trace) if self.is_moe else self.mlp(x)
        trace and trace("moe" if self.is_moe else "mlp", out)
        return h + out


class BailingMoeLinearV2PreTrainedModel(PreTrainedModel):
    config_class = BailingMoeLinearV2Config
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (Linear, Router)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (RMSNorm, GatedGroupNorm)):
            module.weight.fill_(1.0)


class BailingMoeLinearV2Model(BailingMoeLinearV2PreTrainedModel):
    def __init__(self, config: BailingMoeLinearV2Config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward_tokens(self, input_ids: torch.Tensor, batch: BatchMeta, caches=None,
                       trace: Trace | None = None) -> torch.Tensor:
        """input_ids [N] (flat, per `batch`) -> final-norm hidden states [N, hidden].

        `caches[l]` is layer l's cache (softmax: kv_cache tensor; linear: (S, pending)),
        or None everywhere for the trainer's full forward (context_lens must be 0).
        """
        return self.run_layers(self.word_embeddings(input_ids), [batch] * len(self.layers), batch.positions(),
                               caches, trace)

    def run_layers(self, h: torch.Tensor, batches: list[BatchMeta], positions: torch.Tensor, caches=None,
                   trace: Trace | None = None) -> torch.Tensor:
        """Embedded tokens h [N, hidden] through every layer (layer l with `batches[l]` and
        `caches[l]`: an inference engine may keep one metadata per KV-cache group) and the
        final norm -> hidden states [N, hidden]."""
        for idx, layer in enumerate(self.layers):
            cache = None if caches is None else caches[idx]
            h = layer(h, batches[idx], positions, cache, trace.scope(idx) if trace is not None else None)
        h = self.norm(h)
        if trace is not None:
            trace.scope(len(self.layers))("final_norm", h)
        return h


class BailingMoeLinearV2ForCausalLM(BailingMoeLinearV2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: BailingMoeLinearV2Config):
        super().__init__(config)
        self.model = BailingMoeLinearV2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    # -- the flat path (trainer, reference decoder, vLLM plugin) --------------------------
    def forward_tokens(self, input_ids, batch: BatchMeta, caches=None, trace=None):
        return self.model.forward_tokens(input_ids, batch, caches, trace)

    def prepack_for_inference(self) -> int:
        """An inference engine's call after (re)loading weights: projection, router and lm_head
        weights into the kernels' packed layout, the projections of one input (q/k/v + output gate, an MLP's
        gate + up) as one packed product, and each MoE layer's experts stacked (cpu; same bits,
        less work per decode step). Never for a trainer: its weights change without the engine knowing.
        A pack of a weight changed in place since is ignored by the kernels. Returns the
        number of packed projections."""
        routed = {id(e) for m in self.modules() if isinstance(m, MoE) for e in m.experts}   # moe_experts' own
        groups = [g for m in self.modules() if isinstance(m, (LinearAttention, SoftmaxAttention, MLP)) and id(m) not in routed
                  for g in m.fused_groups()]
        fused = {id(w) for g, kept in zip(groups, K.prepack_fused(groups)) if kept for w in g}
        count = len(fused) + K.prepack(m.weight for m in self.modules()
                                       if isinstance(m, (Linear, Router)) and id(m.weight) not in fused)
        for m in self.modules():
            if isinstance(m, MoE):
                K.prepack_experts([e.gate_proj.weight for e in m.experts], [e.up_proj.weight for e in m.experts],
                                  [e.down_proj.weight for e in m.experts])
        return count

    def log_softmax(self, hidden: torch.Tensor, temperature: float = 1.0, trace=None) -> torch.Tensor:
        """fp32 log-probabilities [N, V] at temperature T from final hidden states."""
        lp = K.log_softmax_logits(hidden, self.lm_head.weight, temperature)
        if trace is not None:
            trace.scope(self.config.num_hidden_layers)("lm_head", lp)
        return lp

    def sequence_logprobs(self, input_ids: torch.Tensor, lengths, temperature: float = 1.0,
                          with_entropy: bool = False, trace: Trace | None = None):
        """Trainer forward. input_ids [B, T] right-padded, lengths [B] ->
        logprobs [B, T] fp32 where out[b, t] = log p(ids[b, t] | ids[b, :t]) for 1 <= t < len_b
        (0 elsewhere); with `with_entropy`, also the entropy [B, T] of the same distribution."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=input_ids.device)
        bsz, seqlen = input_ids.shape
        valid = torch.arange(seqlen, device=input_ids.device)[None, :] < lengths[:, None]
        batch = BatchMeta.from_lengths(lengths, device=input_ids.device)
        flat_ids = input_ids[valid]
        hidden = self.forward_tokens(flat_ids, batch, None, trace)
        # predict token t+1 from position t: targets are the next tokens of the same row
        has_next = valid.clone()
        has_next[torch.arange(bsz), lengths - 1] = False
        src = has_next[valid]
        targets = input_ids[:, 1:][has_next[:, :-1]]
        out = input_ids.new_zeros((bsz, seqlen), dtype=torch.float32)
        dst = torch.zeros_like(valid)
        dst[:, 1:] = has_next[:, :-1]
        if with_entropy or trace is not None:
            lp_all = self.log_softmax(hidden[src], temperature, trace)
            out = out.index_put((dst.nonzero(as_tuple=True)), lp_all.gather(1, targets[:, None])[:, 0])
            if with_entropy:
                ent = -(lp_all.exp() * lp_all).sum(-1)
                return out, out.new_zeros(out.shape).index_put(dst.nonzero(as_tuple=True), ent)
            return out
        lp = K.logprobs(hidden[src], self.lm_head.weight, targets, temperature)
        return out.index_put(dst.nonzero(as_tuple=True), lp)

    # -- HF interface ----------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """HF-style forward: fp32 logits [B, T, V]. Each row's valid tokens (attention_mask)
        must be contiguous (left or right padding). No KV cache: `generate` recomputes."""
        bsz, seqlen = input_ids.shape
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        batch = BatchMeta.from_lengths(mask.sum(1), device=input_ids.device)
        hidden = self.forward_tokens(input_ids[mask], batch)
        logits_flat = K.linear(hidden, self.lm_head.weight, out_dtype=torch.float32)
        logits = logits_flat.new_zeros((bsz, seqlen, logits_flat.shape[-1])).index_put(mask.nonzero(as_tuple=True), logits_flat)
        loss = None
        if labels is not None:
            shift = labels[:, 1:].reshape(-1)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift, ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
