"""Parsing the `code` reward's ground truth into tests, with errors that name the field.

Two forms (a dict, or its JSON text):

* `{"tests": [{"stdin": "...", "stdout": "..."}, ...]}` — run the program once per test,
  compare stdout (see compare.py). `input`/`output` are accepted as aliases.
* `{"assert": "code" | ["code", ...], "entry_point": "f", "setup": "...", "prefix": "..."}`
  — HumanEval style. Each string is one test; names it uses that it does not define (the
  entry point, helpers) resolve to the program's. `setup` runs first in the checker;
  `prefix` (e.g. the HumanEval prompt) is prepended to the program when the program does not
  define the entry point itself, so a completion may be just the function body.
"""
from __future__ import annotations

import ast
import builtins
import json
from dataclasses import dataclass


@dataclass
class StdioTests:
    stdins: list[str]
    stdouts: list[str]


@dataclass
class AssertTests:
    units: list[str]
    entry_point: str
    setup: str = ""
    prefix: str = ""


def _string(value, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {type(value).__name__}")
    return value


def parse_tests(ground_truth) -> StdioTests | AssertTests:
    gt = ground_truth
    if isinstance(gt, (str, bytes)):
        try:
            gt = json.loads(gt)
        except ValueError as err:
            raise ValueError(f"ground_truth: not JSON ({err})") from None
    if not isinstance(gt, dict):
        raise ValueError(f"ground_truth must be a dict with 'tests' or 'assert', got "
                         f"{type(gt).__name__}")
    if "tests" in gt:
        tests = gt["tests"]
        if not isinstance(tests, list) or not tests:
            raise ValueError("ground_truth.tests must be a non-empty list")
        stdins, stdouts = [], []
        for i, test in enumerate(tests):
            if not isinstance(test, dict):
                raise ValueError(f"ground_truth.tests[{i}] must be a dict")
            stdin = test.get("stdin", test.get("input", ""))
            if "stdout" not in test and "output" not in test:
                raise ValueError(f"ground_truth.tests[{i}].stdout is missing")
            stdout = test.get("stdout", test.get("output"))
            stdins.append(_string(stdin, f"ground_truth.tests[{i}].stdin"))
            stdouts.append(_string(stdout, f"ground_truth.tests[{i}].stdout"))
        return StdioTests(stdins, stdouts)
    if "assert" in gt:
        units = gt["assert"]
        units = [units] if isinstance(units, str) else units
        if not isinstance(units, list) or not units:
            raise ValueError("ground_truth.assert must be a string or a non-empty list")
        units = [_string(u, f"ground_truth.assert[{i}]") for i, u in enumerate(units)]
        entry = gt.get("entry_point")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise ValueError("ground_truth.entry_point must be a Python identifier")
        return AssertTests(units, entry, _string(gt.get("setup", ""), "ground_truth.setup"),
                           _string(gt.get("prefix", ""), "ground_truth.prefix"))
    raise ValueError("ground_truth needs 'tests' (stdin/stdout) or 'assert' (with "
                     "'entry_point')")


def free_names(sources: list[str], entry_point: str) -> list[str]:
    """Names the test code reads but never binds (and that are not builtins), plus the
    entry point: the checker asks the program for exactly these. Builtins are excluded so
    a program cannot shadow `len` or `abs` inside the tests."""
    loads, bound = set(), set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # the checker reports the syntax error as that test's failure
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
    names = (loads - bound - set(dir(builtins))) | {entry_point}
    return sorted(n for n in names if not n.startswith("__"))
