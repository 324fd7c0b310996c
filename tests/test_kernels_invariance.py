"""Contract 1 and 3: batch invariance and run-to-run determinism of every op, bitwise.

A row computed inside a call of M rows (M in {1, 2, 3, 7, 16, 64, 257, 1000}, at random
positions) must equal the same row computed inside a call of 1000 rows, with 1, 2 and 4 threads.
"""
import pytest
import torch

from bits import assert_bits_equal
from rl import kernels as K
from rl.kernels import BatchMeta
from rl.kernels.cpu import elementwise

SIZES = [1, 2, 3, 7, 16, 64, 257, 1000]


def rows_invariant(fn, x_all, what):
    """fn maps [M, ...] -> [M, ...] row-wise; check every M at a random offset, 1, 2, 4 threads."""
    reference = fn(x_all)
    gen = torch.Generator().manual_seed(7)
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2, 4):
            torch.set_num_threads(num_threads)
            for m in SIZES:
                start = int(torch.randint(0, x_all.shape[0] - m + 1, (1,), generator=gen))
                assert_bits_equal(fn(x_all[start:start + m]), reference[start:start + m],
                                  f"{what} M={m} start={start} threads={num_threads}")
                perm = torch.randperm(m, generator=gen) + start
                assert_bits_equal(fn(x_all[perm]), reference[perm], f"{what} M={m} permuted")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n,k", [(384, 128), (128, 128), (64, 256), (1024, 2048), (128, 1000),
                                  (3072, 1024), (512, 1024), (1024, 512), (1100, 64)], ids=lambda v: str(v))
def test_linear_batch_invariant(dtype, n, k):
    w = torch.randn(n, k).to(dtype)
    x = torch.randn(1000, k).to(dtype)
    rows_invariant(lambda t: K.linear(t, w), x, f"linear {n}x{k}")


@pytest.mark.parametrize("n", [128, 700, 1300], ids=["router", "lm_head-one-block", "lm_head"])
def test_linear_fp32_out_batch_invariant(n):
    w = torch.randn(n, 64).bfloat16()
    rows_invariant(lambda t: K.linear(t, w, out_dtype=torch.float32), torch.randn(1000, 64).bfloat16(),
                   f"fp32-out linear {n}x64")


@pytest.mark.parametrize("n,k", [(384, 128), (64, 128), (128, 64), (3072, 1024), (512, 1024), (1024, 512),
                                  (1024, 2816), (2816, 1024)], ids=lambda v: str(v))
def test_prepacked_linear_gives_the_plain_bits(n, k):
    """The rollout engine packs its bf16 weights once (K.prepack); the trainer never does:
    every row must come out bit-identical either way, at every M and thread count."""
    w = (torch.randn(n, k) * 0.05).bfloat16()
    x = torch.randn(1000, k).bfloat16()
    plain = K.linear(x, w)
    assert K.prepack([w]) == 1
    rows_invariant(lambda t: K.linear(t, w), x, f"prepacked linear {n}x{k}")
    assert_bits_equal(K.linear(x, w), plain, f"prepacked vs plain {n}x{k}")
    with torch.no_grad():
        w.mul_(2.0)                      # an in-place change: the stale pack must not be used
    assert_bits_equal(K.linear(x, w), K.linear(x, w.clone()), "after an in-place update")


@pytest.mark.parametrize("k,sizes", [(128, (384, 128)), (128, (256, 256)), (128, (64, 64)), (1024, (3072, 1024)),
                                     (1024, (2816, 2816)), (1024, (512, 512))], ids=lambda v: str(v))
