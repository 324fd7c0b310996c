"""Finding the final answer in a math completion.

Order: the last `\\boxed{...}` (or `\\fbox{...}`), else the text after the last `####`
(GSM8K style, to the end of that line), else the configured answer pattern. A pattern is a
regular expression whose last match's first group (or whole match) is the answer, searched
in the last `PATTERN_WINDOW` characters; the special pattern `"whole"` takes the whole
completion, stripped (used for the synthetic `arith` tasks, whose completions are bare
numbers). All scans are linear in the text, so a megabyte of junk costs microseconds.
"""
from __future__ import annotations

import re
from functools import lru_cache

WHOLE = "whole"
PATTERN_WINDOW = 10_000
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] == '{', or None if unbalanced."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}`; `\\boxed 5` (no braces) also counts."""
    end = len(text)
    while True:
        pos = max(text.rfind(cmd, 0, end) for cmd in _BOX_COMMANDS)
        if pos < 0:
            return None
        cmd_len = len("\\boxed") if text.startswith("\\boxed", pos) else len("\\fbox")
        i = pos + cmd_len
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            inner = _braced(text, i)
            if inner is not None:
                return inner
        elif i > pos + cmd_len:  # "\boxed 5": up to the next space or $
            m = re.match(r"[^\s$]+", text[i:i + 1000])
            if m:
                return m.group(0)
        end = pos  # unbalanced (truncated) box: try an earlier one


def after_hashes(text: str) -> str | None:
    pos = text.rfind("####")
    if pos < 0:
        return None
    rest = text[pos + 4:]
    line = rest.split("\n", 1)[0].strip()
    return line or None


@lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"answer_pattern {pattern!r} is not a valid regular expression: "
                         f"{err}") from None


def by_pattern(text: str, pattern: str) -> str | None:
    if pattern == WHOLE:
        stripped = text.strip()
        return stripped or None
    last = None
    for m in _compile(pattern).finditer(text[-PATTERN_WINDOW:]):
        last = m
    if last is None:
        return None
    return (last.group(1) if last.re.groups else last.group(0)).strip() or None


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The final answer of a completion, or None when it states none."""
    if pattern == WHOLE:
        return by_pattern(text, WHOLE)
    found = last_boxed(text)
    if found is None:
        found = after_hashes(text)
    if found is None and pattern:
        found = by_pattern(text, pattern)
    return found.strip() if found is not None else None


def gold_answer(ground_truth) -> str:
    """The reference answer: a number, a bare answer, or a full GSM8K solution (`#### N`)."""
    if isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float)):
        raise ValueError(f"ground_truth for math must be a string or number, got "
                         f"{type(ground_truth).__name__}")
    text = str(ground_truth)
    found = last_boxed(text) if "\\boxed" in text or "\\fbox" in text else None
    if found is None and "####" in text:
        found = after_hashes(text)
    return (found if found is not None else text).strip()
