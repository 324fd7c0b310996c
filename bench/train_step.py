"""Trainer benchmark: tokens/s of `TrainerWorker.train_step` (PPO/GRPO loss, DeepSpeed ZeRO
1/2/3, bf16), with the lockstep kernels vs the stock kernels, in the same run.

    .venv/bin/python bench/train_step.py [--models tiny,small] [--stages 1,2,3] [--steps 3] > out.json

One world-size-1 worker per (model, stage), each in a fresh subprocess (the small model's
optimizer state alone is GBs). The kernel mode is switched around each timed step
(`rl.kernels.kernels(mode)`), alternating lockstep/stock steps so that load changes on a
shared machine hit both modes alike; the median step time is reported, and the median time of
the no-grad `forward_logprobs` that precedes each step (the rollout logprobs stand-in). Target: lockstep
time <= 1.5x stock. Before timing, each worker's forward must be bit-equal to
`model.sequence_logprobs` at its weights for micro-batch sizes 1 and B (the batch-invariance
contract): if not, the script prints the failure and exits 1 without timings.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rl import kernels as K  # noqa: E402
from rl.model.checkpoint import load_model  # noqa: E402
from trainer.group import free_port  # noqa: E402
from trainer.synthetic import random_batch  # noqa: E402
from trainer.worker import TrainerWorker  # noqa: E402

TARGET = 1.5
SHAPES = {"tiny": (16, 64), "small": (4, 64)}     # rows x max tokens per train_step


def check_parity(worker: TrainerWorker, batch: dict, model_path: Path) -> str | None:
    model = load_model(model_path, torch.bfloat16)
    model.load_state_dict(worker.get_weights())
    expected = model.sequence_logprobs(batch["input_ids"], batch["lengths"])
    for rows in (1, len(batch["lengths"])):
        worker.cfg = worker.cfg.model_copy(update={"forward_micro_batch_size": rows})
        if not torch.equal(worker.forward_logprobs(batch), expected):
            return f"forward_logprobs with micro-batch {rows} differs from model.sequence_logprobs"
    return None


def bench_one(name: str, stage: int, steps: int, threads: int) -> dict:
    model_path = ROOT / "configs" / "model" / f"{name}.json"
    rows, max_len = SHAPES[name]
    cfg = {"zero_stage": stage, "micro_batch_size": rows, "lr": 1e-5, "num_threads": threads, "seed": 0}
    worker = TrainerWorker("actor", str(model_path), cfg, {"name": "grpo"}, 0, 1, "127.0.0.1", free_port())
    batch = random_batch(worker.model_config.vocab_size, rows, max_len, seed=0)
    failure = check_parity(worker, batch, model_path)
    if failure is not None:
        return {"model": name, "zero_stage": stage, "error": failure}
    tokens = int(batch["lengths"].sum())
    times = {(mode, what): [] for mode in ("lockstep", "stock") for what in ("step", "forward")}
    for step in range(steps + 1):                        # step 0 of each mode: warm-up
        for mode in ("lockstep", "stock"):
            with K.kernels(mode):
                t0 = time.perf_counter()
                batch["old_logprobs"] = worker.forward_logprobs(batch)
                t1 = time.perf_counter()
                worker.train_step(batch)
                t2 = time.perf_counter()
            if step > 0:
                times[mode, "forward"].append(t1 - t0)
                times[mode, "step"].append(t2 - t1)
    med = {key: statistics.median(value) for key, value in times.items()}
    lock, stock = med["lockstep", "step"], med["stock", "step"]
    return {"model": name, "zero_stage": stage, "rows": rows, "tokens_per_step": tokens,
            "lockstep_tokens_per_s": round(tokens / lock, 1), "stock_tokens_per_s": round(tokens / stock, 1),
            "lockstep_step_s": round(lock, 4), "stock_step_s": round(stock, 4),
            "time_ratio": round(lock / stock, 3), "within_target": lock / stock <= TARGET,
            "forward_time_ratio": round(med["lockstep", "forward"] / med["stock", "forward"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--one", help=argparse.SUPPRESS)     # MODEL:STAGE, run in this process
    args = parser.parse_args()
    if args.one:
        name, stage = args.one.split(":")
        print(json.dumps(bench_one(name, int(stage), args.steps, args.threads)))
        return 0
    results = []
    for name in args.models.split(","):
        for stage in args.stages.split(","):
            proc = subprocess.run([sys.executable, __file__, "--one", f"{name}:{stage}", "--steps",
                                   str(args.steps), "--threads", str(args.threads)],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            result = (json.loads(lines[-1]) if proc.returncode == 0 and lines else
                      {"model": name, "zero_stage": int(stage), "error": proc.stderr[-2000:]})
            print(json.dumps(result), file=sys.stderr, flush=True)
            results.append(result)
    errors = [r for r in results if "error" in r]
    out = {"bench": "train_step", "device": "cpu", "num_threads": args.threads, "dtype": "bf16",
           "world_size": 1, "target_time_ratio": TARGET, "results": [] if errors else results}
    if errors:
        out["error"] = errors
    print(json.dumps(out, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
