"""`lockstep mismatch`: measure trainer-vs-rollout logprob drift outside training.

1. generate for prompts of mixed lengths in one batch (reference decoder or vLLM);
2. recompute every generated token's logprob with the trainer's full-sequence forward, in a
   different batch composition (shuffled) and micro-batch size;
3. compare (alignment.metrics) and, if any bit differs, localise the first layer and
   component whose activations differ: replay the first drifting sequence through the
   cached (rollout-style) path token by token and through the trainer forward, each with a
   Trace, and compare in forward order.
"""
from __future__ import annotations

import random

import torch

from alignment.metrics import drift_metrics
from rl import kernels as K
from rl.kernels import BatchMeta
from rl.model import Trace, first_divergent
from rl.model.checkpoint import load_model


def make_prompts(num_prompts: int, vocab_size: int, chunk: int, seed: int, low_id: int = 4) -> list[list[int]]:
    """Prompts of mixed lengths, 1 .. 3 chunks + a few, so prefill ends at many chunk offsets."""
    rng = random.Random(seed)
    lengths = [1 + (i * 7 + rng.randrange(3 * chunk + 5)) % (3 * chunk + 5) for i in range(num_prompts)]
    return [[rng.randrange(low_id, vocab_size) for _ in range(n)] for n in lengths]


def recompute(model, prompts, responses, temperature, micro_batch_size, seed):
    """Trainer forward over prompt+response in shuffled micro-batches -> per-sample fp32 lists."""
    order = list(range(len(prompts)))
    random.Random(seed + 1).shuffle(order)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for start in range(0, len(order), micro_batch_size):
        idx = order[start:start + micro_batch_size]
        seqs = [prompts[i] + responses[i] for i in idx]
        lengths = torch.tensor([len(s) for s in seqs])
        ids = torch.zeros((len(seqs), int(lengths.max())), dtype=torch.int64)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
        with torch.no_grad():
            lp = model.sequence_logprobs(ids.to(model.device), lengths.to(model.device), temperature).cpu()
        for row, i in enumerate(idx):
            p = len(prompts[i])
            out[i] = lp[row, p: p + len(responses[i])]
    return out


@torch.no_grad()
def localise(model, prompt, response, temperature):
    """First (layer, component) where the cached replay and the trainer forward differ."""
    seq = prompt + response
    train_trace, replay_trace = Trace(), Trace()
    ids = torch.tensor([seq], device=model.device)
    model.sequence_logprobs(ids, [len(seq)], temperature, trace=train_trace)
    from rollout.reference import Caches  # lazy: rollout sits beside alignment, used only here
    num_blocks = -(-len(seq) // 16)
    caches = Caches(model, num_blocks + 1, 16, 2)
    table = torch.arange(num_blocks, dtype=torch.int32)[None]
    pos, steps = 0, [len(prompt)] + [1] * (len(response) - 1)
    for n in steps:
        batch = BatchMeta.from_lengths([n], [pos], device=model.device)
        batch.block_table, batch.state_indices = table.to(model.device), torch.tensor([1], device=model.device)
        batch.slot_mapping = torch.arange(pos, pos + n, device=model.device)
        hidden = model.forward_tokens(torch.tensor(seq[pos:pos + n], device=model.device), batch,
                                      caches.layers, replay_trace)
        model.log_softmax(hidden, temperature, replay_trace)
        pos += n
    return first_divergent(train_trace, replay_trace)


def run_mismatch(model_path: str, backend: str = "reference", num_prompts: int = 32, max_new_tokens: int = 96,
                 samples: int = 1, temperature: float = 1.0, seed: int = 0, kernels: str = "lockstep",
                 micro_batch_size: int = 3, engine_kwargs: dict | None = None, device: str = "cpu",
                 trace: str | None = None) -> dict:
    """`trace` (vllm backend): record the engine's forwards in that directory and replay them
    here (rollout.engine_trace): the result's `engine_trace` names the first engine step whose
    hidden states differ from this process's kernels on the same batch, or none."""
    K.set_kernels(kernels)
    if trace is not None and backend != "vllm":
        raise ValueError("--trace: only the vllm backend has an engine to trace")
    torch.manual_seed(seed)
    if backend == "vllm" and device != "cpu":
        raise ValueError("--device: the vllm backend recomputes on the CPU here; use --device cpu")
    model = load_model(model_path, device=device).eval()
    cfg = model.config
    prompts = make_prompts(num_prompts, cfg.vocab_size, cfg.linear_chunk_size, seed)
    if backend == "reference":
        from rollout.reference import generate
        expanded = [p for p in prompts for _ in range(samples)]
        gens = generate(model, expanded, max_new_tokens, temperature, seed)
        results = [(g.prompt, g.tokens, g.logprobs) for g in gens]
    elif backend == "vllm":
        from alignment.vllm_backend import generate_vllm
        results = generate_vllm(model_path, prompts, max_new_tokens, samples, temperature, seed, kernels,
                                engine_kwargs or {}, trace)
    else:
        raise ValueError(f"--backend: unknown {backend!r}; allowed: reference, vllm")
    seq_prompts = [list(r[0]) for r in results]
    responses = [list(r[1]) for r in results]
    rollout_lps = [torch.tensor(r[2], dtype=torch.float32) for r in results]
    trainer_lps = recompute(model, seq_prompts, responses, temperature, micro_batch_size, seed)
    metrics = drift_metrics(torch.cat(rollout_lps), torch.cat(trainer_lps))
    first = None
    if metrics["frac_bitwise_equal"] < 1.0:
        bad = next(i for i, (a, b) in enumerate(zip(rollout_lps, trainer_lps)) if not torch.equal(a, b))
        first = localise(model, seq_prompts[bad], responses[bad], temperature)
        if first is None:
            first = {"layer": None, "component": f"{backend} engine (reference replay matches the trainer)"}
    result = {**metrics, "first_divergent": first, "kernels": kernels, "backend": backend,
              "sequences": len(results), "prompts": num_prompts, "samples": samples,
              "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
              "model": str(model_path), "device": device}
    if trace is not None:
        from rollout.engine_trace import replay
        steps, difference = replay(trace, model)
        result["engine_trace"] = {"directory": str(trace), "steps": steps, "prefix_caching": False,
                                  "first_difference": None if difference is None else str(difference)}
    return result
