"""`TrainerWorker`: one rank of a DeepSpeed ZeRO trainer, usable as a Ray actor.

Role (DESIGN.md §5): the RL driver holds one `TrainerGroup` (trainer/group.py) per role, each
a set of these workers, one per rank:

    actor      the policy: forward_logprobs, train_step (PPO/GRPO loss from rl.algos)
    critic     value head on the same architecture: forward_values, train_step (value loss)
    reference  the frozen policy for KL: forward_logprobs only

`sft_step` trains the actor on response-token cross-entropy (the `lockstep sft` warm start).

The forward is `model.sequence_logprobs`, which is bitwise batch-invariant, so micro-batch size,
ZeRO stage and world size change no logprob bit: `forward_logprobs` equals what the rollout
reports at the same weights. A training step is: validate the batch (on every rank, before any
collective) -> [recompute pi_old] -> for each epoch and mini-batch: micro-batch forward/backward
with losses normalised by global counts -> one `engine.step()`. A step whose gradients are
non-finite is skipped by DeepSpeed and counted; the weights never see a NaN.

Run in-process (world size 1) or as `ray.remote(TrainerWorker)`:

    w = TrainerWorker("actor", "configs/model/tiny.json", {"zero_stage": 2}, {"name": "grpo"})
    metrics = w.train_step(batch)
"""
from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rl.algos import AlgoConfig
from trainer import checkpoint as ckpt
from trainer.batch import (as_batch, check_tokens, check_training, dummy_rows, num_rows, row_chunks, take_rows,
                           to_device)
from trainer.config import TrainerConfig
from trainer.engine import build_engine, init_distributed
from trainer.modules import PolicyModule, ValueModule
from trainer.objectives import MetricAccumulator, Objective, PolicyObjective, SFTObjective, ValueObjective
from trainer.step import accumulate

