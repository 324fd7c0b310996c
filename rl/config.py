"""The run config: typed (pydantic), loaded from YAML, with dotted CLI overrides.

    lockstep train --config configs/grpo_arith_tiny.yaml trainer.zero_stage=3 algo.name=ppo

The run config composes the components' own configs (trainer.TrainerConfig,
rl.algos.AlgoConfig, rewards.RewardConfig) with the driver's sections defined here. Unknown
keys and bad values fail before anything starts, naming the dotted key and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewards.config import RewardConfig
from rl.algos import AlgoConfig
from rl.overrides import ConfigError, validate  # noqa: F401  (ConfigError is part of this API)
from trainer.config import TrainerConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Strict):
    path: str = Field(..., description="checkpoint directory, or a model config JSON (random init)")
    kernels: Literal["lockstep", "stock"] = Field("lockstep", description="kernel mode for trainer and rollout")


class DataSection(Strict):
    task: Literal["arith", "code", "gsm8k", "jsonl"] = Field("arith", description="prompt source")
    path: str | None = Field(None, description="JSONL file for gsm8k/jsonl tasks")
    digits: int = Field(2, ge=1, le=6, description="arith: operand digits")
    ops: str = Field("+", description="arith: operators, a subset of '+-*'")
    eval_size: int = Field(200, ge=0, description="held-out problems for evaluation")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at start and end)")
    eval_samples: int = Field(4, ge=1, description="samples per held-out problem for the sampled accuracy")

    @model_validator(mode="after")
    def _check(self):
        if self.task in ("gsm8k", "jsonl") and not self.path:
            raise ValueError(f"data.path is required for data.task={self.task!r}")
        if set(self.ops) - set("+-*") or not self.ops:
            raise ValueError(f"data.ops={self.ops!r}: use a non-empty subset of '+-*'")
        return self


class RolloutSection(Strict):
    num_workers: int = Field(1, ge=1, description="rollout actors (each one vLLM engine)")
    prompts_per_step: int = Field(16, ge=1, description="prompts sampled per RL step")
    n_samples: int = Field(8, ge=1, description="samples per prompt (the GRPO group size)")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    engine: dict[str, Any] = Field(default_factory=dict, description="vLLM engine kwargs (max_num_batched_tokens, ...)")
    max_retries: int = Field(2, ge=0, description="retries of a step's rollout after an actor death")


class AlignmentSection(Strict):
    on_drift: Literal["warn", "correct", "abort"] = Field("warn", description="what a drifting step does")
    threshold: float = Field(0.0, ge=0, description="max |Δlogprob| tolerated before on_drift acts")
    correction: Literal["tis", "mis_seq", "mis_geo", "icepop"] = Field(
        "tis", description="IS correction switched on by on_drift=correct")


class PlacementSection(Strict):
    colocate: bool = Field(True, description="rollout and trainer share the node's CPUs/GPUs")
    trainer_world_size: int = Field(1, ge=1, description="trainer ranks (one Ray actor each)")
    cpus_per_actor: float = Field(0.5, gt=0, description="Ray CPU reservation per actor")
    gpus_per_actor: float = Field(0.0, ge=0, description="Ray GPU reservation per actor")


class RunSection(Strict):
    steps: int = Field(20, ge=1)
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end/on signal)")
    output_dir: str = Field("runs", description="runs/<name>/ holds metrics, report and checkpoints")
    dry_run: bool = Field(False, description="validate and print the placement plan, start nothing")


class LoggingSection(Strict):
    wandb_project: str | None = Field(None, description="set to log online to this W&B project")
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline")
    report_every: int = Field(1, ge=1, description="refresh the PNG report every N steps")


class RayConfig(Strict):
    address: str | None = Field(None, description="existing cluster (None: start a local one)")
    num_cpus: int | None = Field(None, ge=1, description="local cluster CPUs (None: Ray decides)")


class RunConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="run name: runs/<name>/")
    seed: int = 0
    model: ModelSection
    data: DataSection = Field(default_factory=DataSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    alignment: AlignmentSection = Field(default_factory=AlignmentSection)
    placement: PlacementSection = Field(default_factory=PlacementSection)
    run: RunSection = Field(default_factory=RunSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.name


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return validate(RunConfig, path, overrides)
