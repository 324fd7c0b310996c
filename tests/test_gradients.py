"""Contract 6: gradients are correct (not bitwise): each op and the tiny model against a
float64 reference written independently in tests/naive.py, within a tolerance."""
import torch

from naive import assert_close
import naive
from rl import kernels as K
from rl.kernels import BatchMeta


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape).to(out.dtype)).sum().backward()
    return out.detach(), [t.grad for t in inputs]


def _check(ours, ref, inputs, what, rtol=2e-3, atol=2e-5):
    out32, g32 = _grads(ours, [t.float() for t in inputs])
    out64, g64 = _grads(ref, [t.double() for t in inputs])
    assert_close(out32, out64, f"{what} forward", rtol, atol)
    for i, (a, b) in enumerate(zip(g32, g64)):
        assert_close(a, b, f"{what} grad of input {i}", rtol, atol)


def test_linear_grad():
    _check(lambda x, w: K.linear(x, w), naive.linear, [torch.randn(37, 64), torch.randn(48, 64)], "linear")


def test_norm_grads():
    _check(lambda x, w: K.rms_norm(x, w, 1e-6), lambda x, w: naive.rms_norm(x, w, 1e-6),
           [torch.randn(9, 3, 32), torch.randn(32)], "rms_norm")
    _check(lambda x, g, w: K.gated_group_rms_norm(x, g, w, 4, 1e-6),
           lambda x, g, w: naive.gated_group_norm(x, g, w, 4, 1e-6),
           [torch.randn(9, 128), torch.randn(9, 128), torch.randn(128)], "gated group norm")


def test_rope_grad():
    pos = torch.randint(0, 500, (11,))
    _check(lambda x: K.rope(x, pos, 16, 1e4), lambda x: naive.rope(x, pos, 16, 1e4), [torch.randn(11, 2, 32)], "rope")


def test_attention_grad():
    batch = BatchMeta.from_lengths([70])
    _check(lambda q, k, v: K.softmax_attention(q, k, v, batch), naive.attention,
           [torch.randn(70, 4, 32), torch.randn(70, 2, 32), torch.randn(70, 2, 32)], "softmax attention")


def test_lightning_grad():
    ld = -torch.rand(4) * 0.5
    batch = BatchMeta.from_lengths([45])
    _check(lambda q, k, v: K.lightning_attention(q, k, v, ld, batch, None, 16),
           lambda q, k, v: naive.lightning(q, k, v, ld), [torch.randn(45, 4, 32) for _ in range(3)], "lightning")


def test_moe_grad():
    e, hdim, inter = 4, 32, 16
    gw, uw, dw = torch.randn(e, inter, hdim) / 4, torch.randn(e, inter, hdim) / 4, torch.randn(e, hdim, inter) / 4
    ids = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3], [0, 3]])

    def ours(x, w, g, u, d):
        return K.moe_experts(x, ids, w, g, u, d)

    def ref(x, w, g, u, d):
        return naive.moe(x, ids, w, [(g[i], u[i], d[i]) for i in range(e)])
    _check(ours, ref, [torch.randn(5, hdim), torch.rand(5, 2), gw, uw, dw], "moe experts")


def test_logprobs_grad():
    tok = torch.randint(0, 50, (13,))
    _check(lambda h, w: K.logprobs(h, w, tok, 0.7),
           lambda h, w: torch.log_softmax(naive.linear(h, w) / 0.7, -1).gather(1, tok[:, None])[:, 0],
           [torch.randn(13, 32), torch.randn(50, 32)], "logprobs")


def test_tiny_model_grad_matches_float64_reference():
    """fp32 model, policy-gradient-like loss: Σ adv_t · logp_t; grads vs the float64 reference."""
    from rl.model.checkpoint import load_model
    from tests_paths import TINY
    torch.manual_seed(5)
    model = load_model(TINY, dtype=torch.float32)
    with torch.no_grad():                       # larger weights: stronger signal through layers
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    ids = torch.randint(4, 128, (40,))
    adv = torch.linspace(-1, 1, 39, dtype=torch.float64)
    lp = model.sequence_logprobs(ids[None], [40])[0, 1:]
    (lp.double() * adv).sum().backward()
    ref = naive.model_logprobs(model, ids)
    assert_close(lp.detach(), ref.detach(), "tiny model logprobs", rtol=2e-3, atol=2e-4)
    m64, params64 = naive.float64_twin(model)      # float64 reference gradient
    ref = naive.model_logprobs(m64, ids)
    (ref * adv).sum().backward()
    naive.assert_grads_match(model.named_parameters(), params64)