def test_fused_linear_gives_each_projections_bits(k, sizes):
    """The rollout engine runs the projections of one input (q/k/v + output gate, an MLP's gate
    + up) as one packed product (K.prepack_fused); each part's columns must be bit-identical to
    the trainer's own unpacked product, at every M and thread count; a trainer (no prepare),
    autograd or a weight changed in place since gets None (its modules run one by one)."""
    ws = [(torch.randn(n, k) * 0.05).bfloat16() for n in sizes]
    x = torch.randn(1000, k).bfloat16()
    with torch.no_grad():
        assert K.fused_linear(x, ws) is None              # never prepared: nothing kept
    plain = torch.cat([K.linear(x, w) for w in ws], 1)
    assert K.prepack_fused([ws]) == [True]
    with torch.no_grad():
        rows_invariant(lambda t: torch.cat(K.fused_linear(t, ws), 1), x, f"fused linear {sizes}x{k}")
        with torch.inference_mode():                      # as vLLM runs the model
            assert_bits_equal(torch.cat(K.fused_linear(x, ws), 1), plain, f"fused vs plain {sizes}x{k}")
    assert K.fused_linear(x.clone().requires_grad_(), ws) is None
    ws[0].requires_grad_()                                # a trainable weight: autograd must see it
    assert K.fused_linear(x, ws) is None
    ws[0].requires_grad_(False)
    with torch.no_grad():
        ws[1].mul_(2.0)                                   # an in-place change: the copy is stale
        assert K.fused_linear(x, ws) is None
        assert K.fused_linear(x, [ws[0], ws[1].clone()]) is None      # other tensors: not this copy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [128, 399, 400, 1024], ids=lambda v: f"D{v}")
def test_rms_norm_batch_invariant(dtype, d):
    w = torch.randn(d).to(dtype)
    rows_invariant(lambda t: K.rms_norm(t, w, 1e-6), torch.randn(1000, d).to(dtype), f"rms_norm D={d}")
    wh = torch.randn(32).to(dtype)
    rows_invariant(lambda t: K.rms_norm(t, wh, 1e-6), torch.randn(1000, 4, 32).to(dtype), "per-head rms_norm")


def test_gated_group_norm_batch_invariant():
    w = torch.randn(128).bfloat16()
    x = torch.randn(1000, 256).bfloat16()
    rows_invariant(lambda t: K.gated_group_rms_norm(t[:, :128], t[:, 128:], w, 2, 1e-6), x, "gated group norm")


def test_rope_batch_invariant():
    x = torch.randn(1000, 4, 32).bfloat16()
    pos = torch.randint(0, 4096, (1000,))
    packed = torch.cat([x.float().reshape(1000, -1), pos[:, None].float()], 1)
    rows_invariant(lambda t: K.rope(t[:, :-1].reshape(-1, 4, 32).bfloat16(), t[:, -1].long(), 16, 1e4), packed, "rope")


def test_rope_tables_reused_only_for_equal_positions():
    """rope keeps the last call's tables: reused for equal positions (same bits), rebuilt when
    the positions differ, also after an in-place change of the same tensor (inference mode:
    no version counter)."""
    x = torch.randn(64, 4, 32).bfloat16()
    with torch.inference_mode():
        pos = torch.arange(64)
        first = K.rope(x, pos, 16, 1e4)
        assert_bits_equal(K.rope(x, pos, 16, 1e4), first, "reused tables")
        pos.add_(3)
        assert_bits_equal(K.rope(x, pos, 16, 1e4), K.rope(x, torch.arange(3, 67), 16, 1e4), "changed in place")
        assert not torch.equal(K.rope(x, pos, 16, 1e4), first)
        assert_bits_equal(K.rope(x, torch.arange(64), 8, 1e4)[..., 8:16], x[..., 8:16], "other rotary_dim")


@pytest.mark.parametrize("op", ["sigmoid", "silu"])
def test_activations_position_invariant(op):
    """ATen's own sigmoid/silu are not (scalar tail path); ours are built from exp."""
    fn = getattr(elementwise, op)
    x = torch.randn(100003) * 5
    ref = fn(x)
    for n in (1, 3, 15, 17, 33, 1000, 40001):
        for s in (0, 5, 13):
            assert_bits_equal(fn(x[s:s + n]), ref[s:s + n], f"{op} n={n} s={s}")


def test_moe_route_and_experts_batch_invariant():
    num_experts, hidden, inter = 8, 64, 32
    gate = torch.randn(num_experts, hidden).bfloat16()
    bias = torch.randn(num_experts) * 0.1
    gw = torch.randn(num_experts, inter, hidden).bfloat16()
    uw = torch.randn(num_experts, inter, hidden).bfloat16()
    dw = torch.randn(num_experts, hidden, inter).bfloat16()

    def moe(t):
        weights, ids, logits = K.moe_route(t, gate, bias, 2, 4, 2, True, 2.5)
        out = K.moe_experts(t, ids, weights, gw, uw, dw)
        return torch.cat([out.float(), weights, ids.float(), logits], 1)
    rows_invariant(moe, torch.randn(1000, hidden).bfloat16(), "moe")


