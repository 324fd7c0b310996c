"""CPU kernel benchmark: the invariant kernel vs the plain torch op, same run, same inputs.

    .venv/bin/python bench/kernels_cpu.py [--repeats 20] > out.json

For each op at the tiny model's prefill shape (16 sequences x 64 tokens) and decode shape
(64 sequences x 1 new token, 64 cached), times the `lockstep` cpu kernel and the `stock` op
(median of repeats) and prints JSON with the ratio lockstep/stock (target <= 2 per op, <= 1.5
for the whole forward). Refuses to report if the invariance check of the op fails.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rl import kernels as K  # noqa: E402
from rl.kernels import BatchMeta  # noqa: E402
from rl.model.checkpoint import load_model  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.json"


def timeit(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(name, make_call, repeats, check_rows=None):
    """make_call() -> zero-arg callable; run it under both modes."""
    result = {}
    for mode in ("lockstep", "stock"):
        with K.kernels(mode):
            call = make_call()
            with torch.no_grad():
                result[mode] = timeit(call, repeats)
    if check_rows is not None and not check_rows():
        raise SystemExit(f"{name}: invariance check failed; refusing to report timings")
    return {"op": name, "lockstep_ms": result["lockstep"] * 1e3, "stock_ms": result["stock"] * 1e3,
            "ratio": result["lockstep"] / result["stock"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(TINY).eval()
    cfg = model.config
    hid, h, hkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = {"bench": "kernels_cpu", "threads": torch.get_num_threads(), "model": "tiny", "results": []}
    shapes = {"prefill": (16, 64, 0), "decode": (64, 1, 64)}
    for phase, (num_seqs, new, ctx) in shapes.items():
        n = num_seqs * new
        x = torch.randn(n, hid).bfloat16()
        w_qkv = torch.randn(3 * h * d, hid).bfloat16()
        batch = BatchMeta.from_lengths([new] * num_seqs, [ctx] * num_seqs)
        rows = lambda: torch.equal(K.linear(x[:1], w_qkv), K.linear(x, w_qkv)[:1])  # noqa: E731
        tag = f"{phase}[{num_seqs}x{new}]"
        r = out["results"]
        r.append(compare(f"linear {tag}", lambda: (lambda: K.linear(x, w_qkv)), args.repeats, rows))
        nw = torch.randn(hid).bfloat16()
        r.append(compare(f"rms_norm {tag}", lambda: (lambda: K.rms_norm(x, nw, 1e-6)), args.repeats))
        g = torch.randn(n, h * d).bfloat16()
        gw = torch.randn(h * d).bfloat16()
        r.append(compare(f"gated_group_rms_norm {tag}",
                         lambda: (lambda: K.gated_group_rms_norm(g, g, gw, cfg.group_norm_size, 1e-6)), args.repeats))
        q = torch.randn(n, h, d).bfloat16()
        pos = batch.positions()
        r.append(compare(f"rope {tag}", lambda: (lambda: K.rope(q, pos, cfg.rotary_dim, cfg.rope_theta)), args.repeats))
        # attention over a paged cache holding `ctx` tokens per sequence
        bs = 16
        blocks = -(-(ctx + new) // bs)
        table = torch.arange(num_seqs * blocks).view(num_seqs, blocks)
        batch.block_table = table
        p = pos.view(num_seqs, new)
        batch.slot_mapping = (table.gather(1, p // bs) * bs + p % bs).reshape(-1)
        k, v = torch.randn(n, hkv, d).bfloat16(), torch.randn(n, hkv, d).bfloat16()

        def attn_call():
            cache = torch.randn(num_seqs * blocks, hkv, bs, 2 * d).bfloat16()
            return lambda: K.softmax_attention(q, k, v, batch, cache if ctx else None)
        if ctx == 0:
            b0 = BatchMeta.from_lengths([new] * num_seqs)
            r.append(compare(f"softmax_attention {tag}", lambda: (lambda: K.softmax_attention(q, k, v, b0)), args.repeats))
        else:
            r.append(compare(f"softmax_attention {tag}", attn_call, args.repeats))
        kl, vl = torch.randn(n, h, d).bfloat16(), torch.randn(n, h, d).bfloat16()
        ld = -torch.rand(h) * 0.3
        batch.state_indices = torch.arange(num_seqs)

        def light_call():
            state = (torch.zeros(num_seqs, h, d, d), torch.zeros(num_seqs, h, cfg.linear_chunk_size, 2 * d))
            return lambda: K.lightning_attention(q, kl, vl, ld, batch, state if ctx else None, cfg.linear_chunk_size)
        r.append(compare(f"lightning_attention {tag}", light_call, args.repeats))
        moe = model.model.layers[1].mlp
        r.append(compare(f"moe_route+experts {tag}", lambda: (lambda: moe(x)), args.repeats))
        r.append(compare(f"logprobs {tag}",
                         lambda: (lambda: K.logprobs(x, model.lm_head.weight, torch.zeros(n, dtype=torch.long))), args.repeats))
    # whole model, trainer forward of 16 x 64 tokens
    ids = torch.randint(4, cfg.vocab_size, (16, 64))
    lens = torch.full((16,), 64)
    whole = compare("tiny model forward [16x64]", lambda: (lambda: model.sequence_logprobs(ids, lens)), args.repeats)
    out["results"].append(whole)
    out["max_op_ratio"] = max(x["ratio"] for x in out["results"][:-1])
    out["model_forward_ratio"] = whole["ratio"]
    out["targets"] = {"op_ratio": 2.0, "model_forward_ratio": 1.5}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
