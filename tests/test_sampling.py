"""rollout.sampling: seeded Gumbel-max sampling is a pure function of (logprobs, seed, position).

Batch composition and row order never change a token; frequencies follow exp(logprobs);
top-k / top-p only ever pick allowed tokens; the reference decoder uses it per request.
"""
import torch

from bits import assert_bits_equal
from rollout.sampling import request_seed, restrict, sample


def _logprobs(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, vocab, generator=g) * 2, -1)


def test_token_depends_only_on_row_seed_and_position():
    lp = _logprobs(64, 1000)
    seeds = torch.tensor([request_seed(11, i) for i in range(64)])
    pos = torch.arange(64) * 3
    full = sample(lp, seeds, pos)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert_bits_equal(sample(lp[perm], seeds[perm], pos[perm]), full[perm], "permuted batch")
    for start, n in [(0, 1), (5, 7), (30, 34)]:
        rows = slice(start, start + n)
        assert_bits_equal(sample(lp[rows], seeds[rows], pos[rows]), full[rows], f"rows {start}:{start + n}")
    assert not torch.equal(sample(lp, seeds, pos + 1), full), "position must change the draw"


def test_frequencies_follow_the_distribution():
    lp = _logprobs(1, 6, seed=3)[0]
    n = 40000
    seeds = torch.tensor([request_seed(5, i) for i in range(n)])
    counts = torch.bincount(sample(lp.expand(n, -1), seeds, torch.zeros(n, dtype=torch.long)), minlength=6)
    expected = lp.double().exp() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 25.0, f"chi-square {chi2:.1f} over 5 degrees of freedom (p < 1e-4): counts {counts.tolist()}"


def test_request_seeds_are_distinct():
    seeds = {request_seed(s, i, j) for s in (0, 1, 2**40) for i in range(50) for j in range(8)}
    assert len(seeds) == 3 * 50 * 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_top_k_and_top_p_only_draw_allowed_tokens():
    lp = _logprobs(256, 50, seed=4)
    seeds = torch.tensor([request_seed(9, i) for i in range(256)])
    zeros = torch.zeros(256, dtype=torch.long)
    top3 = lp.topk(3, -1).indices
    drawn = sample(lp, seeds, zeros, top_k=torch.full((256,), 3))
    assert (drawn[:, None] == top3).any(-1).all()
    allowed = restrict(lp, torch.zeros(256, dtype=torch.long), torch.full((256,), 0.5, dtype=torch.float64))
    drawn = sample(lp, seeds, zeros, top_p=torch.full((256,), 0.5, dtype=torch.float64))
    assert torch.isfinite(allowed.gather(-1, drawn[:, None])).all()
    # nucleus: the smallest prefix of the sorted distribution whose mass reaches top_p
    probs = allowed.double().exp()
    mass = probs.sum(-1)
    smallest_kept = probs.masked_fill(probs == 0, 2.0).min(-1).values
    assert (mass >= 0.5).all() and (mass - smallest_kept < 0.5).all()


def test_masked_tokens_are_never_drawn():
    lp = _logprobs(128, 20, seed=6)
    lp[:, 0] = float("-inf")            # e.g. a stop token under min_tokens
    seeds = torch.tensor([request_seed(2, i) for i in range(128)])
    assert (sample(lp, seeds, torch.zeros(128, dtype=torch.long)) != 0).all()


def test_noise_is_the_plain_formula():
    """gumbel_noise (in-place, cached token hashes) gives exactly the written-out definition."""
    from rollout.sampling import _M32, gumbel_noise

    def _mix32(x):                       # the hash written out, out of place
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
        return x ^ (x >> 16)
    seeds = torch.tensor([0, 2 ** 40 + 7, 2 ** 62 + 3], dtype=torch.int64)
    positions = torch.tensor([0, 5, 1000], dtype=torch.int64)
    row = _mix32(_mix32((seeds & _M32) ^ _mix32(seeds >> 32)) ^ (positions & _M32))
    tok = torch.arange(1000, dtype=torch.int64)
    u = (_mix32(row[:, None] ^ _mix32(tok + 0x2545F491)[None, :]).double() + 0.5) / 4294967296.0
    assert_bits_equal(gumbel_noise(seeds, positions, 1000), -torch.log(-torch.log(u)), "gumbel noise")


def test_int32_noise_equals_the_int64_form():
    """gumbel_noise hashes in int32 (wrapping products, masked shifts); the int64 form is the
    definition: the same float64 noise bit for bit over many seeds, positions and a full
    vocabulary (every top bit and sign case of the 32-bit patterns occurs), and the same tokens."""
    from rollout.sampling import _gumbel_noise_int64, gumbel_noise
    gen = torch.Generator().manual_seed(3)
    seeds = torch.randint(0, 2 ** 62, (64,), generator=gen)
    seeds[:3] = torch.tensor([0, 2 ** 63 - 1, 2 ** 31])
    positions = torch.randint(0, 1 << 20, (64,), generator=gen)
    for vocab in (32000, 129):
        noise = gumbel_noise(seeds, positions, vocab)
        assert_bits_equal(noise, _gumbel_noise_int64(seeds, positions, vocab), f"noise vocab {vocab}")
        lp = torch.log_softmax(torch.randn(64, vocab, generator=gen), -1)
        assert torch.equal(sample(lp, seeds, positions), (noise + lp.double()).argmax(-1))


def test_c_draw_is_the_torch_forms_draw():
    """fp32 CPU rows draw in C (csrc/gumbel.c: the same hash and noise with libm's log, and
    only candidate tokens get a log); the torch form (float64 noise over the whole row, then
    argmax) is the definition. Same tokens: peaked, flat and temperature-like rows, masked
    (-inf) tokens, an all-masked row (token 0, as argmax), a NaN row (its first NaN), big
    vocabularies, extreme seeds and positions."""
    from rollout.sampling import _draw_c, gumbel_noise
    gen = torch.Generator().manual_seed(11)
    for vocab, rows, scale in ((32000, 48, 2.0), (32000, 48, 0.05), (157184, 6, 1.0), (128, 256, 8.0), (1, 4, 1.0)):
        lp = torch.log_softmax(torch.randn(rows, vocab, generator=gen) * scale, -1)
        lp[1, ::3] = float("-inf")
        lp[2] = float("-inf")
        lp[3, vocab // 2:] = float("nan")
        seeds = torch.randint(0, 2 ** 62, (rows,), generator=gen)
        seeds[:2] = torch.tensor([0, 2 ** 63 - 1])
        positions = torch.randint(0, 1 << 20, (rows,), generator=gen)
        want = (gumbel_noise(seeds, positions, vocab) + lp.double()).argmax(-1)
        got = _draw_c(lp, seeds, positions)
        assert torch.equal(got, want), f"vocab {vocab} scale {scale}: rows {(got != want).nonzero().flatten().tolist()}"
        assert torch.equal(sample(lp, seeds, positions), got)
