"""Trainer checkpoints: an HF directory plus the state to resume bit-exactly, written atomically.

Layout of `path/`:

    config.json, model.safetensors       HF weights (bf16 as the forward uses them, released key
                                         names): `rl.model.checkpoint.load_model` and the rollout
                                         read this directory as it is
    tokenizer files                      when the run has a tokenizer
    trainer_state/trainer.json           role, step counters, world size, zero stage
    trainer_state/deepspeed/state/       DeepSpeed: fp32 master weights, optimizer and LR
                                         scheduler state (partitioned per rank under ZeRO)
    trainer_state/rng_rank{r}.pt         torch / python / numpy RNG state of rank r

Every rank writes into `.{name}.tmp/` next to `path` (a filesystem all ranks share: one
node, or a shared mount); rank 0 then swaps it into place with renames, so a crash leaves
either the old checkpoint or the new one, never a half-written one. Resuming needs the same
world size (DeepSpeed's ZeRO partitions are per rank).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from rl.model.checkpoint import check_state_dict, read_state_dict, replace_dir
from rl.model.config import load_model_config

DS_TAG = "state"
# Config fields that define the architecture: its tensors or its arithmetic (a checkpoint
# trained with another rope_theta or routing rule loads but computes something else).
ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "layer_group_size",
               "group_norm_size", "use_qk_norm", "partial_rotary_factor", "rope_theta", "rms_norm_eps",
               "first_k_dense_replace", "num_experts", "num_experts_per_tok", "num_shared_experts",
               "moe_intermediate_size", "score_function", "moe_router_enable_expert_bias", "n_group",
               "topk_group", "norm_topk_prob", "routed_scaling_factor", "linear_decay_form",
               "linear_chunk_size", "tie_word_embeddings")


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def staging_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp"


def write_hf_dir(directory: Path, tensors: dict[str, torch.Tensor], config, tokenizer=None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def begin(path: Path) -> Path:
    """Collective: rank 0 prepares an empty staging directory; returns it."""
    tmp = staging_dir(path)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer_state").mkdir(parents=True)
    _barrier()
    return tmp


def commit(path: Path) -> None:
    """Collective: after every rank has written, rank 0 renames the staging dir into place."""
    _barrier()
    if _rank() == 0:
        replace_dir(staging_dir(path), path)
    _barrier()


def check_compatible(path: Path, config, expected_shapes: dict[str, tuple] | None = None,
                     need_trainer_state: bool = True) -> None:
    """Raise ValueError naming the first architecture field (or tensor: missing, unexpected,
    mis-shaped) that differs between the checkpoint at `path` and the running model."""
    if not (path / "config.json").exists():
        raise ValueError(f"checkpoint {path}: no config.json (not a checkpoint directory)")
    if need_trainer_state and not (path / "trainer_state" / "trainer.json").exists():
        raise ValueError(f"checkpoint {path}: no trainer_state/ (an HF weights directory, not a trainer "
                         f"checkpoint); start a worker with it as model_path instead")
    theirs = load_model_config(path)
    for field in ARCH_FIELDS:
        mine, other = getattr(config, field, None), getattr(theirs, field, None)
        if mine != other:
            raise ValueError(f"checkpoint {path}: architecture mismatch in {field}: checkpoint has "
                             f"{other!r}, the running model has {mine!r}")
    if expected_shapes is not None:
        check_shapes(expected_shapes, read_state_dict(path), str(path))


def check_shapes(expected: dict[str, tuple], tensors: dict[str, torch.Tensor], where: str) -> None:
    """`rl.model.checkpoint.check_state_dict` for a model whose tensors may be ZeRO-3 partitioned."""
    check_state_dict(_ShapeOnly(expected), tensors, where)


class _ShapeOnly:
    """Stands in for a model in `check_state_dict`: only its tensor names and shapes."""

    def __init__(self, shapes: dict[str, tuple]):
        self.shapes = shapes

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(shape, device="meta") for k, shape in self.shapes.items()}


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state" / "trainer.json").read_text())


def write_trainer_state(tmp: Path, state: dict) -> None:
    (tmp / "trainer_state" / "trainer.json").write_text(json.dumps(state, indent=1))
