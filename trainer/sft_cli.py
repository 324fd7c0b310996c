"""`lockstep sft --config configs/sft_*.yaml [key=value ...]`: supervised warm start.

Loads the YAML into `trainer.sft.SFTConfig` (dotted overrides such as `steps=50` or
`trainer.lr=1e-3` apply on top), runs `trainer.sft.run_sft`, prints one JSON line per logged
step and the summary. Outputs: `<out_dir>/<name>/metrics.jsonl`, `summary.json`, `checkpoint/`.
"""
from __future__ import annotations

import argparse
import json
import sys


def load_config(path: str, overrides: list[str] | None = None):
    from rl.overrides import validate
    from trainer.sft import SFTConfig
    return validate(SFTConfig, path, overrides)


def main(args: argparse.Namespace) -> int:
    from trainer.sft import run_sft
    try:
        cfg = load_config(args.config, args.overrides)
    except (OSError, ValueError) as err:      # pydantic's ValidationError is a ValueError
        print(f"lockstep sft: {args.config}: {err}", file=sys.stderr)
        return 2
    summary = run_sft(cfg)
    print(json.dumps(summary))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("sft", help="supervised warm start on prompt/response pairs",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/sft_*.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=50")
    parser.set_defaults(func=main)
