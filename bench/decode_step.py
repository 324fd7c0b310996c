"""Decode-step time of our model outside vLLM, per kernel, plus a digest for A/B bit checks.

    PYTHONPATH=. taskset -c 1 .venv/bin/python bench/decode_step.py [--model tiny] [--reps 2]

Runs bench/rollout.py's workload (same prompts, same new-token count) through the reference
decoder (`rollout.reference.generate`) on one thread, with vLLM's page size for the model
(tiny 128, small 1024 positions: a page must hold a linear layer's state) and the weights
prepacked as the plugin does. Prints JSON: per decode step (one new token per sequence) the
forward's median ms and each rl.kernels op's mean ms and calls, and a sha256 over every
sampled token and its fp32 logprob. The digest must not change when a kernel change is meant
to keep the bits; the times are the quick loop for work on the decode path (the vLLM
engine's own overhead is not in them: measure that with bench/rollout.py).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPS = ["linear", "fused_linear", "rms_norm", "gated_group_rms_norm", "rope", "softmax_attention", "lightning_attention",
       "moe_route", "moe_experts", "swiglu"]
PAGE = {"tiny": 128, "small": 1024}
WORKLOAD = {"tiny": (64, 128), "small": (16, 64)}         # (prompts, new tokens), as bench/rollout.py


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(WORKLOAD))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="vLLM's CPU worker runs on one core")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bench.rollout import make_prompts
    from rl import kernels as K
    from rl.model.checkpoint import load_model
    import rollout.reference as reference

    torch.manual_seed(0)
    model = load_model(ROOT / "configs" / "model" / f"{args.model}.json").eval().requires_grad_(False)
    model.prepack_for_inference()
    num_prompts, new_tokens = WORKLOAD[args.model]
    prompts = make_prompts(num_prompts, model.config.vocab_size)

    # time every op the layers call (`K.<op>`, looked up at each call), per phase: decode steps
    # (one new token per sequence) and the rest (prefill)
    in_decode, op_time, op_calls = [False], collections.defaultdict(float), collections.Counter()
    prefill_time, prefill_op_time = [0.0], collections.defaultdict(float)
    originals = {name: getattr(K, name) for name in OPS}
    for name in OPS:
        def timed(*a, _op=originals[name], _name=name, **kw):
            start = time.perf_counter()
            out = _op(*a, **kw)
            if in_decode[0]:
                op_time[_name] += time.perf_counter() - start
                op_calls[_name] += 1
            else:
                prefill_op_time[_name] += time.perf_counter() - start
            return out
        setattr(K, name, timed)
    forward = model.forward_tokens
    step_times: list[float] = []

    def timed_forward(ids, batch, caches=None, trace=None):
        in_decode[0] = batch.num_seqs == ids.shape[0]
        start = time.perf_counter()
        try:
            return forward(ids, batch, caches, trace)
        finally:
            if in_decode[0]:
                step_times.append(time.perf_counter() - start)
            else:
                prefill_time[0] += time.perf_counter() - start
            in_decode[0] = False
    model.forward_tokens = timed_forward

    runs = []
    try:
        for _ in range(args.reps):
            step_times.clear()
            op_time.clear()
            op_calls.clear()
            prefill_time[0] = 0.0
            prefill_op_time.clear()
            gens = reference.generate(model, prompts, new_tokens, 1.0, seed=1, block_size=PAGE[args.model])
            digest = hashlib.sha256()
            for g in gens:
                digest.update(torch.tensor(g.tokens, dtype=torch.int64).numpy().tobytes())
                digest.update(torch.tensor(g.logprobs, dtype=torch.float32).numpy().tobytes())
            steps = len(step_times)
            runs.append({"decode_steps": steps, "forward_ms_median": 1e3 * statistics.median(step_times),
                         "ops_ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in
                                             sorted(op_time.items(), key=lambda kv: -kv[1])},
                         "op_calls_per_step": {k: op_calls[k] / steps for k in op_time},
                         "prefill_ms": 1e3 * prefill_time[0],
                         "prefill_ops_ms": {k: round(1e3 * v, 3) for k, v in
                                            sorted(prefill_op_time.items(), key=lambda kv: -kv[1])},
                         "digest": digest.hexdigest()})
    finally:
        for name, op in originals.items():
            setattr(K, name, op)
    print(json.dumps({"model": args.model, "threads": args.threads, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