def test_moe_experts_rollout_path_equals_trainer_path():
    """Without autograd the experts' rows go through one sorted gather (rollout), with it
    through one gather per expert (trainer): the same bits, also with idle experts and no tokens."""
    num_experts, hidden, inter, k = 8, 64, 32, 2
    gw = torch.randn(num_experts, inter, hidden).bfloat16()
    uw = torch.randn(num_experts, inter, hidden).bfloat16()
    dw = torch.randn(num_experts, hidden, inter).bfloat16()
    for n, pool in ((300, 8), (37, 3), (1, 8), (0, 8)):
        x = torch.randn(n, hidden).bfloat16()
        ids = torch.stack([torch.randperm(pool)[:k] for _ in range(n)]).sort(-1)[0] if n else \
            torch.zeros((0, k), dtype=torch.int64)
        weights = torch.rand(n, k)
        with torch.no_grad():
            rollout = K.moe_experts(x, ids, weights, gw, uw, dw)
        trainer = K.moe_experts(x.clone().requires_grad_(), ids, weights, gw, uw, dw)
        assert_bits_equal(rollout, trainer.detach(), f"moe experts n={n} experts used={pool}")


@pytest.mark.parametrize("num_experts,inter,hidden,k", [(8, 64, 128, 2), (16, 512, 1024, 4)],
                         ids=["tiny", "small"])
def test_moe_experts_stacked_paths_equal_trainer_path(num_experts, inter, hidden, k):
    """Without autograd, with the stacked copies `prepack_experts` keeps, the rollout runs every
    expert in two grouped tile products (AMX, `_grouped_experts`) or, without AMX, the gate/up
    and/or down products over all experts' stacked weights (with per-module weight lists as
    the model passes them): the same bits as the trainer's per-expert products for every path,
    1 and 2 threads, idle experts, and re-stacked after a weight changes in place."""
    from rl.kernels.cpu import moe, tiles

    def grouped(x, flat_ids):
        with torch.no_grad():
            got = moe._grouped_experts(x, flat_ids, k, gw, uw, dw, moe._expert_counts(flat_ids, num_experts))
        assert (got is not None) == tiles.available()
        out_sorted, order = got
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return out
    gw = [torch.randn(inter, hidden).bfloat16() for _ in range(num_experts)]
    uw = [torch.randn(inter, hidden).bfloat16() for _ in range(num_experts)]
    dw = [torch.randn(hidden, inter).bfloat16() for _ in range(num_experts)]
    K.prepack(gw + uw + dw)
    with torch.no_grad():                   # a trainer's no-grad forward keeps no stacked copy
        K.moe_experts(torch.randn(4, hidden).bfloat16(), torch.arange(4 * k).view(4, k) % num_experts,
                      torch.rand(4, k), gw, uw, dw)
    assert moe._dense_choice(torch.zeros(4, hidden).bfloat16(), torch.arange(4 * k) % num_experts,
                             gw, uw, dw) == (False, False)
    assert K.prepack_experts(gw, uw, dw) == 1
    threads = torch.get_num_threads()
    combos = [(True, True), (True, False), (False, True)]
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            for n, pool in ((1, num_experts), (5, 3), (16, num_experts), (64, num_experts)):
                x = torch.randn(n, hidden).bfloat16()
                ids = torch.stack([torch.randperm(pool)[:k] for _ in range(n)]).sort(-1)[0]
                weights = torch.rand(n, k)
                per_expert = moe._per_expert_gathers(x, ids.reshape(-1), k, gw, uw, dw)
                for dense in combos:
                    with torch.no_grad():
                        stacked = moe._stacked_experts(x, ids.reshape(-1), k, gw, uw, dw, *dense)
                    assert_bits_equal(stacked, per_expert, f"stacked {dense} n={n} threads={num_threads}")
                if tiles.available():
                    assert_bits_equal(grouped(x, ids.reshape(-1)), per_expert, f"grouped n={n} threads={num_threads}")
                with torch.inference_mode():          # as vLLM runs the model
                    rollout = K.moe_experts(x, ids, weights, gw, uw, dw)
                trainer = K.moe_experts(x.clone().requires_grad_(), ids, weights, gw, uw, dw)
                assert_bits_equal(rollout, trainer.detach(), f"moe experts n={n} threads={num_threads}")
        with torch.no_grad():
            for w in (gw[3], uw[3], dw[3]):
                w.mul_(2.0)                    # a weight update in place: the stale stack is unused
                x = torch.randn(4, hidden).bfloat16()
                ids = torch.cat([torch.full((4, 1), 3), torch.arange(4, 4 + k - 1).expand(4, -1)], 1)
                expected = moe._per_expert_gathers(x, ids.reshape(-1), k, gw, uw, dw)
                assert (moe._stacked_down(dw) if w is dw[3] else moe._stacked_gate_up(gw, uw)) is None
                with torch.no_grad():
                    assert moe._grouped_experts(x, ids.reshape(-1), k, gw, uw, dw,
                                                moe._expert_counts(ids.reshape(-1), num_experts)) is None
                assert_bits_equal(K.moe_experts(x, ids, torch.ones(4, k), gw, uw, dw),
                                  K.moe_experts(x.clone().requires_grad_(), ids, torch.ones(4, k), gw, uw, dw).detach(),
                                  "stale stack")
                K.prepack_experts(gw, uw, dw)  # what the rollout engine does after a load
                if tiles.available():
                    assert_bits_equal(grouped(x, ids.reshape(-1)), expected, "grouped after update")
                for dense in combos:
                    assert_bits_equal(moe._stacked_experts(x, ids.reshape(-1), k, gw, uw, dw, *dense),
                                      expected, f"after update {dense}")
    finally:
        torch.set_num_threads(threads)


