"""Trainer → rollout weight sync on one node, through vLLM's own weight-transfer seam.

vLLM 0.32 drives in-place weight updates with a pluggable `WeightTransferEngine`
(`vllm.distributed.weight_transfer`): the engine side calls `start_weight_update`, then
`update_weights(update_info)` once per chunk, then `finish_weight_update`, on every worker,
and each chunk ends in the model's `load_weights`. Its built-in backends are NCCL (GPU
clusters: a process group with the trainer) and CUDA IPC. For one node without GPUs we add
the backend `lockstep_shm`: the rollout worker writes the weights as safetensors buckets to
shared memory (`/dev/shm`), and the engine side maps each bucket and loads it.

On a GPU cluster the same RolloutWorker calls work with `weight_transfer_config={"backend":
"nccl"}` and vLLM's `NCCLTrainerWeightTransferEngine` on the trainer rank (the trainer
broadcasts instead of writing buckets); only `push_weights` below changes.

Each update is versioned and verified: the engine refuses non-finite tensors, checks that
every tensor of the model was written exactly once and now holds the bytes that were sent,
and only then records the version on the model (`weight_version`); the worker reads it back
and tags the engine (`set_weight_version`) so every output token carries it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)

BACKEND = "lockstep_shm"
BUCKET_BYTES = 512 << 20
RPC_TIMEOUT_S = 600.0     # a dead engine never answers


@dataclass
class ShmInitInfo(WeightTransferInitInfo):
    pass


@dataclass
class ShmUpdateInfo(WeightTransferUpdateInfo):
    path: str          # one safetensors bucket
    version: int


class SharedMemoryWeightTransferEngine(WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
    """Engine side of `lockstep_shm`: load safetensors buckets into the model, verify, version."""

    init_info_cls = ShmInitInfo
    update_info_cls = ShmUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
        pass  # nothing to rendezvous with: buckets are files

    def start_weight_update(self) -> None:
        self._written: set[str] = set()
        self._version: int | None = None

    def receive_weights(self, update_info: ShmUpdateInfo) -> None:
        if self._version is not None and update_info.version != self._version:
            raise ValueError(f"lockstep weight update mixes versions {self._version} and {update_info.version}")
        self._version = update_info.version
        targets = dict(self.model.lm.state_dict())
        self.model.weight_version = None          # mixed until finish_weight_update says otherwise
        with safe_open(update_info.path, framework="pt") as bucket:
            sent = {name: bucket.get_tensor(name) for name in bucket.keys()}
        again = self._written.intersection(sent)
        if again:
            raise ValueError(f"lockstep weight update: tensor {sorted(again)[0]!r} sent twice")
        for name, tensor in sent.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"lockstep weight update {self._version}: {name!r} has non-finite values")
        self.model.load_weights(sent.items())
        for name, tensor in sent.items():    # verify: the model now holds exactly what was sent
            if not torch.equal(targets[name], tensor.to(targets[name].dtype)):
                raise RuntimeError(f"lockstep weight update: {name!r} differs after loading")
        self._written.update(sent)

    def finish_weight_update(self) -> None:
        # never raises: vLLM's worker keeps the update session open if this does
        missing = sorted(set(self.model.lm.state_dict()) - self._written)
        if missing:
            self.model.update_error = (f"update {self._version} incomplete: no tensor for {missing[0]!r}"
                                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        else:
            self.model.update_error = None
            self.model.weight_version = self._version

    def shutdown(self) -> None:
        pass


def register_backend() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, SharedMemoryWeightTransferEngine)


def write_buckets(weights: dict[str, torch.Tensor], directory: Path,
                  bucket_bytes: int = BUCKET_BYTES) -> list[Path]:
    """Split `weights` (name order) into safetensors files of about `bucket_bytes` each."""
    paths, bucket, size = [], {}, 0
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu").contiguous()
        if bucket and size + tensor.nbytes > bucket_bytes:
            paths.append(_save(bucket, directory, len(paths)))
            bucket, size = {}, 0
        bucket[name] = tensor
        size += tensor.nbytes
    if bucket:
        paths.append(_save(bucket, directory, len(paths)))
    return paths


def _save(bucket: dict[str, torch.Tensor], directory: Path, index: int) -> Path:
    path = directory / f"bucket-{index:04d}.safetensors"
    save_file(bucket, str(path))
    return path


def push_weights(llm, version: int, weights: dict[str, torch.Tensor], bucket_bytes: int | None = None) -> None:
    """Load `weights` (HF names, the complete set) into the running engine `llm` as
    `version`, in place, through vLLM's weight-update lifecycle on every worker.

    Raises if the engine rejects or cannot verify the update; the session is closed either
    way. After a failure some tensors may already be replaced: the caller must not generate
    until an update succeeds (RolloutWorker enforces this).
    """
    shm = Path("/dev/shm") if os.path.isdir("/dev/shm") else None
    directory = Path(tempfile.mkdtemp(prefix="lockstep-weights-", dir=shm))
    open_session = False
    try:
        paths = write_buckets(weights, directory, bucket_bytes or BUCKET_BYTES)   # before touching the engine
        llm.collective_rpc("start_weight_update", timeout=RPC_TIMEOUT_S)
        open_session = True
        for path in paths:
            # a failing chunk makes vLLM's worker close the session itself
            open_session = False
            llm.collective_rpc("update_weights", timeout=RPC_TIMEOUT_S,
                               kwargs={"update_info": {"path": str(path), "version": int(version)}})
            open_session = True
        llm.collective_rpc("finish_weight_update", timeout=RPC_TIMEOUT_S)
        open_session = False
        state = llm.collective_rpc("lockstep_state", timeout=RPC_TIMEOUT_S)
        failed = [s for s in state if s["weight_version"] != version]
        if failed:
            raise RuntimeError(f"weight update {version} not applied: {failed[0].get('update_error')}")
        llm.llm_engine.set_weight_version(str(version))
    finally:
        if open_session:
            try:
                llm.collective_rpc("finish_weight_update", timeout=RPC_TIMEOUT_S)
            except Exception:
                pass
        shutil.rmtree(directory, ignore_errors=True)
