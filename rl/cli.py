"""`lockstep` console script: one sub-command per module.

Each sub-command lives in the module that owns it and exposes `add_parser(subparsers)`,
which registers its arguments and sets `func` (called with the parsed args, returns an
exit code). Modules are imported lazily so `lockstep --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module that defines add_parser(subparsers)
SUBCOMMANDS = {
    "mismatch": "alignment.cli",
    "rewards": "rewards.cli",
    "sft": "trainer.sft_cli",
    "train": "rl.train",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lockstep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see `lockstep {name} --help`)")
            continue
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only).parse_args(argv)
    if not hasattr(args, "func"):
        print(f"lockstep {args.command}: not available in this build", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
