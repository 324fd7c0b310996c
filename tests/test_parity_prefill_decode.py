"""Contract 2, stated as a chain of bit-equal tests (STYLE.md §11):

  op level:    lightning / softmax attention, full forward == prefill + decode at any split,
               several chunk sizes, paged KV with non-contiguous (shuffled) blocks;
  model level: trainer forward == reference decoder (prefill + token-by-token decode, and
               chunked prefill) for mixed-length batches crossing chunk boundaries;
  therefore    the rollout's reported logprob == the trainer's logprob (contract 4).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bits import assert_bits_equal
from rl import kernels as K
from rl.kernels import BatchMeta


def _run_split(fn_call, total, splits):
    """Feed a sequence of `total` tokens in pieces of the given sizes; concat outputs."""
    outs, pos = [], 0
    for n in splits:
        n = min(n, total - pos)
        if n <= 0:
            break
        outs.append(fn_call(pos, n))
        pos += n
    if pos < total:
        outs.append(fn_call(pos, total - pos))
    return torch.cat(outs)


def _state_pools(slots, h, d, chunk, strided):
    """NaN-filled (S, pending) pools; `strided`: views with gaps between rows, heads and slots
    (vLLM's state tensors are views into a larger buffer), so the decode step's in-place reads
    must follow the strides."""
    if not strided:
        return torch.full((slots, h, d, d), float("nan")), torch.full((slots, h, chunk, 2 * d), float("nan"))
    s_buf = torch.full((slots, 2 * h, d, d + 8), float("nan"))
    p_buf = torch.full((slots + 1, h + 1, chunk, 2 * d + 4), float("nan"))
    return s_buf[:, ::2, :, 3:d + 3], p_buf[1:, 1:, :, 2:2 * d + 2]


def _lightning_split(q, k, v, ld, chunk, splits, slot=3, strided=False):
    h, d = q.shape[1], q.shape[2]
    state = _state_pools(5, h, d, chunk, strided)

    def call(pos, n):
        batch = BatchMeta.from_lengths([n], [pos])
        batch.state_indices = torch.tensor([slot])
        return K.lightning_attention(q[pos:pos + n], k[pos:pos + n], v[pos:pos + n], ld, batch, state, chunk)
    return _run_split(call, q.shape[0], splits)


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("splits", [[1] * 200, [37, 1, 1, 5], [16, 16, 3, 29], [100]], ids=["decode", "37+decode", "mixed", "two"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-pools", "strided-pools"])
def test_lightning_full_equals_split(chunk, splits, strided):
    t = 150
    q, k, v = (torch.randn(t, 4, 32).bfloat16() for _ in range(3))
    ld = -torch.rand(4) * 0.5
    full = K.lightning_attention(q, k, v, ld, BatchMeta.from_lengths([t]), None, chunk)
    assert_bits_equal(_lightning_split(q, k, v, ld, chunk, splits, strided=strided), full, f"lightning chunk={chunk}")


def _attention_split(q, k, v, splits, block_size=16, seed=0):
    num_blocks = -(-q.shape[0] // block_size) + 3
    cache = torch.full((num_blocks + 4, k.shape[1], block_size, 2 * k.shape[2]), float("nan"), dtype=k.dtype)
    table = torch.randperm(num_blocks + 4, generator=torch.Generator().manual_seed(seed))[None, :num_blocks]

    def call(pos, n):
        batch = BatchMeta.from_lengths([n], [pos])
        batch.block_table = table
        p = torch.arange(pos, pos + n)
        batch.slot_mapping = table[0, p // block_size].long() * block_size + p % block_size
        return K.softmax_attention(q[pos:pos + n], k[pos:pos + n], v[pos:pos + n], batch, cache)
    return _run_split(call, q.shape[0], splits)


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])      # 64, 128: pages of whole key blocks
@pytest.mark.parametrize("splits", [[1] * 200, [37, 1, 1, 5], [64, 64, 3], [150]], ids=["decode", "37+decode", "blocks", "one"])
def test_attention_full_equals_paged_split(block_size, splits):
    t = 150
    q = torch.randn(t, 4, 32).bfloat16()
    k, v = torch.randn(t, 2, 32).bfloat16(), torch.randn(t, 2, 32).bfloat16()
    full = K.softmax_attention(q, k, v, BatchMeta.from_lengths([t]))
    assert_bits_equal(_attention_split(q, k, v, splits, block_size), full, f"attention bs={block_size}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("block_size", [16, 64, 128])
def test_attention_batched_decode_of_mixed_lengths(block_size, dtype):
    """Sequences of different lengths decoded together from NaN-filled pages (the keys and
    values past each one's length are masked per sequence): every row == its full forward."""
    lengths, prompt = [150, 70, 5], [100, 64, 1]
    gen = torch.Generator().manual_seed(block_size)
    data = [tuple(torch.randn(t, h, 32, generator=gen).to(dtype) for h in (4, 2, 2)) for t in lengths]
    fulls = [K.softmax_attention(q, k, v, BatchMeta.from_lengths([q.shape[0]])) for q, k, v in data]
    pages = [-(-t // block_size) for t in lengths]
    cache = torch.full((sum(pages) + 5, 2, block_size, 64), float("nan"), dtype=dtype)
    order = torch.randperm(cache.shape[0], generator=gen)
    tables, at = torch.zeros((3, max(pages)), dtype=torch.int32), 0
    for i, n in enumerate(pages):
        tables[i, :n] = order[at:at + n]
        at += n
    outs = [torch.zeros_like(f) for f in fulls]
    done = [0, 0, 0]

    def step(seqs, counts):
        batch = BatchMeta.from_lengths(counts, [done[i] for i in seqs])
        batch.block_table = tables[seqs]
        pos = torch.cat([torch.arange(done[i], done[i] + c) for i, c in zip(seqs, counts)])
        seq_of = torch.cat([torch.full((c,), j) for j, c in enumerate(counts)])
        batch.slot_mapping = batch.block_table[seq_of, pos // block_size].long() * block_size + pos % block_size
        q, k, v = (torch.cat([data[i][n][done[i]:done[i] + c] for i, c in zip(seqs, counts)]) for n in range(3))
        o = K.softmax_attention(q, k, v, batch, cache)
        at = 0
        for i, c in zip(seqs, counts):
            outs[i][done[i]:done[i] + c] = o[at:at + c]
            at += c
            done[i] += c

    step([0, 1, 2], prompt)
    while any(d < t for d, t in zip(done, lengths)):
        seqs = [i for i in range(3) if done[i] < lengths[i]]
        step(seqs, [1] * len(seqs))
    for i in range(3):
        assert_bits_equal(outs[i], fulls[i], f"attention batched decode seq {i} bs={block_size}")


@settings(max_examples=15, deadline=None)
@given(total=st.integers(1, 90), chunk=st.sampled_from([4, 8, 16]),
       splits=st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_property_lightning_any_split(total, chunk, splits):
    gen = torch.Generator().manual_seed(total)
    q, k, v = (torch.randn(total, 2, 32, generator=gen).bfloat16() for _ in range(3))
    ld = -torch.rand(2, generator=gen)
    full = K.lightning_attention(q, k, v, ld, BatchMeta.from_lengths([total]), None, chunk)
    assert_bits_equal(_lightning_split(q, k, v, ld, chunk, splits), full, "lightning property")


@settings(max_examples=15, deadline=None)
@given(total=st.integers(1, 90), splits=st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_property_attention_any_split(total, splits):
    gen = torch.Generator().manual_seed(total)
    q = torch.randn(total, 4, 32, generator=gen).bfloat16()
    k, v = (torch.randn(total, 2, 32, generator=gen).bfloat16() for _ in range(2))
    full = K.softmax_attention(q, k, v, BatchMeta.from_lengths([total]))
    assert_bits_equal(_attention_split(q, k, v, splits, 8, total), full, "attention property")


def test_mixed_batch_prefill_and_decode_in_one_call():
    """vLLM mixes decodes and prefills in one call: every row still equals the full forward."""
    lengths = [40, 3, 70]
    q, k, v = (torch.randn(sum(lengths), 4, 32).bfloat16() for _ in range(3))
    ld = -torch.rand(4) * 0.3
    full = K.lightning_attention(q, k, v, ld, BatchMeta.from_lengths(lengths), None, 16)
    state = (torch.full((3, 4, 32, 32), float("nan")), torch.full((3, 4, 16, 64), float("nan")))
    starts = [0, 40, 43]
    done = [0, 0, 0]
    out = torch.zeros_like(full)
    schedule = [[20, 3, 1], [1, 0, 33], [19, 0, 36]]        # per step, new tokens per sequence
    for step in schedule:
        seqs = [i for i in range(3) if step[i] > 0]
        rows = [torch.arange(starts[i] + done[i], starts[i] + done[i] + step[i]) for i in seqs]
        batch = BatchMeta.from_lengths([step[i] for i in seqs], [done[i] for i in seqs])
        batch.state_indices = torch.tensor([2 - i for i in seqs])
        idx = torch.cat(rows)
        out[idx] = K.lightning_attention(q[idx], k[idx], v[idx], ld, batch, state, 16)
        for i in seqs:
            done[i] += step[i]
    assert done == lengths
    assert_bits_equal(out, full, "mixed prefill/decode batch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-pools", "strided-pools"])
def test_batched_decode_steps_equal_the_full_forward(strided, dtype):
    """Decode steps of several sequences in one call (each at its own window offset, windows
    completing on different steps, a new sequence joining with a one-token prompt, slots
    holding garbage): every token equals its sequence's full forward, with the state pools
    contiguous and as strided views."""
    lengths, joins = [60, 45, 33, 20], [0, 0, 0, 13]        # sequence 3 starts at step 13
    prompts = [17, 5, 1, 1]
    gen = torch.Generator().manual_seed(3)
    seqs = [tuple(torch.randn(n, 4, 32, generator=gen).to(dtype) for _ in range(3)) for n in lengths]
    ld = -torch.rand(4, generator=gen) * 0.4
    fulls = [K.lightning_attention(q, k, v, ld, BatchMeta.from_lengths([q.shape[0]]), None, 16) for q, k, v in seqs]
    state = _state_pools(6, 4, 32, 16, strided)
    slots = [4, 0, 5, 2]
    outs = [[] for _ in seqs]
    done = [0] * len(seqs)
    step = 0
    while any(done[i] < lengths[i] for i in range(len(seqs))):
        live = [i for i in range(len(seqs)) if step >= joins[i] and done[i] < lengths[i]]
        sizes = [prompts[i] if done[i] == 0 else 1 for i in live]
        batch = BatchMeta.from_lengths(sizes, [done[i] for i in live])
        batch.state_indices = torch.tensor([slots[i] for i in live])
        parts = [tuple(t[done[i]:done[i] + n] for t in seqs[i]) for i, n in zip(live, sizes)]
        q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
        out = K.lightning_attention(q, k, v, ld, batch, state, 16)
        for i, piece in zip(live, out.split(sizes)):
            outs[i].append(piece)
            done[i] += piece.shape[0]
        step += 1
    for i, full in enumerate(fulls):
        assert_bits_equal(torch.cat(outs[i]), full, f"batched decode, sequence {i}")


def test_decode_kernels_refuse_slots_and_pages_outside_their_pools():
    """The C decode steps read and write by index without bounds checks of their own: a state
    slot or a cache page outside the pool is a clear error before any memory is touched."""
    q, k, v = (torch.randn(2, 4, 32).bfloat16() for _ in range(3))
    ld = -torch.rand(4) * 0.5
    state = (torch.zeros(3, 4, 32, 32), torch.zeros(3, 4, 16, 64))
    batch = BatchMeta.from_lengths([1, 1], [5, 7])
    batch.state_indices = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="outside the pools"):
        K.lightning_attention(q, k, v, ld, batch, state, 16)
    kq, kk, kv_ = torch.randn(2, 4, 32).bfloat16(), torch.randn(2, 2, 32).bfloat16(), torch.randn(2, 2, 32).bfloat16()
    cache = torch.zeros(4, 2, 64, 64, dtype=torch.bfloat16)
    batch = BatchMeta.from_lengths([1, 1], [5, 70])
    batch.block_table = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)     # page 9: no such page
    batch.slot_mapping = torch.tensor([5, 3 * 64 + 6])            # the new k/v land on real pages
    with pytest.raises(ValueError, match="outside the KV cache"):
        K.softmax_attention(kq, kk, kv_, batch, cache)
