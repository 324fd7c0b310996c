"""Rollout throughput inside vLLM: our model on rl.kernels (the lockstep plugin) vs a stock
vLLM model of the same width and depth (Qwen2, random weights), same engine settings, same
run. Prints JSON: generated tokens/s per engine and the ratio ours / stock.

    .venv/bin/python bench/rollout.py [--models tiny,small] [--json OUT.json]

Workload per model: `--prompts` prompts of mixed lengths (16..80 tokens), `--new-tokens`
tokens each (no stop tokens, so every engine generates exactly the same count), sampling
at T = 1 with the sampled token's logprob returned (what RL needs). Each engine first runs a
warm-up batch; then `--repeats` rounds of one timed batch per engine, engines in turn, so that
every engine sees the same drift of this machine's speed; each engine's best batch is reported
and all are listed. Same settings everywhere: eager mode, prefix caching off, same
max_num_seqs and KV-cache bytes.

The stock Qwen2 matches the layer count, hidden size, heads, KV heads, head_dim and vocab;
its dense MLP width is our per-token active MLP width (top-k + shared experts times the
expert width), so both do about the same matmul work per token.

Also runs, in the same run:
  - our model in the same plugin with rl.kernels' `stock` mode (plain torch ops, not
    batch-invariant), to separate the integration's cost from the invariant kernels' price;
  - vLLM's own BailingMoeV2 (Ling 2.0: the same MoE blocks, router, shared expert, qk-norm
    and partial RoPE, softmax attention in every layer) at the same width, depth and experts,
    random weights: the stock MoE model nearest to ours. At decode batch sizes every expert is
    read each step, so the MoE reads ~3x the weight bytes of the dense Qwen2 per token.

Refuses to report if the lockstep engine's logprobs are not bit-identical to the trainer
forward (checked on every sample of the timed batch unless --check-samples says fewer; with
--trace the engine's forwards are recorded and, on a failure, replayed to name the first
engine step that differs: see rollout/engine_trace.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINE = {"enable_prefix_caching": False, "max_num_seqs": 64, "kv_cache_bytes": 1 << 30,
          "gpu_memory_utilization": 0.5}


def make_prompts(num: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 81, (num,), generator=g).tolist()
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


class LockstepEngine:
    """Our model in a RolloutWorker (the plugin, or rl.kernels' `stock` ops): warmed up when
    made; `timed()` runs the timed batch once; `result()` checks the first timed batch's
    logprobs against the trainer forward (lockstep kernels) and sums up."""

    def __init__(self, config_path: Path, prompts, new_tokens: int, check_samples: int | None, kernels: str,
                 trace: Path | None = None):
        from rollout.worker import RolloutWorker
        self.prompts, self.new_tokens, self.check_samples, self.kernels, self.trace = \
            prompts, new_tokens, check_samples, kernels, trace
        self.worker = RolloutWorker(config_path, seed=0, temperature=1.0, engine=ENGINE, kernels=kernels)
        self.worker.generate(prompts[:4], {"max_new_tokens": 8, "seed": 0})        # warm-up
        self.first, self.runs = None, []

    def timed(self) -> None:
        trace = self.trace if self.first is None else None
        if trace is not None:
            self.worker.trace_engine(trace)
        batch = self.worker.generate(self.prompts, {"max_new_tokens": self.new_tokens, "seed": 1})
        if trace is not None:
            self.worker.trace_engine(None)
        self.first = self.first or batch
        self.runs.append((batch.stats["new_tokens"], batch.stats["seconds"]))

    def result(self) -> dict:
        from rl.model.checkpoint import load_model
        from rollout.parity import mismatches
        batch, trace = self.first, self.trace
        check = type(batch)(samples=batch.samples[:self.check_samples], weight_version=batch.weight_version,
                            temperature=batch.temperature)
        problems = []
        if self.kernels == "lockstep":
            model = load_model(self.worker.checkpoint).eval()
            problems = mismatches(check, model, 1.0)
            if problems and trace is not None:
                problems.append(_recompute_report(trace, check, model, self.worker.checkpoint))
                problems.append(_replay_report(trace, model))
        if problems:
            raise SystemExit("lockstep engine logprobs differ from the trainer forward; refusing to "
                             "report throughput:\n" + "\n".join(problems))
        return {**_best(self.runs), "startup_s": self.worker.startup_s,
                "parity_checked_samples": len(check.samples) if self.kernels == "lockstep" else 0,
                "traced": trace is not None}

    def close(self) -> None:
        self.worker.shutdown()


def _best(runs: list[tuple[int, float]]) -> dict:
    """The fastest of the timed batches (tokens, seconds), and every batch's tokens/s."""
    tokens, seconds = max(runs, key=lambda run: run[0] / run[1])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_s_runs": [n / t for n, t in runs]}


def _recompute_report(trace: Path, check, model, checkpoint) -> str:
    """A failing check, looked at again in this process: the comparison repeated with the same
    model and with a freshly loaded one (a difference between the two points at this process,
    not at the engine); the samples are saved to trace/failure.pt for a fresh process."""
    from rl.model.checkpoint import load_model
    from rollout.parity import mismatches
    again = mismatches(check, model, 1.0)
    fresh = mismatches(check, load_model(checkpoint).eval(), 1.0)
    torch.save({"samples": [(s.prompt_index, s.sample_index, s.prompt_ids, s.response_ids, s.response_logprobs)
                            for s in check.samples], "threads": torch.get_num_threads()},
               Path(trace) / "failure.pt")
    n = len(check.samples)
    return (f"compared again in this process: same model {n - len(again)}/{n} samples equal the engine, "
            f"freshly loaded model {n - len(fresh)}/{n}; samples saved to {trace}/failure.pt")


def _replay_report(trace: Path, model) -> str:
    """Where the engine's forwards part from our kernels' (rollout.engine_trace)."""
    from rollout.engine_trace import replay
    model.prepack_for_inference()            # as the engine does (same bits)
    steps, difference = replay(trace, model)
    if difference is None:
        return (f"engine trace {trace}: all {steps} engine forwards replay bit-identically outside the engine "
                f"(the engine computed our kernels' answer for its batches: the difference is on the recompute "
                f"side; recompute failure.pt's tokens in a fresh process to tell kernels from this process)")
    return f"engine trace {trace}: {difference}"


def qwen2_config(cfg) -> dict:
    active = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.num_shared_experts)
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": active,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "hidden_act": "silu", "use_sliding_window": False}


