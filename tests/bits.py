"""assert_bits_equal: torch.equal with a useful failure message (first differing index, max delta)."""
import torch


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if torch.equal(actual, expected):
        return
    diff = actual.float() != expected.float()
    both_nan = actual.float().isnan() & expected.float().isnan()
    diff &= ~both_nan
    if not diff.any():
        return
    first = tuple(int(i) for i in diff.nonzero()[0])
    delta = (actual.float() - expected.float()).abs()[diff].max()
    raise AssertionError(f"{what}: bits differ at {int(diff.sum())} of {diff.numel()} elements; "
                         f"first at index {first}: {actual[first].item()!r} vs {expected[first].item()!r}; "
                         f"max |delta| {delta.item():.3e}")
