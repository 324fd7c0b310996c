"""rl/kernels/cpu/tiles.py: the AMX bf16 product every bf16 `linear` runs where the CPU has AMX.

Its promise (each element one fixed chain of tile ops over k, so a row's bits depend on the row
alone) is checked at the model shapes by test_kernels_invariance.py; here: that it computes
the product (against float64), its paddings and strides, its two output forms, that `linear`
really runs it (bf16 and fp32 out, packed or not), and its errors.
"""
import pytest
import torch

from bits import assert_bits_equal
from rl import kernels as K
from rl.kernels.cpu import amx, tiles

pytestmark = pytest.mark.skipif(not amx.supported(), reason="this CPU has no AMX tiles (the oneDNN path runs)")


def test_available_where_the_cpu_has_amx():
    """On an AMX CPU the cpu backend must have been granted AMX: otherwise every bf16 product
    would silently take the fallback path, with other bits."""
    assert tiles.available()


@pytest.mark.parametrize("m,n,k", [(1, 8, 128), (5, 100, 64), (16, 64, 32), (17, 130, 1000), (40, 2000, 1024),
                                   (3, 16, 2816), (64, 257, 96)], ids=str)
def test_product_against_float64(m, n, k):
    x = torch.randn(m, k).bfloat16()
    w = (torch.randn(n, k) * 0.05).bfloat16()
    got = tiles.product(x, tiles.pack(w), torch.float32).double()
    exact = x.double() @ w.double().t()
    # fp32 accumulation of k exact products: error a few ulps of the sum of magnitudes
    bound = 4 * k * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t()) + 1e-30
    worst = ((got - exact).abs() / bound).max().item()
    assert worst <= 1.0, f"[{m}x{k}]·[{n}x{k}]ᵀ: error {worst:.3g} x the bound"


@pytest.mark.parametrize("m,n,k", [(1, 8, 128), (33, 300, 1024), (7, 1000, 40)], ids=str)
def test_every_row_alone_and_bf16_is_fp32_rounded(m, n, k):
    x = torch.randn(m, k).bfloat16()
    packed = tiles.pack(torch.randn(n, k).bfloat16())
    full = tiles.product(x, packed, torch.float32)
    for i in range(m):
        assert_bits_equal(tiles.product(x[i:i + 1], packed, torch.float32), full[i:i + 1], f"row {i} alone")
    assert_bits_equal(tiles.product(x, packed, torch.bfloat16), full.bfloat16(), "bf16 out vs fp32 out rounded")


def test_strided_operands_give_the_same_bits():
    k = 256
    big = torch.randn(20, 2 * k).bfloat16()
    x = big[:, :k]                                 # rows 2k apart
    w_big = torch.randn(300, 3 * k).bfloat16()
    w = w_big[:, k:2 * k]
    want = tiles.product(x.contiguous(), tiles.pack(w.contiguous()), torch.float32)
    assert_bits_equal(tiles.product(x, tiles.pack(w), torch.float32), want, "strided x and w")
    assert_bits_equal(tiles.product(big.t().contiguous().t()[:, :k], tiles.pack(w), torch.float32), want,
                      "column-major x")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16-out", "fp32-out"])
def test_linear_runs_the_tile_product(out_dtype):
    """Trainer (no pack, autograd) and engine (packed) both reach `tiles.product`."""
    x = torch.randn(37, 512).bfloat16()
    w = (torch.randn(700, 512) * 0.05).bfloat16()
    want = tiles.product(x, tiles.pack(w), out_dtype)
    assert_bits_equal(K.linear(x, w, out_dtype=out_dtype), want, "linear, unpacked")
    w_train = w.clone().requires_grad_(True)
    assert_bits_equal(K.linear(x, w_train, out_dtype=out_dtype).detach(), want, "linear under autograd")
    assert K.prepack([w]) == 1
    assert_bits_equal(K.linear(x, w, out_dtype=out_dtype), want, "linear, prepacked")


def test_bad_calls():
    w = torch.randn(32, 64).bfloat16()
    with pytest.raises(ValueError, match="2D bf16"):
        tiles.pack(w.float())
    packed = tiles.pack(w)
    with pytest.raises(ValueError, match=r"bf16 \[M, 64\]"):
        tiles.product(torch.randn(4, 63).bfloat16(), packed, torch.float32)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        tiles.product(torch.randn(4, 64).bfloat16(), packed, torch.float16)
    assert tiles.product(torch.randn(0, 64).bfloat16(), packed, torch.float32).shape == (0, 32)


def test_product_groups_is_each_groups_product():
    """A MoE layer's experts in one call: row group g times part g of one packed stack."""
    parts, n, k = 3, 128, 96
    w = torch.randn(parts * n, k).bfloat16()
    packed = tiles.pack(w)
    counts = [5, 0, 17]
    x = torch.randn(sum(counts), k).bfloat16()
    got = tiles.product_groups(x, counts, packed, parts, torch.bfloat16)
    start = 0
    for g, count in enumerate(counts):
        want = tiles.product(x[start:start + count], tiles.pack(w[g * n:(g + 1) * n]), torch.bfloat16)
        assert_bits_equal(got[start:start + count], want, f"group {g}")
        start += count
    with pytest.raises(ValueError, match="multiple of 64"):
        tiles.product_groups(x, [11, 11], tiles.pack(torch.randn(2 * 40, k).bfloat16()), 2, torch.bfloat16)
    with pytest.raises(ValueError, match=r"bf16 \[23, 96\]"):
        tiles.product_groups(x, [11, 0, 12], packed, parts, torch.bfloat16)
    # rows gathered on the way: output row r is the product of x's row rows[r]
    source = torch.randn(9, k).bfloat16()
    rows = torch.randint(0, 9, (sum(counts),))
    assert_bits_equal(tiles.product_groups(source, counts, packed, parts, torch.float32, rows=rows),
                      tiles.product_groups(source[rows], counts, packed, parts, torch.float32), "gathered rows")
    bad = rows.clone()
    bad[0], bad[-1] = 0, 9                 # the C call would read past x: refused
    with pytest.raises(ValueError, match=r"rows \[0, 9\] outside"):
        tiles.product_groups(source, counts, packed, parts, torch.bfloat16, rows=bad)
