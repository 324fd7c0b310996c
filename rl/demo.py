"""`make demo`: SFT warm start of the tiny model on synthetic addition, then GRPO with the
math reward through vLLM rollout and the DeepSpeed trainer on a local Ray cluster.

    .venv/bin/python -m rl.demo [--sft-config ...] [--rl-config ...] [overrides...]

Prints held-out accuracy before (after SFT) and after RL over the same problems, and the
logprob drift of every RL step (it must read exactly 0). Outputs: runs/sft_arith_tiny/,
runs/grpo_arith_tiny/ (metrics.jsonl, report.png, checkpoints).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-config", default="configs/sft_arith_tiny.yaml")
    parser.add_argument("--rl-config", default="configs/grpo_arith_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the RL config")
    args = parser.parse_args(argv)
    t0 = time.time()
    from trainer.sft import run_sft
    from trainer.sft_cli import load_config
    sft_cfg = load_config(args.sft_config)
    print(f"== 1/2 SFT warm start: {args.sft_config}")
    sft = run_sft(sft_cfg)
    checkpoint = Path(sft_cfg.out_dir) / sft_cfg.name / "checkpoint"
    print(f"== 2/2 GRPO: {args.rl_config} (model {checkpoint})")
    from rl.config import load_run_config
    from rl.run import run
    cfg = load_run_config(args.rl_config, [f"model.path={checkpoint}", *args.overrides])
    summary = run(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    drifts = [r["alignment/max_abs_logprob_diff"] for r in rows if "alignment/max_abs_logprob_diff" in r]
    result = {
        "sft": {k: v for k, v in sft.items() if isinstance(v, (int, float, str))} if isinstance(sft, dict) else str(sft),
        "heldout_problems": summary.get("eval/problems", cfg.data.eval_size),
        "greedy_accuracy_before_rl": summary.get("eval/greedy_accuracy_start"),
        "greedy_accuracy_after_rl": summary.get("eval/greedy_accuracy_end"),
        "sampled_accuracy_before_rl": summary.get("eval/accuracy_start"),
        "sampled_accuracy_after_rl": summary.get("eval/accuracy_end"),
        "rl_steps": summary.get("steps"),
        "max_abs_logprob_diff_all_steps": max(drifts) if drifts else None,
        "steps_with_zero_drift": f"{sum(d == 0.0 for d in drifts)}/{len(drifts)}",
        "report": str(cfg.run_dir / "report.png"),
        "wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=2))
    ok = drifts and max(drifts) == 0.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