def ling_moe_config(cfg) -> dict:
    """vLLM's BailingMoeV2ForCausalLM (no HF config class of its own in transformers: the
    qwen2_moe config class carries the extra fields it reads)."""
    same = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_shared_experts",
            "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "partial_rotary_factor"]
    return {**{k: getattr(cfg, k) for k in same}, "architectures": ["BailingMoeV2ForCausalLM"],
            "model_type": "qwen2_moe", "score_function": "sigmoid", "moe_router_enable_expert_bias": True,
            "norm_topk_prob": True, "use_bias": False, "use_qkv_bias": False, "use_qk_norm": True,
            "use_rmsnorm": True, "embedding_dropout": 0.0, "router_dtype": "fp32",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}


def decode_step_bytes(cfg, arch: str, batch: int, context: int, intermediate: int | None = None) -> dict:
    """The fewest bytes one decode step of `batch` sequences at `context` tokens must read
    from memory (bf16 weights unless noted): every weight it uses once, plus each sequence's
    KV cache (softmax layers) or fp32 state (linear layers). MoE layers read the experts that
    at least one of the step's tokens picks: E (1 - (1 - k/E)^(batch)) of them on average under
    uniform routing (random weights route about uniformly). Ours reads each linear layer's fp32
    state S plus its pending k/v (the lm_head reads its bf16 weight, accumulating in fp32).
    At decode sizes a step is bound by these bytes, so stock_bytes / our_bytes is about the
    best tokens/s ratio the memory bandwidth allows."""
    h, layers, d = cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    attn = (hq * d + 2 * hkv * d) * h + hq * d * h                   # q, k, v, o
    kv_per_seq = 2 * hkv * d * 2 * context                           # one softmax layer, bf16
    if arch == "qwen2":
        mlp = 3 * h * intermediate
        weights = layers * (attn + mlp) * 2 + cfg.vocab_size * h * 2
        return {"weights": weights, "per_sequence": layers * kv_per_seq * batch,
                "total": weights + layers * kv_per_seq * batch}
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    touched = e * (1.0 - (1.0 - k / e) ** batch)
    expert = 3 * h * cfg.moe_intermediate_size
    moe_layers = layers - cfg.first_k_dense_replace
    moe = moe_layers * ((touched + cfg.num_shared_experts) * expert + e * h)       # + router
    dense = cfg.first_k_dense_replace * 3 * h * cfg.intermediate_size
    if arch == "ling":
        weights = (layers * attn + moe + dense) * 2 + cfg.vocab_size * h * 2
        per_seq = layers * kv_per_seq
    else:
        softmax = sum(cfg.is_softmax_layer(i) for i in range(layers))
        gate = hq * d * h                                             # linear layers' output gate
        weights = (layers * attn + (layers - softmax) * gate + moe + dense) * 2 + cfg.vocab_size * h * 2
        c = cfg.linear_chunk_size
        state = hq * d * d * 4 + hq * c * 2 * d * 4                   # S + pending k/v, fp32
        per_seq = softmax * kv_per_seq + (layers - softmax) * state
    return {"weights": int(weights), "per_sequence": int(per_seq * batch), "total": int(weights + per_seq * batch)}


