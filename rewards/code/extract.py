"""Finding the program in a model completion.

The last fenced block tagged python/py/python3 wins; else the last fenced block of any
tag; else, when the completion has no fence at all, the whole completion. An opening fence
without a closing one (a truncated generation) takes the rest of the text.
"""
from __future__ import annotations

import re

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n", re.MULTILINE)
_CLOSE = re.compile(r"^[ \t]*```[ \t]*$", re.MULTILINE)
PYTHON_TAGS = {"python", "py", "python3"}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(tag, body) of each fenced block, in order."""
    blocks, pos = [], 0
    while True:
        opening = _FENCE.search(text, pos)
        if opening is None:
            return blocks
        closing = _CLOSE.search(text, opening.end())
        end = closing.start() if closing else len(text)
        blocks.append((opening.group(1).lower(), text[opening.end():end]))
        if closing is None:
            return blocks
        pos = closing.end()


def extract_program(completion: str) -> str:
    blocks = fenced_blocks(completion)
    python = [body for tag, body in blocks if tag in PYTHON_TAGS]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return completion
