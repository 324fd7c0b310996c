"""Prompt datasets: GSM8K / HumanEval style JSONL loaders and synthetic task generators.

Every row the RL driver gets is a dict with `prompt`, `ground_truth`, `data_source` and
`extra_info` (what rewards.compute_score takes), plus `answer` for synthetic tasks (the exact
string a model should emit, for supervised warm-up and tests).

Loaders: `load_gsm8k` (`question` / `answer` with a final `#### N`), `load_humaneval`
(`task_id`, `prompt`, `test`, `entry_point`; `.jsonl` or `.jsonl.gz`), `load_prompts`
(rows already in the shape above). Malformed rows are skipped, each named by file and line
in `Dataset.skipped` and summarised in one warning; `strict=True` raises instead.

Generators (the CPU demo trains a tiny character-level model from scratch):
`arithmetic_tasks(n, seed, digits=, ops=, split=)` yields `"12+7="` -> `"19"` problems;
`code_tasks(n, seed, split=)` yields one-line Python functions to infer from examples.
Both are deterministic for a seed; a problem belongs to the `train` or the `test` split by a
hash of the problem itself, so the splits never overlap whatever the seeds.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

ARITH_SOURCE = "arith"
CODE_SOURCE = "code_tiny"
TEST_PERMILLE = 100  # share of problems (per thousand) reserved for the test split


class Dataset(list):
    """A list of rows that also remembers which input lines were skipped and why."""

    def __init__(self, rows=(), skipped=()):
        super().__init__(rows)
        self.skipped: list[str] = list(skipped)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path, parse_row, strict: bool) -> Dataset:
    """Rows from parse_row(obj) for each line; a ValueError from it marks the row bad."""
    path = Path(path)
    data = Dataset()
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
                data.append(parse_row(obj))
            except ValueError as err:
                message = f"{path}:{lineno}: {err}"
                if strict:
                    raise ValueError(message) from None
                data.skipped.append(message)
    if data.skipped:
        log.warning("%s: skipped %d malformed rows (first: %s)", path, len(data.skipped),
                    data.skipped[0])
    return data


def _field(obj: dict, name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {name!r} missing or not a non-empty string")
    return value


def gsm8k_final_answer(answer: str) -> str:
    """The number after the last `####`, thousands separators removed."""
    if "####" not in answer:
        raise ValueError("field 'answer' has no '#### <final answer>'")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not final:
        raise ValueError("field 'answer' has an empty final answer after '####'")
    return final


GSM8K_INSTRUCTION = "\nGive the final answer after '####'."


def load_gsm8k(path, *, instruction: str = GSM8K_INSTRUCTION, strict: bool = False) -> Dataset:
    """GSM8K-style JSONL: `question`, `answer` (worked solution ending `#### N`)."""
    def parse(obj: dict) -> dict:
        question, answer = _field(obj, "question"), _field(obj, "answer")
        return {"prompt": question + instruction, "ground_truth": gsm8k_final_answer(answer),
                "data_source": "gsm8k", "extra_info": {"solution": answer}}
    return _read_jsonl(path, parse, strict)


def load_humaneval(path, *, strict: bool = False) -> Dataset:
    """HumanEval-style JSONL(.gz): `task_id`, `prompt`, `test` (defines check), `entry_point`.

    ground_truth is the `code` reward's assert form: the test code followed by
    `check(<entry_point>)`, with the prompt as `prefix` so a completion may be the function
    body alone.
    """
    def parse(obj: dict) -> dict:
        prompt, test = _field(obj, "prompt"), _field(obj, "test")
        entry = _field(obj, "entry_point")
        if not entry.isidentifier():
            raise ValueError(f"field 'entry_point' is not an identifier: {entry!r}")
        return {"prompt": prompt, "data_source": "humaneval",
                "ground_truth": {"assert": f"{test}\n\ncheck({entry})\n", "entry_point": entry,
                                 "prefix": prompt},
                "extra_info": {"task_id": str(obj.get("task_id", ""))}}
    return _read_jsonl(path, parse, strict)


def load_prompts(path, *, strict: bool = False) -> Dataset:
    """JSONL rows already shaped {prompt, ground_truth, data_source?, extra_info?}."""
    def parse(obj: dict) -> dict:
        if "ground_truth" not in obj:
            raise ValueError("field 'ground_truth' missing")
        extra = obj.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise ValueError("field 'extra_info' must be an object")
        return {"prompt": _field(obj, "prompt"), "ground_truth": obj["ground_truth"],
                "data_source": str(obj.get("data_source", "")), "extra_info": extra}
    return _read_jsonl(path, parse, strict)


def split_of(key: str) -> str:
    """'train' or 'test' for a problem, decided by a hash of its text alone."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big")
    return "test" if h % 1000 < TEST_PERMILLE else "train"


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


ENUMERATE_LIMIT = 200_000  # universes up to this size are listed, larger ones sampled


