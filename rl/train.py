"""`lockstep train` / `python -m rl.train`: run RL from a YAML config with dotted overrides.

    lockstep train --config configs/grpo_arith_tiny.yaml trainer.zero_stage=3 algo.name=ppo
    python -m rl.train --config configs/grpo_arith_tiny.yaml --resume
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m rl.train --config configs/grpo_arith_tiny.yaml

Without `ray.address` (or RAY_ADDRESS, which `ray job submit` sets) a local Ray cluster is
started. The config is validated completely before anything starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate and print the placement plan only")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.zero_stage=3")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="run RL (GRPO/PPO/...) from a config")
    add_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from rl.config import ConfigError, load_run_config
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"lockstep train: {err}", file=sys.stderr)
        return 2
    if args.dry_run or cfg.run.dry_run:
        from rl.placement import plan_placement
        print(json.dumps({"config": cfg.name, "placement": plan_placement(cfg)}, indent=2))
        return 0
    from alignment.check import DriftAbort
    from rl.run import TrainerFailure, run
    try:
        summary = run(cfg, resume=args.resume)
    except DriftAbort as err:
        print(f"lockstep train: aborted: {err}", file=sys.stderr)
        return 3
    except TrainerFailure as err:
        print(f"lockstep train: {err}", file=sys.stderr)
        return 4
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m rl.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
