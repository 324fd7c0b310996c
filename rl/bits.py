"""Where two tensors differ bit for bit: the one comparison behind every parity check's
message (tests, bench scripts, the rollout's self-check). NaN equals NaN in the same place;
anything else must be `torch.equal`."""
from __future__ import annotations

import torch


def first_difference(got: torch.Tensor, want: torch.Tensor) -> dict | None:
    """None when bit-equal; else the shapes or dtypes that differ, or how many elements
    differ, the first differing index, the two values there and the largest |difference|."""
    if got.shape != want.shape:
        return {"shape": [list(got.shape), list(want.shape)]}
    if got.dtype != want.dtype:
        return {"dtype": [str(got.dtype), str(want.dtype)]}
    if torch.equal(got, want):
        return None
    diff = got != want
    if got.is_floating_point():
        diff &= ~(got.isnan() & want.isnan())
    if not diff.any():
        return None
    index = [int(i) for i in diff.nonzero()[0]]
    delta = (got.double() - want.double()).abs()[diff].max()
    return {"num_differing": int(diff.sum()), "num_elements": diff.numel(), "first_index": index,
            "got": got[tuple(index)].item(), "want": want[tuple(index)].item(),
            "max_abs_diff": float(delta)}


def describe(difference: dict) -> str:
    """One line for an error message, from `first_difference`'s answer."""
    if "shape" in difference:
        return "shape {} != {}".format(*difference["shape"])
    if "dtype" in difference:
        return "dtype {} != {}".format(*difference["dtype"])
    return (f"bits differ at {difference['num_differing']} of {difference['num_elements']} elements; "
            f"first at index {tuple(difference['first_index'])}: {difference['got']!r} vs "
            f"{difference['want']!r}; max |delta| {difference['max_abs_diff']:.3e}")
