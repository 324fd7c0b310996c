"""`TrainerConfig`: the `trainer:` section of a run config (pydantic, `extra="forbid"`).

Owned by `trainer/`; the run config composes it. Everything the DeepSpeed engine, the
optimizer, the LR schedule and the micro-batching read is here, documented at its field.
Validation errors name the field (`trainer.zero_stage`, ...).

Example::

    trainer:
      zero_stage: 2
      micro_batch_size: 4
      lr: 1.0e-6
      warmup_steps: 10
      scheduler: cosine
      total_steps: 500
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    zero_stage: Literal[1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 1 optimizer state, "
                                         "2 + gradients, 3 + parameters partitioned across ranks")
    micro_batch_size: int = Field(4, ge=1, description="rows per forward/backward pass; changes no "
                                  "logprob bit (the forward is batch-invariant), only memory/speed")
    forward_micro_batch_size: int | None = Field(None, ge=1, description="rows per no-grad forward "
                                                 "(forward_logprobs, recompute); None = micro_batch_size")
    lr: float = Field(1e-6, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay, applied to "
                                "matrices only (not to norm weights)")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 disables")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR after warmup: constant, linear decay or cosine decay to "
        "min_lr_ratio * lr at total_steps")
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 over this many optimizer steps")
    total_steps: int | None = Field(None, ge=1, description="optimizer steps of the run; required by "
                                    "the linear and cosine schedules")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final LR of a decaying schedule, as a "
                                "fraction of lr")
    bf16: bool = Field(True, description="bf16 parameters and compute with fp32 master weights, "
                       "fp32 gradient accumulation; false = fp32 everywhere")
    grad_reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of the cross-rank gradient reduction under bf16 (fp32: 2x the "
        "bytes, no bf16 rounding of the sum)")
    seed: int = Field(0, description="seeds torch/python/numpy on every rank and the value-head init")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads per rank; None "
                                    "leaves the process default (Ray actors: 1). Logprobs do not "
                                    "depend on it; gradients are only run-to-run deterministic at "
                                    "a fixed value")
    value_head_std: float | None = Field(None, gt=0, description="critic value-head init std; None "
                                         "= 1/sqrt(hidden+1)")
    dist_timeout_s: int = Field(600, ge=1, description="torch.distributed collective timeout")

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainerConfig:
        if self.scheduler != "constant" and self.total_steps is None:
            raise ValueError(f"trainer.total_steps: required by trainer.scheduler={self.scheduler!r}")
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            raise ValueError(f"trainer.warmup_steps ({self.warmup_steps}) exceeds "
                             f"trainer.total_steps ({self.total_steps})")
        return self

    @property
    def forward_rows(self) -> int:
        return self.forward_micro_batch_size or self.micro_batch_size

    @classmethod
    def coerce(cls, value: TrainerConfig | dict | None) -> TrainerConfig:
        """A config, a plain dict (e.g. from YAML or across Ray) or None (defaults)."""
        if isinstance(value, cls):
            return value
        return cls.model_validate(value or {})
