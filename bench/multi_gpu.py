"""Two GPUs: the trainer sharded over NCCL (DeepSpeed ZeRO 2 / 3) keeps the logprobs bitwise.

    python3 bench/multi_gpu.py --out OUT/multi_gpu.json [--parts forward,slice] [--device cuda]

Every trainer here is a `TrainerGroup` (row sharding, result merge) of `TrainerWorker` ranks,
the code a `lockstep train` run uses; the ranks are local processes (`launcher="process"`,
trainer/ranks.py) because the GPU machines have no Ray. Parts:

  forward  for ZeRO 2 and 3, world size 1 and 2, forward micro-batch 1 and 8: `forward_logprobs`
           of one fixed batch of mixed lengths at the initial weights; all eight must be bit-equal.
           Then, in the micro-batch-8 groups, `--steps` GRPO `train_step`s on fixed batches
           (old_logprobs from the trainer's own forward, as a rollout at those weights would
           report): the loss curve of world size 2 vs 1, and `get_weights()` after the steps
           (ZeRO-3: gathered from the shards) vs world size 1, both compared bit for bit.
  slice    a Ring-mini-linear-2.0 layer group at full width (4 linear + 1 softmax layer, 256
           experts top-8, vocab 157184, random weights) trains `--slice-steps` steps under ZeRO-3
           across the ranks: peak memory per GPU and step time (the first step, which compiles
           the kernels, is reported apart).

JSON goes to --out and stdout; the exit code is 1 if any comparison differs. On a machine
without CUDA it runs the same on gloo (use --model configs/model/tiny.json to keep it short).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rl.bits import first_difference  # noqa: E402
from trainer.group import TrainerGroup  # noqa: E402
from trainer.synthetic import random_batch  # noqa: E402

# NVLink multicast stays off on the shared GPU hosts (the device tool's KINDS.md), also for the
# rank processes started below, which inherit this environment.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

ALGO = {"name": "grpo", "clip_high": 0.28}
SLICE = {"num_hidden_layers": 5, "first_k_dense_replace": 0}    # layers 0-3 linear, 4 softmax


def weights_difference(got: dict, want: dict) -> dict:
    if got.keys() != want.keys():
        return {"keys": sorted(set(got) ^ set(want))}
    return {k: first_difference(got[k], want[k]) for k in want if not torch.equal(got[k], want[k])}


def trainer_cfg(args, zero: int, forward_rows: int) -> dict:
    cfg = {"zero_stage": zero, "micro_batch_size": args.micro_batch, "forward_micro_batch_size": forward_rows,
           "lr": 1e-4, "seed": 0, "grad_clip": 1.0}
    if args.device == "cpu":
        cfg["num_threads"] = 1
    return cfg


def train_curve(group: TrainerGroup, vocab: int, args) -> list[dict]:
    curve = []
    for step in range(args.steps):
        batch = random_batch(vocab, args.rows, args.max_len, seed=100 + step)
        batch["old_logprobs"] = group.forward_logprobs(batch)
        start = time.perf_counter()
        metrics = group.train_step(batch)
        curve.append({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                      "skipped_steps": metrics["skipped_steps"], "seconds": time.perf_counter() - start})
        print(f"  step {step}: {curve[-1]}", flush=True)
    return curve


def compare_training(one: list[dict], two: list[dict], w_one: dict, w_two: dict) -> dict:
    """World size 2 against 1 at one ZeRO stage: loss per step and weights after the steps."""
    return {"loss_ws1": [c["loss"] for c in one], "loss_ws2": [c["loss"] for c in two],
            "loss_bit_equal": [a["loss"] == b["loss"] for a, b in zip(one, two)],
            "grad_norm_ws1": [c["grad_norm"] for c in one], "grad_norm_ws2": [c["grad_norm"] for c in two],
            "skipped_steps_ws2": sum(c["skipped_steps"] for c in two),
            "step_seconds_ws1": [round(c["seconds"], 3) for c in one],
            "step_seconds_ws2": [round(c["seconds"], 3) for c in two],
            "weights_ws2_vs_ws1": weights_difference(w_two, w_one)}


def part_forward(args, model: Path, vocab: int) -> dict:
    batch = random_batch(vocab, args.rows, args.max_len, seed=9)
    runs, reference, curves, training = [], None, {}, {}
    for zero in args.zero_stages:
        weights = {}
        for world_size in args.world_sizes:
            for forward_rows in (1, args.micro_batch):
                name = f"zero{zero}_ws{world_size}_fmb{forward_rows}"
                start = time.perf_counter()
                group = TrainerGroup("actor", str(model), trainer_cfg(args, zero, forward_rows), ALGO,
                                     world_size=world_size, launcher="process")
                try:
                    logprobs = group.forward_logprobs(batch)
                    if reference is None:
                        reference = (name, logprobs)
                    run = {"name": name, "vs": reference[0], "difference": first_difference(logprobs, reference[1])}
                    if forward_rows == args.micro_batch:
                        curves[(zero, world_size)] = train_curve(group, vocab, args)
                        weights[world_size] = group.get_weights()
                        run["memory"] = group.run("memory_stats")
                finally:
                    group.shutdown()
                run["seconds"] = round(time.perf_counter() - start, 1)
                print(json.dumps(run), flush=True)
                runs.append(run)
        if {1, 2} <= set(args.world_sizes):
            training[f"zero{zero}"] = compare_training(curves[(zero, 1)], curves[(zero, 2)], weights[1], weights[2])
            print(json.dumps({f"zero{zero}": training[f"zero{zero}"]}), flush=True)
        else:                                               # a one-GPU dry run: nothing to compare
            training.update({f"zero{zero}_ws{w}": curves[(zero, w)] for w in args.world_sizes})
    if {(2, 2), (3, 2)} <= set(curves):
        training["zero3_vs_zero2_loss_bit_equal"] = [a["loss"] == b["loss"] for a, b in zip(curves[(3, 2)], curves[(2, 2)])]
    compared = [v for k, v in training.items() if k in ("zero2", "zero3")]
    return {"batch": {"rows": args.rows, "lengths": batch["lengths"].tolist()},
            "forward": runs, "forward_all_bit_equal": all(r["difference"] is None for r in runs),
            "training": training,
            "training_all_bit_equal": all(all(t["loss_bit_equal"]) and not t["weights_ws2_vs_ws1"] for t in compared)}


def part_slice(args, workdir: Path) -> dict:
    data = json.loads(args.slice_base.read_text())
    data.update(SLICE)
    path = workdir / "ring-mini-slice.json"
    path.write_text(json.dumps(data))
    cfg = {"zero_stage": 3, "micro_batch_size": args.slice_micro_batch, "lr": 1e-5, "seed": 0}
    start = time.perf_counter()
    group = TrainerGroup("actor", str(path), cfg, ALGO, world_size=args.world_size, launcher="process")
    result = {"model": f"{args.slice_base.stem} with {json.dumps(SLICE)}",
              "world_size": args.world_size, "zero_stage": 3, "rows": args.slice_rows,
              "max_len": args.slice_len, "micro_batch_size": args.slice_micro_batch,
              "init_seconds": round(time.perf_counter() - start, 1)}
    print(f"slice: started {args.world_size} ranks in {result['init_seconds']} s", flush=True)
    try:
        steps = []
        for step in range(args.slice_steps):
            batch = random_batch(data["vocab_size"], args.slice_rows, args.slice_len, seed=200 + step,
                                 min_prompt=min(16, args.slice_len // 8), max_prompt=min(64, args.slice_len // 4))
            batch["old_logprobs"] = group.forward_logprobs(batch)
            t0 = time.perf_counter()
            metrics = group.train_step(batch)
            steps.append({"seconds": round(time.perf_counter() - t0, 3), "loss": metrics["loss"],
                          "grad_norm": metrics["grad_norm"], "skipped_steps": metrics["skipped_steps"],
                          "tokens": int(batch["lengths"].sum())})
            print(f"  slice step {step}: {steps[-1]}", flush=True)
        result["steps"] = steps
        result["memory"] = group.run("memory_stats")
    finally:
        group.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="forward,slice")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", type=Path, default=ROOT / "configs" / "model" / "small.json")
    parser.add_argument("--rows", type=int, default=16, help="rows per batch (even: 2 ranks x whole micro-batches)")
    parser.add_argument("--max-len", type=int, default=300)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--world-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                        help="world sizes of the forward part (1 alone: a one-GPU dry run, nothing to compare)")
    parser.add_argument("--zero-stages", type=lambda v: [int(x) for x in v.split(",")], default=[2, 3])
    parser.add_argument("--world-size", type=int, default=2, help="ranks of the slice part")
    parser.add_argument("--slice-base", type=Path, default=ROOT / "configs" / "model" / "ring-mini-linear-2.0.json",
                        help="model config the slice keeps one layer group of")
    parser.add_argument("--slice-rows", type=int, default=8)
    parser.add_argument("--slice-len", type=int, default=512)
    parser.add_argument("--slice-micro-batch", type=int, default=2)
    parser.add_argument("--slice-steps", type=int, default=3)
    args = parser.parse_args()
    needed = max(args.world_sizes + [args.world_size])
    if args.device == "cuda" and torch.cuda.device_count() < needed:
        raise SystemExit(f"needs {needed} GPUs, this machine has {torch.cuda.device_count()}")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    parts = args.parts.split(",")
    vocab = json.loads(args.model.read_text())["vocab_size"]
    out = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
           "num_gpus": torch.cuda.device_count() if args.device == "cuda" else 0,
           "torch": torch.__version__, "argv": sys.argv[1:], "model": str(args.model.relative_to(ROOT)
                                                                        if args.model.is_relative_to(ROOT) else args.model)}
    ok = True
    with tempfile.TemporaryDirectory() as workdir:
        if "forward" in parts:
            out["forward_and_training"] = part_forward(args, args.model, vocab)
            ok &= out["forward_and_training"]["forward_all_bit_equal"]
            ok &= out["forward_and_training"]["training_all_bit_equal"]
        if "slice" in parts:
            out["slice"] = part_slice(args, Path(workdir))
    out["all_bit_equal"] = bool(ok)
    text = json.dumps(out, indent=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
