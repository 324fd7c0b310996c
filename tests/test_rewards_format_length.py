"""The small built-in rewards: `format` (presets and custom patterns) and `length`
(DAPO-style overlong shaping)."""
from __future__ import annotations

import pytest

from rewards.format import FormatReward
from rewards.length import LengthReward


@pytest.mark.parametrize("preset, text, want", [
    ("think_answer", "<think>a</think>\n<answer>3</answer>", 1.0),
    ("think_answer", "<think>a</think> <answer>3</answer> extra", 0.0),
    ("think_answer", "<answer>3</answer>", 0.0),
    ("boxed", "so \\boxed{\\frac{1}{2}}", 1.0),
    ("boxed", "so \\boxed{\\frac{1}{2}", 0.0),
    ("gsm8k", "work\n#### 1,234", 1.0),
    ("gsm8k", "#### many", 0.0),
    ("code_block", "```python\nprint(1)\n```", 1.0),
    ("code_block", "print(1)", 0.0),
])
def test_format_presets(preset, text, want):
    assert FormatReward(preset=preset)("d", text, None, None) == want


def test_format_custom_pattern_and_errors():
    fmt = FormatReward(pattern=r"Answer: \d+")
    assert fmt("d", " Answer: 12 ", None, None) == 1.0
    assert fmt("d", "Answer: 12 because", None, None) == 0.0
    with pytest.raises(ValueError, match="format.preset"):
        FormatReward(preset="nope")
    with pytest.raises(ValueError, match="format.pattern"):
        FormatReward(pattern="(")


@pytest.mark.parametrize("n, want", [(0, 0.0), (80, 0.0), (90, -0.5), (100, -1.0), (500, -1.0)])
def test_length_overlong_penalty(n, want):
    reward = LengthReward(max_length=100, buffer=20)
    res = reward("d", "x" * n, None, None)
    assert res["score"] == pytest.approx(want) and res["length"] == n


def test_length_prefers_token_counts_and_checks_arguments():
    reward = LengthReward(max_length=10, buffer=5, unit="words")
    assert reward("d", "a b c", None, None)["length"] == 3
    assert reward("d", "a", None, {"response_length": 10})["score"] == -1.0
    with pytest.raises(ValueError):
        LengthReward(max_length=10, buffer=11)
    with pytest.raises(ValueError, match="length.unit"):
        LengthReward(unit="bytes")
