"""Engine trace: the forwards vLLM ran through our model, recorded, then replayed outside it.

When a vLLM rollout's logprobs differ from the trainer's, the first question is where. Either
the engine's forward computed something other than what our kernels compute for the very batch
vLLM scheduled (its caches changed outside our kernels, a scheduler feature the plugin does
not handle), or our kernels gave that batch composition a different answer than the trainer's
full forward (a batch-invariance defect). The trace separates the two.

`RolloutWorker.trace_engine(directory)` makes the engine's model write, for each forward,
`step00001.pt`, ...: the token ids, the `BatchMeta` of each KV-cache group (which layer uses
which), vLLM's own positions and the final hidden states it returned, plus `caches.pt` (the
shapes and dtypes of every layer's cache). `replay(directory, model)` runs the same forwards in
the same order through a trainer-side model on fresh caches of those shapes and compares each
step's hidden states bit for bit. Every step equal: the engine computed exactly what our
kernels compute for its batches, and any drift is the kernels' (compare the trainer forward).
The first unequal step names the requests (rows of `query_start_loc`) whose tokens differ.

Exact only without prefix caching: with it vLLM copies linear-attention states between slots
outside the forward ("align" mode), which the replay does not see.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rl.kernels import BatchMeta

CACHES_FILE = "caches.pt"
META_FIELDS = [f.name for f in fields(BatchMeta) if not f.name.startswith("_")]


def _cache_spec(cache) -> list[tuple[tuple[int, ...], torch.dtype]]:
    tensors = cache if isinstance(cache, (tuple, list)) else [cache]
    return [(tuple(t.shape), t.dtype) for t in tensors]


def _meta_dict(batch: BatchMeta) -> dict:
    return {name: (v.clone() if isinstance(v, torch.Tensor) else v)
            for name, v in ((n, getattr(batch, n)) for n in META_FIELDS)}


class EngineTrace:
    """The recording side, held by the engine's model while a trace is on."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.steps = 0

    def record(self, input_ids: torch.Tensor, vllm_positions: torch.Tensor, batches: list[BatchMeta],
               caches: list, hidden: torch.Tensor) -> None:
        """One forward: `batches[l]` / `caches[l]` are layer l's; `hidden` the final-norm output."""
        if self.steps == 0:
            torch.save([_cache_spec(c) for c in caches], self.directory / CACHES_FILE)
        self.steps += 1
        metas: dict[int, BatchMeta] = {}          # the distinct BatchMetas, first-use order
        for b in batches:
            metas.setdefault(id(b), b)
        index = {key: i for i, key in enumerate(metas)}
        torch.save({"input_ids": input_ids.clone(), "vllm_positions": vllm_positions.clone(),
                    "metas": [_meta_dict(b) for b in metas.values()], "layer_meta": [index[id(b)] for b in batches],
                    "hidden": hidden.clone()},
                   self.directory / f"step{self.steps:05d}.pt")


@dataclass
class StepDifference:
    step: int                   # 1-based, in the engine's order
    requests: list[int]         # rows of the step's batch whose tokens differ
    query_lens: list[int]       # every request's new tokens in that step
    context_lens: list[int]
    what: str                   # "hidden states" or "positions"

    def __str__(self) -> str:
        return (f"engine step {self.step}: {self.what} differ for request rows {self.requests} of a batch with "
                f"query_lens {self.query_lens}, context_lens {self.context_lens}")


def step_files(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob("step*.pt"))


@torch.no_grad()
def replay(directory: str | Path, model) -> tuple[int, StepDifference | None]:
    """Re-run every recorded forward through `model` (a `BailingMoeLinearV2ForCausalLM` at the
    engine's weights) on fresh zeroed caches; returns (steps replayed, first difference or None)."""
    directory = Path(directory)
    files = step_files(directory)
    if not files:
        raise FileNotFoundError(f"engine trace {directory}: no step files (was the trace on during a generate?)")
    caches = []
    for spec in torch.load(directory / CACHES_FILE):
        tensors = [torch.zeros(shape, dtype=dtype) for shape, dtype in spec]
        caches.append(tensors[0] if len(tensors) == 1 else tuple(tensors))
    for step, path in enumerate(files, 1):
        rec = torch.load(path)
        metas = [BatchMeta(**m) for m in rec["metas"]]
        batches = [metas[i] for i in rec["layer_meta"]]
        positions = batches[0].positions()
        describe = dict(query_lens=batches[0].query_lens.tolist(), context_lens=batches[0].context_lens.tolist())
        if not torch.equal(positions, rec["vllm_positions"]):
            rows = _rows(batches[0], positions != rec["vllm_positions"])
            return step, StepDifference(step, rows, what="positions", **describe)
        h = model.model.run_layers(model.model.word_embeddings(rec["input_ids"]), batches, positions, caches)
        if not torch.equal(h, rec["hidden"]):
            rows = _rows(batches[0], (h != rec["hidden"]).flatten(1).any(1))
            return step, StepDifference(step, rows, what="hidden states", **describe)
    return len(files), None


def _rows(batch: BatchMeta, token_differs: torch.Tensor) -> list[int]:
    """The batch rows (requests) owning the flagged tokens."""
    tokens = token_differs.nonzero()[:, 0]
    return sorted(set((torch.searchsorted(batch.query_start_loc, tokens, right=True) - 1).tolist()))
