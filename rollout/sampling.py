"""Seeded sampling that depends on nothing but the request: shared by vLLM and the reference.

A sampled token is a pure function of (its logprob row, the request's seed, the token's position
in the response): the argmax over the vocabulary of `logprob + Gumbel noise`, the noise drawn
from a counter-based hash of (seed, position, token id). There is no generator state, so
the token does not depend on which requests share the batch, on scheduling, chunked prefill,
preemption, engine restarts or vLLM's own RNG: a resumed RL run samples what the uninterrupted
run sampled, and the reference decoder samples what vLLM samples from the same logprobs.
(Gumbel-max draws token t with probability exp(logprob_t) when the logprobs are normalised.)

vLLM applies it through `SeededSampler`, a logits processor (`logits_processors` engine arg)
that turns each seeded row into a one-hot the engine's sampler can only pick one way; the
logprob vLLM returns is taken before processors run (`logprobs_mode="raw_logits"`), so it is
still rl.kernels' number. top_k / top_p are applied here, on the logprobs, before the draw.
The draw itself runs in C for fp32 CPU rows (`_draw_c`: ~6x faster on a 32k vocabulary, the
same tokens as the torch form, tested).
"""
from __future__ import annotations

import functools

import torch

SEED_KEY = "lockstep_seed"          # SamplingParams.extra_args key carrying a request's seed
_M32 = 0xFFFFFFFF


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` in place on an int64 tensor the caller owns (no temporaries)."""
    for _ in range(2):
        x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values < 2^32.
    Every product stays below 2^63, so nothing relies on integer overflow."""
    return _mix32_(x.clone())


def _mix32_int(x: int) -> int:
    return int(_mix32(torch.tensor([x & _M32], dtype=torch.int64))[0])


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for child `index` of `seed` (a prompt of a call, a sample of a prompt)."""
    h = _mix32_int(seed & _M32)
    h = _mix32_int(h ^ ((seed >> 32) & _M32))
    lo = _mix32_int(h ^ (index & _M32))
    hi = _mix32_int(lo ^ 0x9E3779B9)
    return ((hi & 0x7FFFFFFF) << 32) | lo


def request_seed(seed: int, prompt_index: int, sample_index: int = 0) -> int:
    """The seed of sample `sample_index` of prompt `prompt_index` in a call seeded `seed`:
    derived through the prompt's seed, so a caller that passes prompt seeds (RolloutPool,
    sharding prompts over workers) gets the same samples as one call with `seed`."""
    return derive_seed(derive_seed(seed, prompt_index), sample_index)


def _as_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 values < 2^32 as int32 holding the same 32 bits (values >= 2^31 read negative)."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def _mix32_i32_(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` in place on an int32 tensor holding 32-bit patterns: the same function at half
    the memory traffic of int64 (the [rows, vocab] noise is most of a sampling step). A logical
    shift is the arithmetic one masked to its low 16 bits; int32 products wrap, i.e. keep the
    low 32 bits, which is the int64 form's `& 0xFFFFFFFF` (tests compare the two bit for bit)."""
    t = torch.empty_like(x)
    for _ in range(2):
        torch.bitwise_right_shift(x, 16, out=t)
        x.bitwise_xor_(t.bitwise_and_(0xFFFF)).mul_(0x45D9F3B)
    torch.bitwise_right_shift(x, 16, out=t)
    return x.bitwise_xor_(t.bitwise_and_(0xFFFF))


@functools.lru_cache(maxsize=8)
def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    return _mix32(torch.arange(vocab, dtype=torch.int64, device=device) + 0x2545F491)


@functools.lru_cache(maxsize=8)
def _token_hashes_i32(vocab: int, device: torch.device) -> torch.Tensor:
    return _as_i32(_token_hashes(vocab, device))