ROLES = ("actor", "critic", "reference")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TrainerWorker:
    def __init__(self, role: str, model_path: str, trainer_cfg: TrainerConfig | dict | None = None,
                 algo_cfg: AlgoConfig | dict | None = None, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 29500):
        if role not in ROLES:
            raise ValueError(f"role: {role!r} is not one of {', '.join(ROLES)}")
        self.role, self.rank, self.world_size = role, rank, world_size
        self.model_path = Path(model_path)
        self.cfg = TrainerConfig.coerce(trainer_cfg)
        self.algo = algo_cfg if isinstance(algo_cfg, AlgoConfig) else AlgoConfig.model_validate(algo_cfg or {})
        if self.cfg.num_threads is not None:
            torch.set_num_threads(self.cfg.num_threads)
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed % 2**32)
        init_distributed(rank, world_size, master_addr, master_port, self.cfg.dist_timeout_s)

        dtype = torch.bfloat16 if self.cfg.bf16 else torch.float32
        if role == "critic":
            module = ValueModule.from_pretrained(model_path, dtype, self.cfg.value_head_std, self.cfg.seed)
        else:
            module = PolicyModule.from_pretrained(model_path, dtype)
        self.objective: Objective | None = None
        self.set_algo(self.algo)
        self.model_config = module.config
        self.shapes = {k: tuple(v.shape) for k, v in module.hf_state_dict().items()}
        self.engine = build_engine(module, self.cfg, world_size, trainable=self.objective is not None)
        self.module = self.engine.module
        self.device = self.engine.device
        self.steps = 0            # optimizer steps attempted (applied + skipped)

    def set_algo(self, algo_cfg: AlgoConfig | dict) -> None:
        """Switch the algorithm config for the next steps (the driver does this to recompute
        pi_old with an IS correction when drift appears). Collective only in that every rank
        must get the same config."""
        self.algo = algo_cfg if isinstance(algo_cfg, AlgoConfig) else AlgoConfig.model_validate(algo_cfg)
        if self.role == "actor":
            self.objective = PolicyObjective(self.algo)
        elif self.role == "critic":
            self.objective = ValueObjective(self.algo)

    # -- forwards --------------------------------------------------------------------------
    def forward_logprobs(self, batch: dict) -> torch.Tensor:
        """input_ids [B, T], lengths [B], temperature -> logprobs [B, T] fp32, bit-equal to
        `model.sequence_logprobs` at the current weights whatever the micro-batch size."""
        if self.role == "critic":
            raise ValueError("forward_logprobs: the critic has no lm_head; use forward_values")
        return self._forward(batch)

    def forward_values(self, batch: dict) -> torch.Tensor:
        """Critic values [B, T] fp32, aligned like logprobs (column t: state before token t)."""
        if self.role != "critic":
            raise ValueError(f"forward_values: role {self.role!r} has no value head")
        return self._forward(batch)

    @torch.no_grad()
    def _forward(self, batch: dict) -> torch.Tensor:
        batch = as_batch(batch)
        self._agree(lambda: check_tokens(batch))
        bsz, seqlen = batch["input_ids"].shape
        out = torch.zeros((bsz, seqlen), dtype=torch.float32)
        chunks = row_chunks(bsz, self.cfg.forward_rows)
        # ZeRO-3 gathers parameters with collectives inside the forward: equal counts per rank.
        count = self._max_over_ranks(len(chunks)) if self.cfg.zero_stage == 3 else len(chunks)
        temp = float(batch.get("temperature", 1.0))
        for i in range(count):
            mb = to_device(take_rows(batch, chunks[i]) if i < len(chunks) else dummy_rows(), self.device)
            lp = self.engine(mb["input_ids"], mb["lengths"], temp)
            if i < len(chunks):
                out[chunks[i]] = lp
        return out

    # -- training --------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """One RL update on this rank's rows. Returns reduced metrics (identical on every rank)
        plus `pre_update_{logprobs|values}` [B, T] with `pre_update_rows` [B] bool: this rank's
        outputs at the pre-update weights, free by-products of the first forward."""
        if self.objective is None:
            raise ValueError(f"train_step: role {self.role!r} is frozen")
        return self._optimize(batch, self.objective)

    def sft_step(self, batch: dict) -> dict:
        """One supervised step: response-token NLL (token-mean over all ranks) on
        input_ids/lengths/response_mask; one optimizer step."""
        if self.role != "actor":
            raise ValueError(f"sft_step: needs role 'actor', this worker is {self.role!r}")
        return self._optimize(batch, SFTObjective())

    def _optimize(self, batch: dict, objective: Objective) -> dict:
        batch = as_batch(batch)
        bsz = num_rows(batch)

        def validate():
            if bsz == 0:
                raise ValueError("empty batch: no rows on this rank")
            check_training(batch, objective.required)
            if bsz % objective.num_minibatches:
                raise ValueError(f"batch of {bsz} rows does not split into algo.num_minibatches="
                                 f"{objective.num_minibatches} equal mini-batches")
        self._agree(validate)
        out_name = objective.output_name
        pre = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        pre_rows = torch.zeros(bsz, dtype=torch.bool)
        minis = row_chunks(bsz, bsz // objective.num_minibatches)
        mask = batch["response_mask"].bool()
        # global denominators of each mini-batch: response tokens, non-empty sequences
        counts = torch.tensor([[float(mask[r].sum()), float(mask[r].any(1).sum())] for r in minis],
                              dtype=torch.float64)
        if self.world_size > 1:
            counts = counts.to(self.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        if bool((counts[:, 0] == 0).all()):
            raise ValueError("response_mask selects no token: the batch has zero response tokens")
        if bool((counts[:, 0] == 0).any()):
            raise ValueError(f"mini-batch {int((counts[:, 0] == 0).nonzero()[0])} of "
                             f"algo.num_minibatches={len(minis)} has zero response tokens")
        if objective.recompute_old:
            pre = self._forward(batch)
            pre_rows[:] = True
            batch = {**batch, "rollout_logprobs": batch["old_logprobs"], "old_logprobs": pre}
        metrics, grad_norms, lrs = MetricAccumulator(), [], []
        skipped_before = self.engine.skipped_steps
        for epoch in range(objective.epochs):
            for m, rows in enumerate(minis):
                record = epoch == 0 and m == 0 and not objective.recompute_old
                mini = take_rows(batch, rows)
                failure = accumulate(self.engine, objective, mini, float(counts[m, 0]),
                                     float(counts[m, 1]), self.cfg.micro_batch_size, metrics,
                                     pre[rows] if record else None, self.world_size,
                                     self._max_over_ranks, self.rank, self.device)
                if record:
                    pre_rows[rows] = True
                if failure:
                    metrics.notes.append(failure)
                lrs.append(self.engine.get_lr()[0])
                self.engine.step()
                self.steps += 1
                norm = self.engine.get_global_grad_norm()
                grad_norms.append(float("nan") if norm is None else float(norm))
        num_steps = objective.epochs * len(minis)
        out = metrics.result(num_steps)
        skipped = self.engine.skipped_steps - skipped_before
        finite_norms = [g for g in grad_norms if np.isfinite(g)]
        out.update({
            "grad_norm": float(np.mean(finite_norms)) if finite_norms else float("nan"),
            "lr": lrs[-1], "num_steps": num_steps, "skipped_steps": skipped,
            "global_step": self.steps, "num_response_tokens": float(counts[:, 0].sum()),
            f"pre_update_{out_name}": pre, "pre_update_rows": pre_rows,
        })
        return out

    # -- weights and checkpoints -----------------------------------------------------------
    def get_weights(self, only_rank0: bool = False) -> dict[str, torch.Tensor]:
        """Full weights with HF names, in the dtype the forward uses (bf16), gathered across
        ZeRO-3 shards (a collective: call on every rank). `only_rank0`: other ranks return {}."""
        with self._gathered():
            if only_rank0 and self.rank != 0:
                return {}
            return {k: v.detach().clone() for k, v in self.module.hf_state_dict().items()}

    def _gathered(self, modifier_rank: int | None = None):
        """Full parameters inside the block under ZeRO-3 (a collective); a no-op otherwise.
        With `modifier_rank`, that rank's in-place changes are broadcast on exit."""
        if self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=modifier_rank)

    def save(self, path: str, tokenizer=None) -> str:
        """Atomic checkpoint (see trainer/checkpoint.py): HF weights + optimizer, scheduler and
        RNG state. Collective: call on every rank with the same path."""
        path = Path(path)
        tmp = ckpt.begin(path)
        if self.objective is not None:
            self.engine.save_checkpoint(str(tmp / "trainer_state" / "deepspeed"), tag=ckpt.DS_TAG,
                                        save_latest=False)
        torch.save(ckpt.rng_state(), tmp / "trainer_state" / f"rng_rank{self.rank}.pt")
        weights = self.get_weights(only_rank0=True)
        if self.rank == 0:
            ckpt.write_hf_dir(tmp, weights, self.model_config, tokenizer)
            if tokenizer is None and self.model_path.is_dir():
                for name in TOKENIZER_FILES:
                    if (self.model_path / name).exists():
                        shutil.copy(self.model_path / name, tmp / name)
            ckpt.write_trainer_state(tmp, {"role": self.role, "steps": self.steps,
                                           "world_size": self.world_size, "zero_stage": self.cfg.zero_stage})
        ckpt.commit(path)
        return str(path)

    def load(self, path: str) -> dict:
        """Resume from `save`'s directory: weights, fp32 master weights, optimizer, scheduler,
        RNG, step count. A frozen (reference) worker takes only the weights, from a trainer
        checkpoint or a plain HF directory. Raises ValueError naming an architecture mismatch
        before touching any state."""
        path = Path(path)
        trainable = self.objective is not None
        self._agree(lambda: self._check_loadable(path, trainable))
        if not trainable:
            weights = ckpt.read_state_dict(path)
            with self._gathered(modifier_rank=0):
                if self.rank == 0 or self.cfg.zero_stage != 3:
                    self.module.load_hf_state_dict(weights, str(path))
            return {"role": self.role}
        state = ckpt.read_trainer_state(path)
        load_path, _ = self.engine.load_checkpoint(
            str(path / "trainer_state" / "deepspeed"), tag=ckpt.DS_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=True, load_module_strict=True)
        if load_path is None:
            raise RuntimeError(f"checkpoint {path}: DeepSpeed found no state to load")
        ckpt.set_rng_state(torch.load(path / "trainer_state" / f"rng_rank{self.rank}.pt", weights_only=False))
        self.steps = state["steps"]
        return state

    def _check_loadable(self, path: Path, trainable: bool) -> None:
        ckpt.check_compatible(path, self.model_config, self.shapes, need_trainer_state=trainable)
        if not trainable:
            return
        state = ckpt.read_trainer_state(path)
        if state["role"] != self.role:
            raise ValueError(f"checkpoint {path}: written by role {state['role']!r}, this worker is {self.role!r}")
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {path}: written by world size {state['world_size']}, "
                             f"this group has {self.world_size} (ZeRO state is per rank)")
        if state["zero_stage"] != self.cfg.zero_stage:
            raise ValueError(f"checkpoint {path}: written with zero_stage {state['zero_stage']}, "
                             f"this worker runs zero_stage {self.cfg.zero_stage}")

    # -- collectives -------------------------------------------------------------------------
    def _agree(self, check) -> None:
        """Run `check` (raises ValueError) on every rank; if any rank fails, every rank raises
        that rank's error, so none is left waiting in a collective."""
        error = None
        try:
            check()
        except ValueError as err:
            error = err
        if self.world_size > 1:
            messages = [None] * self.world_size
            dist.all_gather_object(messages, None if error is None else str(error))
            failed = [(rank, msg) for rank, msg in enumerate(messages) if msg is not None]
            if failed and error is None:
                raise ValueError(f"rank {failed[0][0]}: {failed[0][1]}")
        if error is not None:
            raise error

    def _max_over_ranks(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def memory_stats(self) -> dict:
        """Memory of this rank: on CUDA the allocator's peak allocated / reserved bytes on its GPU
        since the process started; on CPU the process's resident set now."""
        if self.device.type == "cuda":
            return {"device": str(self.device), "max_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                    "max_reserved_bytes": torch.cuda.max_memory_reserved(self.device)}
        import psutil
        return {"device": "cpu", "rss_bytes": psutil.Process().memory_info().rss}

    def fingerprint(self) -> dict:
        """Build fingerprint of this rank (rl.model.fingerprint): what rl.run compares with the rollout's."""
        from rl.model.fingerprint import fingerprint
        return fingerprint(self.device)

    def ready(self) -> int:
        """For `TrainerGroup`: returns once construction (and the rendezvous) has finished."""
        return self.rank