class StockEngine:
    """A stock vLLM model (random weights) in this process's LLM, warmed up when made; the
    same interface as LockstepEngine."""

    def __init__(self, config: dict, cfg, prompts, new_tokens: int):
        from vllm import LLM
        self.config, self.prompts, self.new_tokens = config, prompts, new_tokens
        self.directory = Path(tempfile.mkdtemp(prefix="lockstep-bench-stock-"))
        (self.directory / "config.json").write_text(json.dumps(config))
        started = time.perf_counter()
        self.llm = LLM(model=str(self.directory), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                       enforce_eager=True, seed=0, enable_prefix_caching=False, max_num_seqs=ENGINE["max_num_seqs"],
                       kv_cache_memory_bytes=ENGINE["kv_cache_bytes"], gpu_memory_utilization=0.5,
                       max_model_len=cfg.max_position_embeddings, generation_config="vllm")
        self.startup_s = time.perf_counter() - started
        self.runs = []
        self._run(prompts[:4], 8)                                                      # warm-up

    def _run(self, batch, n):
        from vllm import SamplingParams
        params = SamplingParams(temperature=1.0, max_tokens=n, logprobs=0, detokenize=False)
        return self.llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)

    def timed(self) -> None:
        t0 = time.perf_counter()
        outs = self._run(self.prompts, self.new_tokens)
        self.runs.append((sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t0))

    def result(self) -> dict:
        return {**_best(self.runs), "startup_s": self.startup_s, "architecture": self.config["architectures"][0],
                "intermediate_size": self.config["intermediate_size"]}

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        shutil.rmtree(self.directory, ignore_errors=True)


