"""rl.bits.first_difference: the comparison behind every parity message."""
import torch

from rl.bits import describe, first_difference


def test_equal_and_nan_in_the_same_place_are_equal():
    a = torch.tensor([[1.0, float("nan")], [3.0, -0.0]])
    assert first_difference(a, a.clone()) is None
    assert first_difference(torch.arange(5), torch.arange(5)) is None


def test_first_index_count_and_delta():
    a = torch.zeros(3, 4)
    b = a.clone()
    b[1, 2], b[2, 0] = 1e-7, -2.0
    d = first_difference(b, a)
    assert d["first_index"] == [1, 2] and d["num_differing"] == 2 and d["num_elements"] == 12
    assert d["got"] == b[1, 2].item() and d["want"] == 0.0 and d["max_abs_diff"] == 2.0
    assert "first at index (1, 2)" in describe(d)


def test_nan_against_a_number_differs():
    d = first_difference(torch.tensor([float("nan")]), torch.tensor([0.0]))
    assert d["first_index"] == [0]


def test_shape_and_dtype_are_named():
    assert "shape [2] != [3]" == describe(first_difference(torch.zeros(2), torch.zeros(3)))
    # torch.equal promotes dtypes; a bitwise check must not
    assert "dtype" in describe(first_difference(torch.ones(2), torch.ones(2, dtype=torch.bfloat16)))
