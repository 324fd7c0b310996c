"""The `format` reward: 1.0 when the completion has the expected shape, else 0.0.

Presets (kwarg `preset`): `think_answer` (the default: `<think>...</think>` then
`<answer>...</answer>` and nothing else, R1 style), `boxed` (a complete `\\boxed{...}`),
`gsm8k` (a `#### <number>` line), `code_block` (a fenced python block). Or pass `pattern`,
a regular expression the whole (stripped) completion must match (DOTALL).
"""
from __future__ import annotations

import re

from rewards.answer import after_hashes, last_boxed
from rewards.code.extract import PYTHON_TAGS, fenced_blocks
from rewards.numbers import parse_number

_THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
PRESETS = {
    "think_answer": lambda s: _THINK_ANSWER.fullmatch(s) is not None,
    "boxed": lambda s: last_boxed(s) is not None,
    "gsm8k": lambda s: (a := after_hashes(s)) is not None and parse_number(a) is not None,
    "code_block": lambda s: any(tag in PYTHON_TAGS for tag, _ in fenced_blocks(s)),
}


class FormatReward:
    name = "format"

    def __init__(self, preset: str = "think_answer", pattern: str | None = None):
        if pattern is not None:
            try:
                regex = re.compile(pattern, re.DOTALL)
            except re.error as err:
                raise ValueError(f"format.pattern is not a valid regular expression: {err}") \
                    from None
            self._check = lambda s: regex.fullmatch(s) is not None
        elif preset in PRESETS:
            self._check = PRESETS[preset]
        else:
            raise ValueError(f"format.preset must be one of {sorted(PRESETS)}, got {preset!r}")

    def __call__(self, data_source, solution_str, ground_truth=None, extra_info=None) -> float:
        return 1.0 if self._check(str(solution_str).strip()) else 0.0
