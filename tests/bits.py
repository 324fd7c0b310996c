"""assert_bits_equal: torch.equal with a useful failure message (first differing index, max delta)."""
import torch

from rl.bits import describe, first_difference


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    difference = first_difference(actual, expected)
    if difference is not None:
        raise AssertionError(f"{what}: {describe(difference)}")
