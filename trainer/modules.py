"""The nn.Modules the DeepSpeed engines wrap: policy (actor/reference) and critic.

`PolicyModule` wraps `BailingMoeLinearV2ForCausalLM` so that the engine's `forward` is the
trainer forward `sequence_logprobs` (the kernel-set path whose bits the rollout reproduces).
`ValueModule` is the critic: the same backbone plus a value head `Linear(hidden, 1)`.

Alignment (both): column t of the output refers to token t predicted from positions < t, i.e.
`logprobs[b, t] = log p(ids[b, t] | ids[b, :t])` and `values[b, t] = V(ids[b, :t])` read from
the hidden state at position t - 1, for 1 <= t < len_b; 0 elsewhere. So `response_mask[b, t]`
selects the same tokens for both.

ZeRO-3: parameters are gathered by hooks on the module whose `forward` uses them. The model
reads the experts' and lm_head's weights directly (not through their own forward), and so does
the critic its value head, so `prepare_zero3` makes each MoE block a ZeRO-3 leaf (gathered
whole) and registers lm_head's / the value head's weight with the wrapper.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rl import kernels as K
from rl.kernels import BatchMeta
from rl.model import BailingMoeLinearV2ForCausalLM, BailingMoeLinearV2Model
from rl.model.checkpoint import check_state_dict, load_model, read_state_dict
from rl.model.config import load_model_config
from rl.model.layers import MoE


def _zero3_leaf_moe(module: nn.Module) -> None:
    from deepspeed.utils import set_z3_leaf_modules
    set_z3_leaf_modules(module, [MoE])


class PolicyModule(nn.Module):
    """Engine wrapper: forward(input_ids [B, T], lengths [B]) -> logprobs [B, T] fp32
    (and entropy [B, T] with `with_entropy`), exactly `model.sequence_logprobs`."""

    def __init__(self, lm: BailingMoeLinearV2ForCausalLM):
        super().__init__()
        self.lm = lm

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype) -> "PolicyModule":
        return cls(load_model(path, dtype=dtype))

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, lengths, temperature: float = 1.0, with_entropy: bool = False):
        return self.lm.sequence_logprobs(input_ids, lengths, temperature, with_entropy=with_entropy)

    def prepare_zero3(self) -> None:
        from deepspeed.runtime.zero import register_external_parameter
        _zero3_leaf_moe(self)
        register_external_parameter(self, self.lm.lm_head.weight)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """HF key names (the released checkpoints'), as the forward uses them."""
        return self.lm.state_dict()

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        check_state_dict(self.lm, tensors, where)
        self.lm.load_state_dict(tensors, strict=True)


class ValueModule(nn.Module):
    """Critic: Ring-linear backbone + value head. forward(input_ids, lengths) -> values [B, T] fp32.

    Checkpoints keep the causal LM's key names for the backbone (`model.*`) plus
    `value_head.weight`; loading a policy checkpoint takes its backbone, drops `lm_head` and
    initialises the head (normal, `std`, seeded)."""

    def __init__(self, backbone: BailingMoeLinearV2Model):
        super().__init__()
        self.model = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1, bias=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype, std: float | None = None,
                        seed: int = 0) -> "ValueModule":
        path = Path(path)
        config = load_model_config(path)
        module = cls(BailingMoeLinearV2Model(config))
        gen = torch.Generator().manual_seed(seed)
        std = std if std is not None else (config.hidden_size + 1) ** -0.5
        with torch.no_grad():
            module.value_head.weight.copy_(torch.randn(module.value_head.weight.shape, generator=gen) * std)
        if path.is_dir():
            tensors = read_state_dict(path)
            if "value_head.weight" not in tensors:  # a policy checkpoint: take its backbone
                tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
                tensors["value_head.weight"] = module.value_head.weight.detach().clone()
            module.load_hf_state_dict(tensors, str(path))
        return module.to(dtype=dtype)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, lengths, temperature: float = 1.0, with_entropy: bool = False):
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=input_ids.device)
        bsz, seqlen = input_ids.shape
        valid = torch.arange(seqlen, device=input_ids.device)[None, :] < lengths[:, None]
        hidden = self.model.forward_tokens(input_ids[valid], BatchMeta.from_lengths(lengths, device=input_ids.device))
        has_next = valid.clone()
        has_next[torch.arange(bsz), lengths - 1] = False
        values = K.linear(hidden[has_next[valid]], self.value_head.weight, out_dtype=torch.float32)[:, 0]
        dst = torch.zeros_like(valid)
        dst[:, 1:] = has_next[:, :-1]
        out = torch.zeros((bsz, seqlen), dtype=torch.float32, device=input_ids.device)
        return out.index_put(dst.nonzero(as_tuple=True), values)

    def prepare_zero3(self) -> None:
        from deepspeed.runtime.zero import register_external_parameter
        _zero3_leaf_moe(self)
        register_external_parameter(self, self.value_head.weight)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        check_state_dict(self, tensors, where)
        self.load_state_dict(tensors, strict=True)
