"""Model-level parity: batch composition, micro-batch size, prefill + decode, chunked prefill.

The reference decoder uses paged KV (shuffled blocks) and lightning state slots exactly as
the rollout does; its reported logprobs must equal the trainer forward's, bit for bit.
"""
import torch

from bits import assert_bits_equal
from rollout.reference import generate


def _padded(seqs):
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros((len(seqs), int(lengths.max())), dtype=torch.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, lengths


def test_sequence_alone_equals_padded_batch(tiny_model):
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(4, 128, (n,), generator=gen).tolist() for n in (90, 3, 47, 64, 17, 33)]
    ids, lengths = _padded(seqs)
    with torch.no_grad():
        batch = tiny_model.sequence_logprobs(ids, lengths)
        for i, s in enumerate(seqs):
            alone = tiny_model.sequence_logprobs(torch.tensor([s]), [len(s)])
            assert_bits_equal(alone[0], batch[i, : len(s)], f"sequence {i} alone vs in batch")


def test_micro_batch_1_vs_8(tiny_model):
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(4, 128, (int(n),), generator=gen).tolist() for n in torch.randint(2, 80, (8,), generator=gen)]
    ids, lengths = _padded(seqs)
    with torch.no_grad():
        whole = tiny_model.sequence_logprobs(ids, lengths)
        ones = torch.cat([tiny_model.sequence_logprobs(ids[i:i + 1], lengths[i:i + 1]) for i in range(8)])
    assert_bits_equal(ones, whole, "micro-batch 1 vs 8")


def _trainer_logprobs(model, gens, temperature):
    seqs = [g.prompt + g.tokens for g in gens]
    ids, lengths = _padded(seqs)
    with torch.no_grad():
        lp = model.sequence_logprobs(ids, lengths, temperature)
    return [lp[i, len(g.prompt): len(g.prompt) + len(g.tokens)] for i, g in enumerate(gens)]


def _prompts(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (int(m),), generator=gen).tolist() for m in torch.randint(1, 60, (n,), generator=gen)]


def test_reference_decode_equals_trainer_forward(tiny_model):
    prompts = _prompts(12, 5)
    gens = generate(tiny_model, prompts, max_new_tokens=40, temperature=1.0, seed=11)
    for i, (g, lp) in enumerate(zip(gens, _trainer_logprobs(tiny_model, gens, 1.0))):
        assert_bits_equal(torch.tensor(g.logprobs, dtype=torch.float32), lp, f"sample {i}")


def test_chunked_prefill_and_temperature(tiny_model):
    prompts = _prompts(6, 6)
    for temperature in (0.7, 1.3):
        plain = generate(tiny_model, prompts, 20, temperature, seed=2)
        chunked = generate(tiny_model, prompts, 20, temperature, seed=2, prefill_chunk=7, block_size=8)
        for i, (a, b) in enumerate(zip(plain, chunked)):
            assert a.tokens == b.tokens, f"sample {i}: chunked prefill changed the sampled tokens"
            assert_bits_equal(torch.tensor(b.logprobs), torch.tensor(a.logprobs), f"sample {i} chunked")
        for i, (g, lp) in enumerate(zip(chunked, _trainer_logprobs(tiny_model, chunked, temperature))):
            assert_bits_equal(torch.tensor(g.logprobs, dtype=torch.float32), lp, f"T={temperature} sample {i}")


def test_request_result_independent_of_batch(tiny_model):
    prompts = _prompts(5, 7)
    together = generate(tiny_model, prompts, 16, seed=9)
    alone = generate(tiny_model, prompts[2:3], 16, seed=9)
    # seeds are per request index; request 2 alone is request 0 there, so compare via a batch
    # with the same index: pad the front with the same two requests
    front = generate(tiny_model, prompts[:3], 16, seed=9)
    assert front[2].tokens == together[2].tokens
    assert_bits_equal(torch.tensor(front[2].logprobs), torch.tensor(together[2].logprobs), "request 2")
    assert len(alone[0].tokens) == 16


def test_engine_prepared_model_equals_trainer_forward(tiny_model):
    """What an inference engine runs after `prepack_for_inference` (packed projections, the
    projections of one input as one product, q/k norm + RoPE in one call each, stacked experts)
    reports the trainer's bits: reference decode of the prepared model == the unprepared
    model's decode == the trainer forward. A trainer (never prepared) keeps the module path."""
    import copy

    from rl import kernels as K
    engine = copy.deepcopy(tiny_model)
    assert engine.prepack_for_inference() > 0
    layer = engine.model.layers[0].attention
    x = torch.zeros(3, engine.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        assert K.fused_linear(x, [layer.query_key_value.weight, layer.g_proj.weight]) is not None
        assert K.fused_linear(x, [tiny_model.model.layers[0].attention.query_key_value.weight,
                                  tiny_model.model.layers[0].attention.g_proj.weight]) is None
    prompts = _prompts(10, 8)
    prepared = generate(engine, prompts, 24, 1.0, seed=4)
    plain = generate(tiny_model, prompts, 24, 1.0, seed=4)
    for i, (a, b) in enumerate(zip(prepared, plain)):
        assert a.tokens == b.tokens, f"sample {i}: the prepared model sampled other tokens"
        assert_bits_equal(torch.tensor(a.logprobs), torch.tensor(b.logprobs), f"sample {i} prepared")
    for i, (g, lp) in enumerate(zip(prepared, _trainer_logprobs(tiny_model, prepared, 1.0))):
        assert_bits_equal(torch.tensor(g.logprobs, dtype=torch.float32), lp, f"prepared sample {i} vs trainer")