def _sample(n: int, seed: int, split: str, unique: bool, draw, make,
            universe: list[tuple] | None) -> Iterator[dict]:
    """`n` problems of `split`, deterministic in (seed, split).

    `universe` lists every problem as arguments of `make(*args) -> (key, row)`; `draw(rng)`
    returns such arguments at random. With the universe listed (small settings) the split's
    problems are shuffled and
    dealt: all distinct first when `unique`, then again in a new order when n exceeds them
    (a warning says so), or drawn independently when not `unique`. Otherwise problems are
    drawn with rng and rejected when in the other split (or already dealt, when `unique`).
    """
    _check_split(split)
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(f"{seed}:{split}")
    if universe is not None:
        pool = [args for args in universe if split_of(make(*args)[0]) == split]
        if not pool:
            raise ValueError(f"no {split} problems exist with these settings")
        if not unique:
            for _ in range(n):
                yield make(*rng.choice(pool))[1]
            return
        if n > len(pool):
            log.warning("only %d distinct %s problems exist with these settings; %d asked, "
                        "so they repeat", len(pool), split, n)
        made = 0
        while made < n:
            for args in rng.sample(pool, len(pool)):
                if made == n:
                    return
                made += 1
                yield make(*args)[1]
        return
    seen: set[str] = set()
    made = attempts = 0
    while made < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(f"could not find {n} distinct {split} problems")
        key, row = make(*draw(rng))
        if split_of(key) != split or (unique and key in seen):
            continue
        seen.add(key)
        made += 1
        yield row


def arithmetic_tasks(n: int, seed: int = 0, *, digits: int = 2, ops: str = "+-*",
                     split: str = "train", unique: bool | None = None) -> Iterator[dict]:
    """`n` problems like {"prompt": "12+7=", "answer": "19", ...}, operands < 10**digits.

    `ops` is any subset of "+-*". Results may be negative ("3-7=" -> "-4"). The test split
    deals distinct problems by default (unique=True) and repeats only once all are used
    (1 digit with "+-" has about 20); train draws independently.
    """
    if digits < 1 or not ops or set(ops) - set("+-*"):
        raise ValueError("arithmetic_tasks: digits >= 1 and ops a non-empty subset of '+-*'")
    unique = (split == "test") if unique is None else unique
    ops_list = sorted(set(ops))
    high = 10 ** digits - 1

    def make(a: int, op: str, b: int) -> tuple[str, dict]:
        value = a + b if op == "+" else a - b if op == "-" else a * b
        prompt = f"{a}{op}{b}="
        return prompt, {"prompt": prompt, "answer": str(value), "ground_truth": str(value),
                        "data_source": ARITH_SOURCE, "extra_info": {"split": split}}

    def draw(rng: random.Random) -> tuple:
        return rng.randint(0, high), rng.choice(ops_list), rng.randint(0, high)

    universe = None
    if (high + 1) ** 2 * len(ops_list) <= ENUMERATE_LIMIT:
        universe = [(a, op, b) for op in ops_list for a in range(high + 1)
                    for b in range(high + 1)]
    return _sample(n, seed, split, unique, draw, make, universe)


# (template with {k} and {m}, python expression) — one-line functions of x
_CODE_FAMILIES = (
    ("x+{k}", lambda x, k, m: x + k),
    ("x-{k}", lambda x, k, m: x - k),
    ("x*{k}", lambda x, k, m: x * k),
    ("x*{k}+{m}", lambda x, k, m: x * k + m),
    ("x*x+{k}", lambda x, k, m: x * x + k),
    ("{k}-x", lambda x, k, m: k - x),
)
_SHOWN_XS = (1, 2, 3)
_TEST_XS = (0, 1, 2, 3, 5, 10, -4)


def code_tasks(n: int, seed: int = 0, *, split: str = "train",
               unique: bool | None = None) -> Iterator[dict]:
    """`n` tiny coding tasks: infer a one-line function from three examples.

    prompt: "# f(1)=4 f(2)=5 f(3)=6\\ndef f(x):\\n    return "; answer: "x+3"; ground_truth:
    the `code` reward's assert form, seven asserts (including inputs not shown), with the
    `def` line as prefix so the completion is just the expression.
    """
    unique = (split == "test") if unique is None else unique

    def make(template: str, fn, k: int, m: int) -> tuple[str, dict]:
        expr = template.format(k=k, m=m)
        shown = " ".join(f"f({x})={fn(x, k, m)}" for x in _SHOWN_XS)
        header = "def f(x):\n    return "
        tests = [f"assert f({x}) == {fn(x, k, m)}" for x in _TEST_XS]
        return expr, {"prompt": f"# {shown}\n{header}", "answer": expr,
                      "data_source": CODE_SOURCE,
                      "ground_truth": {"assert": tests, "entry_point": "f", "prefix": header},
                      "extra_info": {"split": split}}

    universe = []
    for template, fn in _CODE_FAMILIES:
        # k >= 2 where it multiplies, so x*1+3 never duplicates x+3 across the splits
        for k in range(2 if "*{k}" in template else 1, 10):
            for m in range(1, 10) if "{m}" in template else [0]:
                universe.append((template, fn, k, m))
    return _sample(n, seed, split, unique, None, make, universe)
