"""`TrainerGroup`: `world_size` `TrainerWorker`s of one role, driven as one trainer.

Role: the RL driver (and `lockstep sft` with world_size > 1) talks to a group, never to
single ranks. The group picks a rendezvous address, starts one Ray actor per rank (or one
local process per rank where Ray is absent: trainer/ranks.py), each joining the
torch.distributed group (gloo on CPU, nccl on GPU), shards batches by rows, fans calls out
and gathers the results.

Row sharding for `train_step`: the global batch is cut into `algo.num_minibatches` contiguous
mini-batches and each mini-batch into `world_size` contiguous pieces; rank r receives its piece
of every mini-batch. So mini-batch m holds the same rows whatever the world size, and the
world-size-1 and world-size-N runs optimise the same objective step by step.

Single node: the rendezvous address is this node's IP and a free port found here (a
multi-node group would need rank 0's node instead).
"""
from __future__ import annotations

import socket

import torch

from trainer.batch import as_batch, num_rows, take_rows
from trainer.config import TrainerConfig
from trainer.ranks import ProcessRanks, RayRanks


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def split_even(num: int, parts: int) -> list[slice]:
    """`num` rows into `parts` contiguous slices whose sizes differ by at most one."""
    base, extra = divmod(num, parts)
    out, lo = [], 0
    for p in range(parts):
        hi = lo + base + (1 if p < extra else 0)
        out.append(slice(lo, hi))
        lo = hi
    return out


def train_shards(num: int, world_size: int, num_minibatches: int) -> list[torch.Tensor]:
    """Row indices of each rank for `train_step` (see the module docstring)."""
    if num % (world_size * num_minibatches):
        raise ValueError(f"batch of {num} rows does not split into algo.num_minibatches={num_minibatches} "
                         f"mini-batches x world_size={world_size} ranks")
    per_mini = num // num_minibatches
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    for m in range(num_minibatches):
        for r, piece in enumerate(split_even(per_mini, world_size)):
            ranks[r].extend(range(m * per_mini + piece.start, m * per_mini + piece.stop))
    return [torch.tensor(rows, dtype=torch.int64) for rows in ranks]


class TrainerGroup:
    def __init__(self, role: str, model_path: str, trainer_cfg: TrainerConfig | dict | None = None,
                 algo_cfg=None, world_size: int = 1, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, master_addr: str | None = None,
                 master_port: int | None = None, launcher: str = "ray"):
        """`launcher`: "ray" (one Ray actor per rank) or "process" (local processes, for a host
        without Ray; see trainer/ranks.py)."""
        if launcher not in ("ray", "process"):
            raise ValueError(f"launcher: {launcher!r} is not 'ray' or 'process'")
        self.role, self.world_size = role, world_size
        self.trainer_cfg = TrainerConfig.coerce(trainer_cfg)
        algo = algo_cfg.model_dump() if hasattr(algo_cfg, "model_dump") else algo_cfg
        from rl.algos import AlgoConfig
        self.algo = AlgoConfig.model_validate(algo or {})
        if launcher == "ray":
            import ray
            if not ray.is_initialized():
                ray.init()
            addr = master_addr or ray.util.get_node_ip_address()
        else:
            addr = master_addr or "127.0.0.1"
        port = master_port or free_port()
        ctor_args = [(role, str(model_path), self.trainer_cfg.model_dump(), algo, rank, world_size, addr, port)
                     for rank in range(world_size)]
        self.ranks = (RayRanks(ctor_args, num_cpus_per_worker, num_gpus_per_worker) if launcher == "ray"
                      else ProcessRanks(ctor_args))

    def run(self, method: str, *args, **kwargs) -> list:
        """Call `method` on every rank with the same arguments; results in rank order."""
        return self.ranks.call(method, [(args, kwargs)] * self.world_size)

    # -- the worker API, over the whole group ----------------------------------------------
    def forward_logprobs(self, batch: dict) -> torch.Tensor:
        return self._forward("forward_logprobs", batch)

    def forward_values(self, batch: dict) -> torch.Tensor:
        return self._forward("forward_values", batch)

    def _forward(self, method: str, batch: dict) -> torch.Tensor:
        batch = as_batch(batch)
        shards = split_even(num_rows(batch), self.world_size)
        outs = self.ranks.call(method, [((take_rows(batch, s),), {}) for s in shards])
        return torch.cat(outs, 0)

    def train_step(self, batch: dict) -> dict:
        return self._train("train_step", batch, self.algo.num_minibatches)

    def sft_step(self, batch: dict) -> dict:
        return self._train("sft_step", batch, 1)

    def _train(self, method: str, batch: dict, num_minibatches: int) -> dict:
        batch = as_batch(batch)
        shards = train_shards(num_rows(batch), self.world_size, num_minibatches)
        results = self.ranks.call(method, [((take_rows(batch, rows),), {}) for rows in shards])
        merged = dict(results[0])           # scalar metrics are all-reduced: rank 0 speaks for all
        for key, value in results[0].items():
            if isinstance(value, torch.Tensor) and key.startswith("pre_update_"):
                full = value.new_zeros((num_rows(batch), *value.shape[1:]))
                for rows, res in zip(shards, results):
                    full[rows] = res[key]
                merged[key] = full
        return merged

    def get_weights(self) -> dict[str, torch.Tensor]:
        return self.run("get_weights", only_rank0=True)[0]

    def save(self, path: str, tokenizer=None) -> str:
        return self.run("save", str(path), tokenizer)[0]

    def load(self, path: str) -> dict:
        return self.run("load", str(path))[0]

    def shutdown(self) -> None:
        self.ranks.close()
