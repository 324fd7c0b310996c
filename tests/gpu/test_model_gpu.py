"""Model-level bitwise contract on the GPU: the `small` config and a slice of
Ring-mini-linear-2.0 at full width (one layer group: 4 linear + 1 softmax layer, 256 experts,
top-8, vocab 157184, random weights).

Chain: one sequence alone = the same sequence in a batch of mixed lengths (batch invariance)
-> full forward = prefill + decode token by token, and = chunked prefill, through the model's
cached forward with paged KV blocks that are not contiguous and NaN-poisoned fresh caches
(prefill/decode invariance) -> therefore the rollout's logprob = the trainer's.
`lockstep mismatch --backend reference` itself runs from bench/gpu_run.sh (bench/mismatch_gpu.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl import kernels as K
from rl.kernels import BatchMeta
from gpu_helpers import DEV, assert_bitwise, rows_of, split_schedule

ROOT = Path(__file__).resolve().parents[2]
SLICE = {"num_hidden_layers": 5, "first_k_dense_replace": 0}   # layers 0-3 linear, 4 softmax


def model_config_path(name: str, tmp_dir: Path) -> Path:
    src = ROOT / "configs" / "model" / f"{name.split(':')[0]}.json"
    if ":" not in name:
        return src
    data = json.loads(src.read_text())
    data.update(SLICE)
    out = tmp_dir / "ring-mini-slice.json"
    out.write_text(json.dumps(data))
    return out


def build_model(path: Path, seed: int = 0):
    from rl.model import load_model_config
    from rl.model.modeling import BailingMoeLinearV2ForCausalLM
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = BailingMoeLinearV2ForCausalLM(load_model_config(path))
    with torch.no_grad():   # a non-zero expert bias exercises biased selection
        for layer in model.model.layers:
            if getattr(layer, "is_moe", False) and layer.mlp.gate.expert_bias is not None:
                layer.mlp.gate.expert_bias.normal_(0.0, 1e-3)
    return model.to(torch.bfloat16).eval()


@pytest.fixture(scope="module", params=["small", "ring-mini-linear-2.0:slice"])
def model(request, tmp_path_factory):
    m = build_model(model_config_path(request.param, tmp_path_factory.mktemp("cfg")))
    yield m
    del m
    torch.cuda.empty_cache()


def _caches(model, lengths, block_size=16):
    from rollout.reference import Caches
    per = -(-max(lengths) // block_size) + 1
    caches = Caches(model, len(lengths) * per + 2, block_size, len(lengths) + 2, seed=1)
    table = torch.zeros((len(lengths), per), dtype=torch.int32)
    for i in range(len(lengths)):
        for j in range(per):
            table[i, j] = caches.allocate()
    return caches, table.to(DEV)


def _cached_run(model, ids, lengths, first, step_of, block_size=16):
    caches, table = _caches(model, lengths, block_size)
    slots = torch.arange(len(lengths), 0, -1, device=DEV)          # slot != sequence index
    out = None
    for ctx, qlen in split_schedule(lengths, first, step_of):
        rows = rows_of(lengths, ctx, qlen)
        b = BatchMeta.from_lengths(qlen, context_lens=ctx, device=DEV)
        pos = b.positions()
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=DEV), b.query_lens)
        b.block_table = table
        b.slot_mapping = table[seq, pos // block_size].long() * block_size + pos % block_size
        b.state_indices = slots
        h = model.forward_tokens(ids[rows], b, caches.layers)
        if out is None:
            out = torch.full((ids.shape[0], h.shape[1]), float("nan"), dtype=h.dtype, device=DEV)
        out[rows] = h
    return out


@torch.no_grad()
def test_model_full_equals_prefill_decode(model):
    cfg = model.config
    lengths = [1, 9, 64, 65, 130, 37]
    ids = torch.randint(0, cfg.vocab_size, (sum(lengths),), device=DEV)
    full = model.forward_tokens(ids, BatchMeta.from_lengths(lengths, device=DEV))
    assert not torch.isnan(full).any()
    # batch invariance: each sequence alone
    start = 0
    for n in lengths:
        alone = model.forward_tokens(ids[start:start + n], BatchMeta.from_lengths([n], device=DEV))
        assert_bitwise(alone, full[start:start + n], f"sequence of {n} alone vs in batch")
        start += n
    # prefill half, then decode token by token (all sequences together, mixed contexts)
    dec = _cached_run(model, ids, lengths, [max(1, n // 2) for n in lengths], lambda it, i: 1)
    assert_bitwise(dec, full, "full forward vs prefill + decode")
    # chunked prefill at uneven chunk sizes
    chunk = _cached_run(model, ids, lengths, [min(n, 7) for n in lengths], lambda it, i: (1, 63, 64, 5)[(it + i) % 4])
    assert_bitwise(chunk, full, "full forward vs chunked prefill")
    # logprobs: rollout rows (decode hidden) vs trainer rows (full hidden), gathered and full
    targets = torch.randint(0, cfg.vocab_size, (sum(lengths),), device=DEV)
    assert_bitwise(K.logprobs(dec, model.lm_head.weight, targets, 0.8),
                   K.logprobs(full, model.lm_head.weight, targets, 0.8), "logprobs")
    rows = torch.tensor([0, 5, 70, 200], device=DEV)
    assert_bitwise(model.log_softmax(dec[rows], 1.0), model.log_softmax(full, 1.0)[rows], "log_softmax rows")


def test_model_sequence_logprobs_microbatch_invariant(model):
    cfg = model.config
    lengths = torch.tensor([70, 3, 129, 40])
    ids = torch.randint(0, cfg.vocab_size, (4, 129), device=DEV)
    with torch.no_grad():
        together = model.sequence_logprobs(ids, lengths)
        for i in range(4):
            alone = model.sequence_logprobs(ids[i:i + 1, : int(lengths[i])], lengths[i:i + 1])
            assert_bitwise(alone[0], together[i, : int(lengths[i])], f"micro-batch row {i}")


def test_model_backward_runs(model):
    if model.config.num_experts > 64:
        pytest.skip("gradient plumbing is checked on the small config")
    model.train()
    lengths = torch.tensor([50, 17])
    ids = torch.randint(0, model.config.vocab_size, (2, 50), device=DEV)
    lp = model.sequence_logprobs(ids, lengths)
    lp.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()
