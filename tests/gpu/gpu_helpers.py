"""Shared helpers for the GPU contract tests: bitwise assertion with a useful message,
float64 relative error, paged-cache and state-slot builders."""
from __future__ import annotations

import os

import torch

from rl.bits import describe, first_difference
from rl.kernels import BatchMeta

# LOCKSTEP_TEST_DEVICE=cpu with TRITON_INTERPRET=1 runs the kernels' logic in Triton's
# interpreter (slow; for developing the tests without a GPU).
DEV = os.environ.get("LOCKSTEP_TEST_DEVICE", "cuda")


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    difference = first_difference(got, want)
    if difference is not None:
        raise AssertionError(f"{what}: {describe(difference)}")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def seq_layout(lengths):
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    return starts


class PagedCache:
    """A paged KV cache with shuffled (non-contiguous) blocks per sequence, NaN-poisoned."""

    def __init__(self, num_seqs, max_len, hkv, d, dtype, page=16, seed=0):
        self.page = page
        per = -(-max_len // page)
        total = num_seqs * per + 3
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(total, generator=gen)[: num_seqs * per]
        self.block_table = perm.view(num_seqs, per).to(torch.int32).to(DEV)
        self.cache = torch.full((total, hkv, page, 2 * d), float("nan"), dtype=dtype, device=DEV)

    def batch(self, ctx, qlen) -> BatchMeta:
        b = BatchMeta.from_lengths(qlen, context_lens=ctx, device=DEV)
        pos = b.positions()
        seq = torch.repeat_interleave(torch.arange(len(qlen), device=DEV), b.query_lens)
        b.block_table = self.block_table
        b.slot_mapping = self.block_table[seq, pos // self.page].long() * self.page + pos % self.page
        return b


def rows_of(lengths, ctx, qlen):
    """Flat row indices (into the full-sequence layout) of the tokens a step processes."""
    starts = seq_layout(lengths)
    parts = [torch.arange(s + c, s + c + q) for s, c, q in zip(starts, ctx, qlen)]
    return torch.cat(parts).to(DEV) if parts else torch.zeros(0, dtype=torch.long, device=DEV)


def split_schedule(lengths, first, step_of):
    """Yield (ctx, qlen) per call: a prefill of `first[i]` tokens, then steps of `step_of(it, i)`."""
    ctx = [0] * len(lengths)
    qlen = [min(f, n) for f, n in zip(first, lengths)]
    it = 0
    while True:
        yield ctx, qlen
        ctx = [c + q for c, q in zip(ctx, qlen)]
        if all(c >= n for c, n in zip(ctx, lengths)):
            return
        qlen = [min(step_of(it, i), n - c) for i, (c, n) in enumerate(zip(ctx, lengths))]
        it += 1