def test_moe_dense_choice_at_model_decode_shapes():
    """The choice the rollout makes at decode sizes (speed only; every choice has the same
    bits): tiny stacks both products, small stacks gate/up (one 32-row tile either way) but
    keeps per-expert down products (two 32-row tiles would read the stacked weight twice)."""
    from rl.kernels.cpu import moe
    for (e, inter, hidden, k, n), expected in (((8, 64, 128, 2, 64), (True, True)),
                                               ((16, 512, 1024, 4, 16), (True, False))):
        gw = [torch.zeros(inter, hidden).bfloat16() for _ in range(e)]
        uw = [torch.zeros(inter, hidden).bfloat16() for _ in range(e)]
        dw = [torch.zeros(hidden, inter).bfloat16() for _ in range(e)]
        ids = torch.arange(n * k) % e
        K.prepack_experts(gw, uw, dw)
        assert moe._dense_choice(torch.zeros(n, hidden).bfloat16(), ids, gw, uw, dw) == expected


def test_moe_route_ties_go_to_lower_index():
    scores_logits = torch.zeros(3, 8)        # all experts tie
    gate = torch.eye(8)
    weights, ids, _ = K.moe_route(scores_logits, gate, None, 2, 4, 2, True, 1.0)
    assert ids.tolist() == [[0, 1]] * 3
    assert torch.equal(weights, torch.full((3, 2), 0.5))


def test_logprobs_batch_invariant():
    w = torch.randn(128, 64).bfloat16()
    h = torch.randn(1000, 64).bfloat16()
    tok = torch.randint(0, 128, (1000,))
    packed = torch.cat([h.float(), tok[:, None].float()], 1)
    for temperature in (1.0, 0.7):
        rows_invariant(lambda t: K.logprobs(t[:, :-1].bfloat16(), w, t[:, -1].long(), temperature)[:, None],
                       packed, f"logprobs T={temperature}")


def _attn_inputs(lengths, hq=4, hkv=2, d=32):
    n = sum(lengths)
    return (torch.randn(n, hq, d).bfloat16(), torch.randn(n, hkv, d).bfloat16(), torch.randn(n, hkv, d).bfloat16())


def test_batch_meta_max_query_len_only_from_host_lengths():
    """A kernel may skip a launch on `max_query_len`: it is set only where the host knew it."""
    assert BatchMeta.from_lengths([1, 1, 0], [5, 9, 3]).max_query_len == 1
    assert BatchMeta.from_lengths([4, 70, 2]).max_query_len == 70
    assert BatchMeta.from_lengths([]).max_query_len == 0
    assert BatchMeta.from_lengths(torch.tensor([1, 2])).max_query_len is None


