"""BatchMeta: how the flat tokens of one forward call split into sequences.

Every caller speaks this one layout, the one vLLM uses: the new tokens of all sequences
are concatenated (`[N, ...]`, sequence i owns rows `query_start_loc[i]:query_start_loc[i+1]`)
and each sequence already has `context_lens[i]` tokens in its caches. The trainer's full
forward is the special case `context_lens == 0` with no caches.

Cache addressing (only when caches are passed):
  - softmax layers: paged KV; `block_table[i, j]` is the physical block holding logical
    block j of sequence i; `slot_mapping[n]` is the flat slot (block * block_size + offset)
    where token n's K/V is written (-1: do not write).
  - linear-attention layers: `state_indices[i]` is the slot of sequence i's state.

A BatchMeta describes one forward call and is shared by all its layers: what the kernels
derive from it alone (positions, whether it is a decode step, decode indices, the cache runs
a decode step reads) is computed once per call (`derived`), not once per layer. So its fields
must not change once a forward has used it; make a new BatchMeta instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class BatchMeta:
    query_start_loc: torch.Tensor          # [B+1] int64, cumulative new-token counts
    context_lens: torch.Tensor             # [B] int64, tokens already cached per sequence
    block_table: torch.Tensor | None = None    # [B, max_blocks] int
    slot_mapping: torch.Tensor | None = None   # [N] int64
    state_indices: torch.Tensor | None = None  # [B] int64
    # the longest new-token count, when the host knows it without reading the device (a
    # kernel may then skip a launch that could have no work: GPU lightning decode)
    max_query_len: int | None = None
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key: Any, make: Callable[[], Any]) -> Any:
        """`make()`, computed on the first call with this key and kept for this call's other
        layers; only for values that depend on nothing but this BatchMeta (and the key)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def is_decode(self) -> bool:
        """One new token per sequence (a decode step)."""
        return self.derived("is_decode", lambda: bool((self.query_lens == 1).all()))

    @property
    def num_seqs(self) -> int:
        return self.query_start_loc.numel() - 1

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    @property
    def seq_lens(self) -> torch.Tensor:
        """Total tokens per sequence after this call (context + new)."""
        return self.context_lens + self.query_lens

    def positions(self) -> torch.Tensor:
        """Absolute position of every new token, [N] int64 (shared by the call's layers: do
        not modify it)."""
        return self.derived("positions", self._positions)

    def _positions(self) -> torch.Tensor:
        if self.is_decode():             # the new token of a sequence follows its context
            return self.context_lens
        q_lens = self.query_lens
        starts = torch.repeat_interleave(self.query_start_loc[:-1], q_lens)
        ctx = torch.repeat_interleave(self.context_lens, q_lens)
        return torch.arange(int(q_lens.sum()), device=q_lens.device) - starts + ctx

    @staticmethod
    def from_lengths(lengths, context_lens=None, device="cpu") -> "BatchMeta":
        host_max = None if isinstance(lengths, torch.Tensor) else max((int(x) for x in lengths), default=0)
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
        qsl = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=device)
        qsl[1:] = torch.cumsum(lengths, 0)
        ctx = (torch.zeros_like(lengths) if context_lens is None
               else torch.as_tensor(context_lens, dtype=torch.int64, device=device))
        return BatchMeta(query_start_loc=qsl, context_lens=ctx, max_query_len=host_max)
