"""Comparing a program's stdout with the expected output.

Both sides are trimmed (surrounding blank space removed, trailing spaces cut from every
line); then lines must match one to one. A line matches when equal as text, or when its
whitespace-separated tokens match pairwise, numeric tokens within `tol` (relative or
absolute), so `0.3333333` matches `0.33333333` and `10` matches `10.0`.
"""
from __future__ import annotations

import math


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def _number(token: str) -> float | None:
    try:
        x = float(token)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _tokens_match(a: str, b: str, tol: float) -> bool:
    if a == b:
        return True
    x, y = _number(a), _number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=tol, abs_tol=tol)


def outputs_match(actual: str, expected: str, tol: float = 1e-6) -> bool:
    got, want = _lines(actual), _lines(expected)
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if a.strip() == b.strip():
            continue
        ta, tb = a.split(), b.split()
        if len(ta) != len(tb) or not all(_tokens_match(x, y, tol) for x, y in zip(ta, tb)):
            return False
    return True
