"""Where a `TrainerGroup`'s ranks live: Ray actors (the default) or local processes.

Role: `TrainerGroup` (trainer/group.py) shards batches and merges results; it reaches its
`world_size` `TrainerWorker`s only through `call(method, per_rank_args)`, which runs the
method on every rank at once and returns the results in rank order. Two launchers:

    RayRanks      one Ray actor per rank (what `lockstep train` / `sft` use)
    ProcessRanks  one spawned process per rank, talking over a pipe: for hosts without Ray,
                  such as the lent GPU machines (bench/multi_gpu.py). Each process sees every
                  GPU and takes GPU `rank` (LOCAL_RANK), like `torchrun` would give it.

Either way each rank is an unmodified `TrainerWorker` in its own process joining one
torch.distributed group (gloo on CPU, nccl on CUDA). A rank that raises makes `call` raise
after every rank has answered (so no rank is left inside a collective); a rank process that
dies makes `call` raise naming the rank and its exit code.
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

from trainer.worker import TrainerWorker


class RayRanks:
    """One Ray actor per rank; the caller (`TrainerGroup`) has connected to Ray."""

    def __init__(self, ctor_args: list[tuple], num_cpus: float = 1, num_gpus: float = 0):
        import ray

        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(TrainerWorker)
        self.actors = [actor_cls.remote(*args) for args in ctor_args]
        self.call("ready", [((), {})] * len(self.actors))

    def call(self, method: str, per_rank: list[tuple[tuple, dict]]) -> list:
        import ray
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a, (args, kwargs) in zip(self.actors, per_rank)])

    def close(self) -> None:
        import ray
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _to_cpu(value):
    """Results cross the pipe by value: CUDA tensors would need the receiver to map GPU memory."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _serve(conn, local_rank: int, ctor_args: tuple) -> None:
    """Body of one rank process: build the worker, then answer (method, args, kwargs) until None."""
    os.environ["LOCAL_RANK"] = str(local_rank)
    try:
        worker = TrainerWorker(*ctor_args)
        conn.send(("ok", worker.rank))
    except BaseException as err:    # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", (repr(err), traceback.format_exc())))
        return
    while (message := conn.recv()) is not None:
        method, args, kwargs = message
        try:
            conn.send(("ok", _to_cpu(getattr(worker, method)(*args, **kwargs))))
        except Exception as err:    # noqa: BLE001
            conn.send(("error", (repr(err), traceback.format_exc())))
    if dist.is_initialized():
        dist.destroy_process_group()
    conn.send(("ok", "left"))
    try:                            # stay until every rank has left the group: rank 0 hosts
        conn.recv()                 # the group's TCPStore, and a peer's NCCL heartbeat thread
    except EOFError:                # reports the store's going away as an error
        pass


class RankFailed(RuntimeError):
    """A rank process raised (its traceback is in the message) or died."""


class ProcessRanks:
    def __init__(self, ctor_args: list[tuple]):
        ctx = torch.multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for rank, args in enumerate(ctor_args):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, rank, args), name=f"trainer-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        self._gather("start")

    def call(self, method: str, per_rank: list[tuple[tuple, dict]]) -> list:
        unsent = set()
        for rank, (conn, (args, kwargs)) in enumerate(zip(self.conns, per_rank)):
            try:
                conn.send((method, args, kwargs))
            except OSError:        # the process is gone: BrokenPipe / ConnectionReset
                unsent.add(rank)
        return self._gather(method, unsent)

    def _gather(self, what: str, unsent: set[int] = frozenset()) -> list:
        results, errors = [], []
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs)):
            try:
                if rank in unsent:
                    raise EOFError
                status, value = conn.recv()
            except (EOFError, OSError):
                proc.join(timeout=5)
                errors.append(f"rank {rank} process died (exit code {proc.exitcode}) before answering {what}")
                continue
            if status == "error":
                errors.append(f"rank {rank} {what}: {value[0]}\n{value[1]}")
            results.append(value)
        if errors:
            raise RankFailed("\n".join(errors))
        return results

    def close(self, timeout_s: float = 60) -> None:
        """Every rank leaves the process group, then every rank process exits (in that order:
        see `_serve`); a rank that does not answer in `timeout_s` is killed."""
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for conn in self.conns:
            try:
                if conn.poll(timeout_s):
                    conn.recv()
            except (EOFError, OSError):
                pass
        for conn, proc in zip(self.conns, self.procs):
            conn.close()
            proc.join(timeout=timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.conns, self.procs = [], []
