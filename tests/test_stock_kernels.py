"""The `stock` kernels (plain torch ops, the drift diagnostic's contrast) on the paths a
test machine without a GPU can reach. The CUDA attention path (one padded SDPA call) runs
here on CPU tensors: it must read only each sequence's own keys from NaN-poisoned pages."""
from __future__ import annotations

import torch

from rl.kernels import stock
from rl.kernels.batch import BatchMeta


def test_padded_sdpa_path_ignores_keys_past_each_sequence():
    torch.manual_seed(0)
    lengths, block_size, hkv, hq, d = [37, 5, 20], 16, 2, 4, 32
    pages = [-(-t // block_size) for t in lengths]
    cache = torch.full((sum(pages) + 2, hkv, block_size, 2 * d), float("nan"), dtype=torch.bfloat16)
    table = torch.zeros((3, max(pages)), dtype=torch.int32)
    order = torch.randperm(cache.shape[0])
    at = 0
    for i, n in enumerate(pages):
        table[i, :n] = order[at:at + n]
        at += n
    q, k, v = (torch.randn(sum(lengths), h, d).bfloat16() for h in (hq, hkv, hkv))
    batch = BatchMeta.from_lengths(lengths)
    batch.block_table = table
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    pos = batch.positions()
    batch.slot_mapping = table[seq, pos // block_size].long() * block_size + pos % block_size
    padded = stock._cuda_softmax_attention(q, k, v, batch, cache.clone(), d ** -0.5)
    per_seq = stock.softmax_attention(q, k, v, batch, cache.clone(), d ** -0.5)   # CPU: one call per sequence
    assert torch.isfinite(padded.float()).all(), "padded SDPA path read NaN keys past a sequence's end"
    torch.testing.assert_close(padded.float(), per_seq.float(), rtol=2e-2, atol=2e-2)
