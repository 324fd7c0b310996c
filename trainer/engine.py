"""DeepSpeed plumbing for the trainer: process group, engine config, optimizer, LR schedule.

Role: `TrainerWorker` calls `init_distributed` once per process and `build_engine` once per
model; nothing else in the trainer touches DeepSpeed's configuration.

Choices (why):
- bf16 parameters with fp32 master weights, fp32 gradient accumulation
  (`data_types.grad_accum_dtype`) and, by default, fp32 gradient all-reduce/reduce-scatter
  (`communication_data_type`), so neither many micro-batches nor many ranks sum in bf16.
- `managed_gradient_accumulation: false`: the trainer owns the accumulation boundary (one
  `engine.step()` per mini-batch), so the number of micro-batches may vary per call.
  Losses arrive already normalised by global (all-rank) denominators, so backward is called
  with `scale_wrt_gas=False`.
- A client `torch.optim.AdamW` (DeepSpeed's fused/CPU Adam need compiled ops), hence
  `zero_allow_untested_optimizer`.
- gloo on CPU, nccl on CUDA; the process group is created here, before DeepSpeed, so the
  same code runs under Ray actors, `torch.multiprocessing` and a single process.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import math
import os

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainerConfig


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                     timeout_s: int = 600) -> None:
    """Create the default process group (gloo on CPU, nccl with CUDA) or check the existing one."""
    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise RuntimeError(f"torch.distributed already initialised as rank {dist.get_rank()}/"
                               f"{dist.get_world_size()}, asked for {rank}/{world_size}")
        return
    os.environ.update(MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":     # a Ray GPU actor sees only its own GPU(s): LOCAL_RANK is 0 there
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def deepspeed_config(cfg: TrainerConfig, world_size: int, trainable: bool) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        # a frozen module has no optimizer state or gradients to shard: stages 1/2 mean
        # nothing for it (and DeepSpeed refuses them without an optimizer); 3 shards params
        "zero_optimization": {"stage": cfg.zero_stage if trainable or cfg.zero_stage == 3 else 0},
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if trainable:
        config.update({
            "gradient_clipping": cfg.grad_clip,
            "zero_allow_untested_optimizer": True,
            "managed_gradient_accumulation": False,
        })
        if cfg.bf16:
            config["data_types"] = {"grad_accum_dtype": "fp32"}
            config["communication_data_type"] = cfg.grad_reduce_dtype
    return config


class WarmupDecay:
    """LR multiplier at optimizer step s: linear warmup, then constant / linear / cosine decay.
    A plain callable object so `LambdaLR.state_dict()` can save it."""

    def __init__(self, cfg: TrainerConfig):
        self.kind, self.warmup = cfg.scheduler, cfg.warmup_steps
        self.total, self.floor = cfg.total_steps, cfg.min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (1.0 - self.floor) * shape


def build_optimizer(module: nn.Module, cfg: TrainerConfig):
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.adam_betas,
                                  eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(cfg))
    return optimizer, scheduler


def build_engine(module: nn.Module, cfg: TrainerConfig, world_size: int, trainable: bool):
    """`deepspeed.initialize` for a trainable (actor, critic) or frozen (reference) module."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if hasattr(module, "prepare_zero3") and cfg.zero_stage == 3:
        module.prepare_zero3()
    config = deepspeed_config(cfg, world_size, trainable)
    if not trainable:
        for p in module.parameters():
            p.requires_grad_(False)
        with contextlib.redirect_stdout(io.StringIO()):   # DeepSpeed prints memory reports
            engine, *_ = deepspeed.initialize(model=module, config=config)
        return engine
    optimizer, scheduler = build_optimizer(module, cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                          config=config)
    return engine
