"""`lockstep rewards`: list the available rewards, or score a JSONL file with one.

    lockstep rewards list
    lockstep rewards check math --data completions.jsonl
    lockstep rewards check my_pkg.scores:compute_score --data f.jsonl --kwargs '{"k": 1}'

`check` reads rows with `solution_str` (or `response`/`completion`), `ground_truth`, and
optionally `data_source` and `extra_info`; malformed rows are skipped and reported with
their line. It prints a summary (mean score, pass fraction, the reward's metrics,
throughput; `--json` for machine-readable output). Exit status 0, or 2 when the reward
cannot be loaded or the file cannot be read.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("rewards", help="list reward functions or score a file",
                                   description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="rewards_action", required=True)
    p_list = actions.add_parser("list", help="show built-in and installed rewards")
    p_list.set_defaults(func=cmd_list)
    p_check = actions.add_parser("check", help="score a JSONL file and print a summary")
    p_check.add_argument("spec", help="reward name, package.module:function or file.py:fn")
    p_check.add_argument("--data", required=True, help="JSONL file of completions")
    p_check.add_argument("--kwargs", default="{}", help="JSON object passed to the reward")
    p_check.add_argument("--data-source", default="", help="data_source for rows without one")
    p_check.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    p_check.add_argument("--concurrency", type=int, default=8)
    p_check.add_argument("--json", action="store_true", help="print the summary as JSON")
    p_check.set_defaults(func=cmd_check)


def cmd_list(args) -> int:
    from rewards.registry import available
    infos = available()
    width = max(len(i.name) for i in infos)
    for info in infos:
        print(f"{info.name:<{width}}  {info.source:<28}  {info.target}")
    return 0


def read_rows(path: str, default_source: str, limit: int | None):
    """(rows, skipped messages). A row needs solution_str (or an alias) and ground_truth."""
    from rewards.batch import ScoreItem
    rows, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                skipped.append(f"{path}:{lineno}: not JSON ({err})")
                continue
            if not isinstance(obj, dict):
                skipped.append(f"{path}:{lineno}: not a JSON object")
                continue
            text = next((obj[k] for k in ("solution_str", "response", "completion")
                         if k in obj), None)
            if not isinstance(text, str):
                skipped.append(f"{path}:{lineno}: missing string field 'solution_str'")
                continue
            if "ground_truth" not in obj:
                skipped.append(f"{path}:{lineno}: missing field 'ground_truth'")
                continue
            extra = obj.get("extra_info")
            if extra is not None and not isinstance(extra, dict):
                skipped.append(f"{path}:{lineno}: 'extra_info' must be an object")
                continue
            rows.append(ScoreItem(str(obj.get("data_source", default_source)), text,
                                  obj["ground_truth"], extra))
    return rows, skipped


def cmd_check(args) -> int:
    from rewards.batch import Component, RewardFn
    from rewards.registry import RewardPluginError, resolve
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("must be a JSON object")
    except ValueError as err:
        print(f"lockstep rewards check: --kwargs: {err}", file=sys.stderr)
        return 2
    try:
        fn = resolve(args.spec, **kwargs)
    except RewardPluginError as err:
        print(f"lockstep rewards check: {err}", file=sys.stderr)
        return 2
    try:
        rows, skipped = read_rows(args.data, args.data_source, args.limit)
    except OSError as err:
        print(f"lockstep rewards check: --data: {err}", file=sys.stderr)
        return 2
    for message in skipped[:20]:
        print(f"skipped {message}", file=sys.stderr)
    name = args.spec.rpartition(":")[2] or args.spec
    scorer = RewardFn([Component(name, 1.0, fn, tuple(getattr(fn, "count_metrics", ())))],
                      concurrency=args.concurrency)
    start = time.perf_counter()
    scores, metrics = scorer.score_batch(rows) if rows else ([], {})
    elapsed = time.perf_counter() - start
    scorer.close()
    summary = {
        "reward": args.spec, "file": args.data, "rows": len(rows), "skipped": len(skipped),
        "mean": sum(scores) / len(scores) if scores else 0.0,
        "pass_fraction": sum(s >= 1.0 for s in scores) / len(scores) if scores else 0.0,
        "min": min(scores, default=0.0), "max": max(scores, default=0.0),
        "seconds": round(elapsed, 3),
        "items_per_s": round(len(rows) / elapsed, 1) if rows and elapsed > 0 else None,
        "metrics": {k: v for k, v in metrics.items() if k not in ("reward/time_s",)},
    }
    sandbox = getattr(fn, "sandbox", None)
    if sandbox is not None and hasattr(sandbox, "isolation"):
        summary["sandbox_isolation"] = sandbox.isolation()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            if key == "metrics":
                for mk, mv in value.items():
                    print(f"  {mk:<32} {mv:.4g}")
            else:
                print(f"{key:<18} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lockstep")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