def test_attention_sequence_alone_equals_in_batch():
    lengths = [5, 70, 130, 1, 33]
    q, k, v = _attn_inputs(lengths)
    full = K.softmax_attention(q, k, v, BatchMeta.from_lengths(lengths))
    start = 0
    for n in lengths:
        alone = K.softmax_attention(q[start:start + n], k[start:start + n], v[start:start + n], BatchMeta.from_lengths([n]))
        assert_bits_equal(alone, full[start:start + n], f"attention seq len {n}")
        start += n


def test_lightning_sequence_alone_equals_in_batch():
    lengths = [5, 70, 130, 1, 33]
    n = sum(lengths)
    q, k, v = (torch.randn(n, 4, 32).bfloat16() for _ in range(3))
    ld = -torch.rand(4) * 0.3
    full = K.lightning_attention(q, k, v, ld, BatchMeta.from_lengths(lengths), None, 16)
    start = 0
    for m in lengths:
        alone = K.lightning_attention(q[start:start + m], k[start:start + m], v[start:start + m], ld,
                                      BatchMeta.from_lengths([m]), None, 16)
        assert_bits_equal(alone, full[start:start + m], f"lightning seq len {m}")
        start += m


def test_run_to_run_determinism(tiny_model):
    ids = torch.randint(4, 128, (5, 90))
    lengths = torch.tensor([90, 3, 47, 64, 17])
    with torch.no_grad():
        a = tiny_model.sequence_logprobs(ids, lengths)
        b = tiny_model.sequence_logprobs(ids, lengths)
    assert_bits_equal(a, b, "two runs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_c_norms_and_rope_are_the_torch_forms_bits(dtype):
    """Without autograd, RMSNorm (plain and gated group) and RoPE run as one C pass each
    (csrc/norm_rope.c); the trainer keeps the torch forms. The two must give the same bits: row
    lengths 1 to 4096, one weight row or one per head, strided inputs, partial rotation, gates
    whose exp overflows."""
    import importlib
    norm = importlib.import_module("rl.kernels.cpu.norm")
    rope = importlib.import_module("rl.kernels.cpu.rope")      # (the package exports a function `rope`)
    gen = torch.Generator().manual_seed(5)
    for d in list(range(1, 80)) + [96, 127, 128, 129, 255, 256, 320, 399, 400, 1000, 1024, 2048, 2816, 4096]:
        x = (torch.randn(37, 3, d, generator=gen) * 4).to(dtype)
        for weight in (torch.randn(d, generator=gen).bfloat16(), torch.randn(3, d, generator=gen).bfloat16()):
            assert norm._c_weight_rows(x, weight)
            assert_bits_equal(norm.rms_norm(x, weight, 1e-6), norm._rms_norm_torch(x, weight, 1e-6), f"rms_norm D={d}")
        strided = torch.randn(37, 5, d, generator=gen).to(dtype)[:, 1:4]
        w = torch.randn(d, generator=gen)
        assert_bits_equal(norm.rms_norm(strided, w, 1e-5), norm._rms_norm_torch(strided, w, 1e-5), f"strided D={d}")
    positions = torch.randint(0, 4096, (37,), generator=gen)
    for d, rotary in [(32, 16), (32, 32), (64, 32), (128, 64), (128, 128)]:
        x = (torch.randn(37, 6, d, generator=gen) * 3).to(dtype)[:, 1:5]          # strided heads
        cos, sin = rope.rope_tables(positions, rotary, 10000.0)
        assert_bits_equal(rope.rope(x, positions, rotary, 10000.0), rope._rope_torch(x, cos, sin, rotary),
                          f"rope D={d} rotary={rotary}")
    for c, groups in [(8, 1), (64, 2), (128, 2), (512, 4), (1024, 4), (1000, 8), (4096, 16)]:
        fused = (torch.randn(37, 3 * c, generator=gen) * 4).to(dtype)     # x and gate: views of one output
        fused[0, 2 * c:] = torch.tensor([90.0, -90.0, float("inf"), float("-inf")] * (c // 4) + [0.0] * (c % 4))
        x, gate = fused[:, c:2 * c], fused[:, 2 * c:]
        weight = torch.randn(c, generator=gen).bfloat16()
        assert_bits_equal(norm.gated_group_rms_norm(x, gate, weight, groups, 1e-6),
                          norm._gated_group_rms_norm_torch(x, gate, weight, groups, 1e-6), f"gated norm C={c}")


def test_c_swiglu_is_the_torch_forms_bits():
    """Without autograd, bf16 SwiGLU (the MLPs' and experts' silu(gate) * up) takes ATen's exp and
    one C pass; the trainer keeps `silu(gate.float()) * up.float()`. Same bits: widths 1 to
    2816, gate and up as views of one fused output, gates whose exp overflows, NaN."""
    from rl.kernels.cpu import elementwise
    gen = torch.Generator().manual_seed(6)
    for inter in (1, 7, 16, 64, 100, 512, 2816):
        fused = (torch.randn(29, 2 * inter, generator=gen) * 6).bfloat16()
        fused[0, :min(inter, 5)] = torch.tensor([100.0, -100.0, float("inf"), float("-inf"), float("nan")])[:min(inter, 5)]
        gate, up = fused[:, :inter], fused[:, inter:]
        with torch.no_grad():
            got = K.swiglu(gate, up)
        assert_bits_equal(got, (elementwise.silu(gate.float()) * up.float()).to(torch.bfloat16), f"swiglu I={inter}")


def test_c_forms_take_cpu_tensors_only():
    """The `stock` backend borrows the cpu backend's RoPE for every device: a CUDA tensor once
    reached the C pass and crashed the process (`lockstep mismatch --kernels stock --device
    cuda`). Tensors not on the CPU (here: meta) get the torch forms or a clear error."""
    import importlib
    rope = importlib.import_module("rl.kernels.cpu.rope")
    from rl.kernels.cpu import elementwise, norm
    with torch.no_grad():
        x = torch.empty(4, 2, 32, dtype=torch.bfloat16, device="meta")
        assert rope.rope(x, torch.arange(4, device="meta"), 16, 1e4).device.type == "meta"
        y = torch.empty(4, 64, dtype=torch.bfloat16, device="meta")
        assert elementwise.swiglu(y, y).device.type == "meta"
        with pytest.raises(ValueError, match="CPU tensors only"):
            norm.rms_norm(x, torch.empty(32, dtype=torch.bfloat16, device="meta"), 1e-6)
        with pytest.raises(ValueError, match="CPU tensors only"):
            norm.gated_group_rms_norm(y, y, torch.empty(64, dtype=torch.bfloat16, device="meta"), 2, 1e-6)


def test_c_expert_selection_is_the_torch_forms():
    """Without autograd the router's group-limited top-k runs in C (csrc/route.c); the trainer
    keeps the torch form (`select_experts`). Same ids and weight bits over expert counts, group
    settings, tied scores (lower index first) and NaN scores (ordered first, as torch sorts)."""
    import importlib
    moe = importlib.import_module("rl.kernels.cpu.moe")
    gen = torch.Generator().manual_seed(0)
    for trial in range(240):
        e = [8, 16, 64, 256][trial % 4]
        groups = [1, 4, 8][trial % 3] if e >= 16 else [1, 4][trial % 2]
        keep = max(1, groups // 2)
        k = min([2, 4, 8][trial % 3], keep * (e // groups))
        s = torch.sigmoid(torch.randn(33, e, generator=gen))
        if trial % 5 == 0:
            s = (s * 8).round() / 8                       # many ties
        if trial % 7 == 0:
            s[0, 3] = float("nan")
        bias = None if trial % 2 == 0 else (torch.zeros(e) if trial % 11 == 0 else torch.randn(e, generator=gen) * 0.1)
        assert moe._select_in_c(s, bias, k, groups, keep)
        for norm in (True, False):
            w_ref, ids_ref = moe.select_experts(s, bias, k, groups, keep, norm, 2.5)
            w, ids = moe._select_experts_c(s, bias, k, groups, keep, norm, 2.5)
            assert torch.equal(ids, ids_ref), f"trial {trial}: ids {ids[:2].tolist()} vs {ids_ref[:2].tolist()}"
            assert_bits_equal(torch.nan_to_num(w, nan=7.0), torch.nan_to_num(w_ref, nan=7.0), f"trial {trial} weights")