def run_interleaved(makers: dict, repeats: int) -> dict:
    """Start every engine, then `repeats` rounds of one timed batch each, engines in turn (the
    machine's speed drifts over minutes: interleaving exposes every engine to the same drift);
    returns each engine's result."""
    engines = {}
    try:
        for name, make in makers.items():
            engines[name] = make()
        for _ in range(repeats):
            for engine in engines.values():
                engine.timed()
        return {name: engine.result() for name, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--prompts", type=int, default=None, help="default: tiny 64, small 16")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: tiny 128, small 64")
    parser.add_argument("--check-samples", type=int, default=None,
                        help="samples of the timed batch bit-compared with the trainer (default: all)")
    parser.add_argument("--trace", default=None, help="record the lockstep engine's forwards of the timed "
                        "batch into this directory (rollout.engine_trace; costs time) and, on a parity "
                        "failure, replay them to find the first engine step that differs")
    parser.add_argument("--no-stock-ops", dest="stock_ops", action="store_false",
                        help="skip the run of our model with rl.kernels' stock ops")
    parser.add_argument("--no-ling", dest="ling", action="store_false",
                        help="skip vLLM's own BailingMoeV2 (stock MoE of the same size)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of one timed batch per engine, engines in turn (same prompts and "
                             "seeds); each engine's best tokens/s is reported, all are listed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from rl.model.config import load_model_config
    defaults = {"tiny": (64, 128), "small": (16, 64)}
    result = {"engine": ENGINE, "threads": torch.get_num_threads(), "models": {}}
    for name in args.models.split(","):
        config_path = ROOT / "configs" / "model" / f"{name}.json"
        cfg = load_model_config(config_path)
        num_prompts = args.prompts or defaults.get(name, (16, 64))[0]
        new_tokens = args.new_tokens or defaults.get(name, (16, 64))[1]
        prompts = make_prompts(num_prompts, cfg.vocab_size)
        trace = Path(args.trace) / name if args.trace else None
        makers = {"lockstep": lambda: LockstepEngine(config_path, prompts, new_tokens, args.check_samples,
                                                     "lockstep", trace),
                  "stock_qwen2": lambda: StockEngine(qwen2_config(cfg), cfg, prompts, new_tokens)}
        if args.ling:
            makers["stock_ling_moe"] = lambda: StockEngine(ling_moe_config(cfg), cfg, prompts, new_tokens)
        if args.stock_ops:
            # our model in the same plugin with rl.kernels' `stock` mode (plain torch ops):
            # separates the integration's cost from the invariant kernels' price
            makers["our_model_stock_ops"] = lambda: LockstepEngine(config_path, prompts, new_tokens, 0, "stock")
        runs = run_interleaved(makers, args.repeats)
        ours, stock = runs["lockstep"], runs["stock_qwen2"]
        entry = {"prompts": num_prompts, "new_tokens": new_tokens, "prompt_tokens": sum(map(len, prompts)),
                 "lockstep": ours, "stock_qwen2": stock,
                 "ratio_tokens_per_s": ours["tokens_per_s"] / stock["tokens_per_s"]}
        if args.ling:
            entry["stock_ling_moe"] = runs["stock_ling_moe"]
            entry["ratio_vs_ling_moe"] = ours["tokens_per_s"] / runs["stock_ling_moe"]["tokens_per_s"]
        if args.stock_ops:
            entry["our_model_stock_ops"] = runs["our_model_stock_ops"]
            entry["ratio_stock_ops_vs_qwen2"] = runs["our_model_stock_ops"]["tokens_per_s"] / stock["tokens_per_s"]
        context = sum(map(len, prompts)) // num_prompts + new_tokens // 2
        step = {"ours": decode_step_bytes(cfg, "ours", num_prompts, context),
                "stock_qwen2": decode_step_bytes(cfg, "qwen2", num_prompts, context,
                                                 stock["intermediate_size"]),
                "stock_ling_moe": decode_step_bytes(cfg, "ling", num_prompts, context)}
        entry["decode_step_bytes"] = {"batch": num_prompts, "mean_context": context, **step,
                                      "bytes_ratio_qwen2_over_ours": step["stock_qwen2"]["total"] / step["ours"]["total"],
                                      "bytes_ratio_ling_over_ours": step["stock_ling_moe"]["total"] / step["ours"]["total"]}
        result["models"][name] = entry
        print(json.dumps({name: result["models"][name]}), file=sys.stderr, flush=True)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
