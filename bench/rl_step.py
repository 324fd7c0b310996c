"""RL step benchmark: seconds per step and per phase, tokens/s, and the share of step time
the alignment check costs (target <= 5%), from a short real run (Ray + vLLM + DeepSpeed).

    .venv/bin/python bench/rl_step.py [--model configs/model/tiny.json] [--steps 6] > out.json

The check reuses the trainer's first forward (pre-update logprobs), so its own cost is the
comparison; `recompute_forward_s` is what a separate forward would cost instead (measured
once with TrainerGroup.forward_logprobs on the same batch size) for scale.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("rollout", "reward", "advantage", "train", "alignment", "sync")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="configs/model/tiny.json")
    parser.add_argument("--config", default="configs/grpo_arith_tiny.yaml")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from rl.config import load_run_config
    from rl.run import Run
    out_dir = tempfile.mkdtemp(prefix="lockstep-bench-")
    cfg = load_run_config(args.config, [f"model.path={args.model}", f"run.steps={args.steps}", "name=bench",
                                        f"run.output_dir={out_dir}", "data.eval_size=0", "run.checkpoint_every=0",
                                        "logging.wandb_mode=disabled"])
    steps: list[dict] = []
    extra: dict = {}

    def record(run, metrics):
        steps.append(metrics)
        if len(steps) == 2:           # one separate forward over a step-sized batch, for scale
            import time
            import torch
            rows = cfg.rollout.prompts_per_step * cfg.rollout.n_samples
            length = 16 + int(round(metrics["response/mean_length"]))     # prompt ~16 tokens + response
            batch = {"input_ids": torch.randint(4, 100, (rows, length)),
                     "lengths": torch.full((rows,), length), "temperature": cfg.rollout.temperature}
            t0 = time.perf_counter()
            run.actor.forward_logprobs(batch)
            extra["recompute_forward_s"] = time.perf_counter() - t0
    run = Run(cfg)
    run.step_hooks.append(record)
    run()
    timed = steps[1:] or steps                 # the first step warms caches
    med = {p: statistics.median(s.get(f"time/{p}", 0.0) for s in timed) for p in PHASES}
    step_s = statistics.median(s["time/step"] for s in timed)
    result = {
        "bench": "rl_step", "model": args.model, "steps_timed": len(timed),
        "samples_per_step": cfg.rollout.prompts_per_step * cfg.rollout.n_samples,
        "seconds_per_step": step_s, "seconds_per_phase": med,
        "rollout_tokens_per_s": statistics.median(s["perf/rollout_tokens_per_s"] for s in timed),
        "alignment_check_share": med["alignment"] / step_s,
        "max_abs_logprob_diff_all_steps": max(s["alignment/max_abs_logprob_diff"] for s in steps),
        **extra,
        "target_alignment_share": 0.05,
    }
    if "recompute_forward_s" in extra:
        result["recompute_forward_share_if_separate"] = extra["recompute_forward_s"] / step_s
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
