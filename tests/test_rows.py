"""rl.kernels.cpu.rows.bmm_rows: every output element is one defined sum (products rounded to
fp32, added from +0 in increasing k), so a row's bits do not depend on the rows, columns or
matrices beside it or on the operands' strides. The decode kernels rely on this to compute
only a step's live rows (tests/test_parity_*)."""
from __future__ import annotations

import pytest
import torch

from rl.kernels.cpu.native import NativeBuildError, library_path
from rl.kernels.cpu.rows import bmm_rows
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
    assert_bits_equal(bmm_rows(a, bt), bmm_rows(a, bt.contiguous()), "transposed b vs its copy")
    expanded = b[:1].expand(g, -1, -1)                  # stride 0 over the matrices
    assert_bits_equal(bmm_rows(a, expanded), bmm_rows(a, expanded.contiguous()), "expanded b")


def test_bad_calls_name_the_problem():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="inner sizes"):
        bmm_rows(a, torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="float32"):
        bmm_rows(a.double(), b)
    with pytest.raises(ValueError, match="float32"):
        bmm_rows(a, b.bfloat16())


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
