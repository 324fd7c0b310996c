"""`lockstep mismatch` sub-command: prints a drift table and optionally writes JSON.

    lockstep mismatch --model configs/model/tiny.json --backend reference --prompts 32 \\
        --max-new-tokens 96 [--kernels lockstep|stock] [--seed S] --json OUT.json
"""
from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("mismatch", help="measure trainer-vs-rollout logprob drift")
    p.add_argument("--model", required=True, help="checkpoint directory or model config JSON (random weights)")
    p.add_argument("--backend", default="reference", choices=["reference", "vllm"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kernels", default="lockstep", choices=["lockstep", "stock"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-batch-size", type=int, default=3, help="trainer recompute micro-batch size")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the triton backend (reference backend)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="vllm backend: record every engine forward in DIR and replay it here, naming the "
                        "first engine step that differs from these kernels (prefix caching off for the run)")
    p.set_defaults(func=main)


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"lockstep mismatch — backend {result['backend']}, kernels {result['kernels']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("tokens", "max_abs_logprob_diff", "mean_abs_logprob_diff", "p99_abs_logprob_diff",
                "frac_bitwise_equal", "k3_kl", "ratio_min", "ratio_max"):
        v = result[key]
        table.add_row(key, f"{v:.6g}" if isinstance(v, float) else str(v))
    fd = result["first_divergent"]
    table.add_row("first_divergent", "none (bit-identical)" if fd is None else f"layer {fd['layer']}: {fd['component']}")
    if "engine_trace" in result:
        tr = result["engine_trace"]
        table.add_row("engine replay", f"{tr['steps']} steps, " + (tr["first_difference"] or "all bit-identical"))
    Console(stderr=False).print(table)


def main(args) -> int:
    from alignment.mismatch import run_mismatch
    for name in ("prompts", "max_new_tokens", "samples", "micro_batch_size"):
        if getattr(args, name) < 1:
            print(f"lockstep mismatch: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.trace is not None and args.backend != "vllm":
        print("lockstep mismatch: --trace: only the vllm backend has an engine to trace", file=sys.stderr)
        return 2
    if args.temperature <= 0:
        print("lockstep mismatch: --temperature must be > 0", file=sys.stderr)
        return 2
    result = run_mismatch(args.model, args.backend, args.prompts, args.max_new_tokens, args.samples,
                          args.temperature, args.seed, args.kernels, args.micro_batch_size, device=args.device,
                          trace=args.trace)
    render(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