def _row_hashes(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    seeds, positions = seeds.to(torch.int64), positions.to(torch.int64)
    return _mix32(_mix32((seeds & _M32) ^ _mix32(seeds >> 32)) ^ (positions & _M32))


def _uniform_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [R, vocab]: the noise's 32 random bits per (row, token), as int32 patterns."""
    row = _as_i32(_row_hashes(seeds, positions))
    return _mix32_i32_(row[:, None] ^ _token_hashes_i32(vocab, seeds.device)[None, :])


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 [R, vocab] Gumbel(0, 1) noise; row r is a function of (seeds[r], positions[r]).
    u = (bits + 0.5) / 2^32 with bits the unsigned 32-bit hash: flipping the top bit of the
    int32 pattern gives bits - 2^31 as a signed value, so u = (that + 2^31 + 0.5) / 2^32,
    exact in float64 (the same u as the int64 form, `_gumbel_noise_int64`)."""
    bits = _uniform_bits(seeds, positions, vocab).bitwise_xor_(-2 ** 31)
    u = bits.to(torch.float64).add_(2 ** 31 + 0.5).mul_(1.0 / 4294967296.0)        # in (0, 1)
    return u.log_().neg_().log_().neg_()


def _gumbel_noise_int64(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """The noise's defining form, all in int64 (kept as the reference the tests compare with)."""
    row = _row_hashes(seeds, positions)
    bits = _mix32_(row[:, None] ^ _token_hashes(vocab, seeds.device)[None, :])
    u = bits.to(torch.float64).add_(0.5).mul_(1.0 / 4294967296.0)
    return u.log_().neg_().log_().neg_()


def restrict(logprobs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set tokens outside each row's top-k (0 = all) and top-p nucleus to -inf."""
    if bool((top_k <= 0).all()) and bool((top_p >= 1.0).all()):
        return logprobs
    vocab = logprobs.shape[-1]
    ordered, order = logprobs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logprobs.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).to(logprobs.device)[:, None]
    probs = ordered.double().exp()
    before = probs.cumsum(-1) - probs                         # mass of the better tokens
    keep = (rank < k) & ((before < top_p.to(logprobs.device).double()[:, None]) | (rank == 0))
    return logprobs.masked_fill(~keep.scatter(-1, order, keep), float("-inf"))


def sample(logprobs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
           top_k: torch.Tensor | None = None, top_p: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [R] drawn from normalised logprobs [R, V] (any float dtype, -inf = excluded).
    fp32 rows on the CPU take the C form (`_draw_c`), other inputs the torch form."""
    rows = logprobs.shape[0]
    if top_k is not None or top_p is not None:
        top_k = torch.zeros(rows, dtype=torch.int64) if top_k is None else top_k
        top_p = torch.ones(rows, dtype=torch.float64) if top_p is None else top_p
        logprobs = restrict(logprobs, top_k, top_p)
    if logprobs.device.type == "cpu" and logprobs.dtype == torch.float32 and logprobs.dim() == 2:
        return _draw_c(logprobs, seeds, positions)
    noise = gumbel_noise(seeds.to(logprobs.device), positions.to(logprobs.device), logprobs.shape[-1])
    return noise.add_(logprobs).argmax(dim=-1)        # added in float64 (fp32 widens exactly)


@functools.lru_cache(maxsize=1)
def _gumbel_c():
    """(gumbel_argmax, its g_lo / g_hi bucket tables) from the cpu backend's C library."""
    import ctypes
    from rl.kernels.cpu.native import library
    lib = library()
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gumbel_tables.restype, lib.gumbel_tables.argtypes = None, [ptr, ptr]
    lib.gumbel_argmax.restype = None
    lib.gumbel_argmax.argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr]
    g_lo, g_hi = torch.empty(1 << 12, dtype=torch.float64), torch.empty(1 << 12, dtype=torch.float64)
    lib.gumbel_tables(g_lo.data_ptr(), g_hi.data_ptr())
    return lib.gumbel_argmax, g_lo, g_hi


def _draw_c(logprobs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`sample`'s draw in one C pass per row (csrc/gumbel.c): the argmax of logprob + the same
    noise (same hash, same u, -log(-log u) in float64), with the C library's log instead of
    ATen's: the two logs can differ in the last bit, which changes a draw only where two
    tokens' scores tie to ~1e-16 (tests compare the two forms). A log per candidate token
    only: bucket bounds on the noise rule out the rest exactly."""
    rows, vocab = logprobs.shape
    if logprobs.stride(1) != 1:
        logprobs = logprobs.contiguous()
    argmax, g_lo, g_hi = _gumbel_c()
    seeds = seeds.to(torch.int64).contiguous()
    positions = positions.to(torch.int64).contiguous()
    token_hash = _token_hashes_i32(vocab, logprobs.device)
    out = torch.empty(rows, dtype=torch.int64)
    if rows and vocab:
        argmax(rows, vocab, logprobs.data_ptr(), logprobs.stride(0), seeds.data_ptr(), positions.data_ptr(),
               token_hash.data_ptr(), g_lo.data_ptr(), g_hi.data_ptr(), out.data_ptr())
    return out
