"""The `length` reward: a soft penalty for overlong completions (DAPO's overlong shaping).

With L the completion length, `max_length` M and `buffer` B: 0 when L <= M - B, falling
linearly to -1 at L = M, and -1 beyond. Length is measured in tokens when
`extra_info["response_length"]` (set by the rollout) is present, else in characters
(`unit="chars"`) or whitespace-separated words (`unit="words"`). Combine it with a weight.
"""
from __future__ import annotations


class LengthReward:
    name = "length"

    def __init__(self, max_length: int = 4096, buffer: int = 512, unit: str = "chars"):
        if max_length <= 0 or not 0 <= buffer <= max_length:
            raise ValueError("length: need max_length > 0 and 0 <= buffer <= max_length")
        if unit not in ("chars", "words"):
            raise ValueError(f"length.unit must be 'chars' or 'words', got {unit!r}")
        self.max_length, self.buffer, self.unit = max_length, buffer, unit

    def measure(self, solution_str: str, extra_info) -> int:
        if isinstance(extra_info, dict) and isinstance(extra_info.get("response_length"), int):
            return extra_info["response_length"]
        return len(solution_str) if self.unit == "chars" else len(solution_str.split())

    def __call__(self, data_source, solution_str, ground_truth=None, extra_info=None) -> dict:
        n = self.measure(str(solution_str), extra_info)
        free = self.max_length - self.buffer
        if n <= free:
            score = 0.0
        elif n >= self.max_length or self.buffer == 0:
            score = -1.0
        else:
            score = (free - n) / self.buffer
        return {"score": score, "length": float(n)}
