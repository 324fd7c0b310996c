"""Deciding whether two math answers are equivalent; runs inside the worker pool.

`judge(gold, pred)` returns "correct", "wrong" or "parse_error". Plain numbers on both
sides are compared exactly (rewards/numbers.py); anything else goes to math-verify (LaTeX
and expression parsing via latex2sympy2_extended, then sympy equivalence: fractions,
radicals, expressions, intervals, sets, equations like `x=3` against `3`). math-verify's
own signal-based timeouts are off: the pool's hard timeout is the only one.
"""
from __future__ import annotations

import logging
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Basic, MatrixBase

from rewards.numbers import numbers_equal, parse_number

logging.getLogger("math_verify").setLevel(logging.ERROR)
_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())


@lru_cache(maxsize=4096)
def _parsed(answer: str) -> tuple:
    found = parse("\\boxed{" + answer + "}", extraction_config=_CONFIG, parsing_timeout=None)
    if not any(isinstance(x, (Basic, MatrixBase)) for x in found):
        return ()
    return tuple(found)


def judge(gold: str, pred: str) -> str:
    gold_num, pred_num = parse_number(gold), parse_number(pred)
    if gold_num is not None and pred_num is not None:
        return "correct" if numbers_equal(gold_num, pred_num) else "wrong"
    gold_parsed, pred_parsed = _parsed(gold), _parsed(pred)
    if not gold_parsed or not pred_parsed:
        return "parse_error"
    ok = verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None)
    return "correct" if ok else "wrong"
