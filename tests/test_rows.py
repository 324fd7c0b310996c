"""rl.kernels.cpu.rows.bmm_rows: every output element is one defined sum (products rounded to
fp32, added from +0 in increasing k), so a row's bits do not depend on the rows, columns or
matrices beside it, on the operands' strides, or on bf16 vs the same values widened to fp32.
The decode kernels rely on this to compute only a step's live rows (tests/test_parity_*)."""
from __future__ import annotations

import pytest
import torch

from rl.kernels.cpu.native import NativeBuildError, library_path
from rl.kernels.cpu.rows import bmm_rows, pool_offsets
from tests.bits import assert_bits_equal

SHAPES = [(3, 5, 7, 9), (4, 16, 32, 16), (2, 16, 128, 128), (5, 1, 64, 130), (3, 9, 33, 17), (2, 2, 32, 64)]


def _sequential(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The definition, one fp32 operation at a time."""
    acc = torch.zeros(a.shape[0], a.shape[1], b.shape[2])
    for k in range(a.shape[2]):
        acc = acc + a[:, :, k:k + 1] * b[:, k:k + 1, :]
    return acc


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_each_element_is_the_defined_sum(shape):
    g, m, k, n = shape
    gen = torch.Generator().manual_seed(sum(shape))
    a, b = torch.randn(g, m, k, generator=gen), torch.randn(g, k, n, generator=gen)
    out = bmm_rows(a, b)
    assert_bits_equal(out, _sequential(a, b), f"bmm_rows {shape} vs the sequential sum")
    for i in range(m):                                   # one row at a time
        assert_bits_equal(bmm_rows(a[:, i:i + 1], b), out[:, i:i + 1], f"row {i}")
    assert_bits_equal(bmm_rows(a[1:2], b[1:2]), out[1:2], "one matrix")
    assert_bits_equal(bmm_rows(a, b[:, :, :n // 2 + 1]), out[:, :, :n // 2 + 1], "fewer columns")
    # any strides: b stored transposed (a key block), a transposed, padded rows
    bt = torch.randn(g, n, k + 6, generator=gen)[..., 3:k + 3].transpose(1, 2)
    assert_bits_equal(bmm_rows(a, bt), _sequential(a, bt), "transposed b")
    at = a.transpose(1, 2).contiguous().transpose(1, 2)
    assert_bits_equal(bmm_rows(at, b), out, "transposed a")
    # bf16 b: the same as its values widened to fp32
    bh = b.bfloat16()
    assert_bits_equal(bmm_rows(a, bh), bmm_rows(a, bh.float()), "bf16 b")
    assert_bits_equal(bmm_rows(a, bt.bfloat16()), bmm_rows(a, bt.bfloat16().float().contiguous()), "bf16 b transposed")


@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_pool_offsets_and_rows_past_the_end(transposed):
    """b's matrices found by element offset in a strided pool, rows past b_rows read as +0.0
    however memory is filled there (NaN here)."""
    gen = torch.Generator().manual_seed(1)
    slots, h, k, n = 6, 3, 20, 24
    buf = torch.randn(slots + 1, h + 2, k + 3, n + 5, generator=gen)
    pool = buf[1:, 1:h + 1, :k, 2:n + 2]                 # [slots, H, K, N] view with gaps
    take = torch.tensor([4, 0, 2])
    a = torch.randn(len(take) * h, 2, k, generator=gen)
    rows = torch.tensor([20, 0, 7, 13, 1, 19, 20, 5, 9])
    expected_b = pool[take].reshape(-1, k, n).clone()
    for g, r in enumerate(rows.tolist()):
        expected_b[g, r:] = 0.0
    nan_buf = buf.clone()
    nan_pool = nan_buf[1:, 1:h + 1, :k, 2:n + 2]
    for g, r in enumerate(rows.tolist()):
        nan_pool[take[g // h], g % h, r:] = float("nan")
    if transposed:                                       # the same matrices, stored [N, K]
        t_buf = nan_pool.transpose(2, 3).contiguous()
        b0, offsets = t_buf[0, 0].t(), pool_offsets(t_buf, take)
    else:
        b0, offsets = nan_pool[0, 0], pool_offsets(nan_pool, take)
    out = bmm_rows(a, b0, offsets, rows)
    assert_bits_equal(out, bmm_rows(a, expected_b), "pool offsets + b_rows")
    assert not torch.isnan(out).any()


def test_bad_calls_name_the_problem():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="inner sizes"):
        bmm_rows(a, torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="float32"):
        bmm_rows(a.double(), b)
    with pytest.raises(ValueError, match="outside b's storage"):
        bmm_rows(a, b[0], torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="b_rows"):
        bmm_rows(a, b, None, torch.tensor([1]))


def test_gradients_against_float64():
    a = torch.randn(3, 4, 6, dtype=torch.float64)
    b = torch.randn(3, 6, 5, dtype=torch.float64)
    a32, b32 = a.float().requires_grad_(), b.float().requires_grad_()
    grad = torch.randn(3, 4, 5)
    bmm_rows(a32, b32).backward(grad)
    torch.testing.assert_close(a32.grad.double(), grad.double() @ b.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b32.grad.double(), a.transpose(1, 2) @ grad.double(), rtol=1e-5, atol=1e-5)


def test_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LOCKSTEP_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(NativeBuildError, match="no-such-cc"):
        library_path()
