"""Plain float64 reference implementations, written from DESIGN.md §3 for clarity, not speed.

Used only by gradient/correctness tests (with a tolerance): recurrent lightning attention,
dense causal GQA softmax, per-token MoE loops.
"""
import torch


def linear(x, w):
    return x @ w.t()


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def gated_group_norm(x, gate, w, groups, eps):
    shape = x.shape
    xg = x.reshape(*shape[:-1], groups, -1)
    y = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).reshape(shape)
    return y * w * torch.sigmoid(gate)


def rope(x, pos, rotary_dim, theta):
    half = rotary_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


def lightning(q, k, v, log_decay):
    """q,k,v [T, H, D] -> o [T, H, D]; recurrent S_t = λ S_{t-1} + k_tᵀ v_t, o_t = q_t D^-½ S_t."""
    t, h, d = q.shape
    lam = torch.exp(log_decay.double())[:, None, None]
    s = q.new_zeros(h, d, d)
    out = []
    for i in range(t):
        s = lam * s + k[i][:, :, None] * v[i][:, None, :]
        out.append(torch.einsum("hd,hde->he", q[i] * d ** -0.5, s))
    return torch.stack(out)


def attention(q, k, v):
    t, hq, d = q.shape
    g = hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = torch.einsum("thd,shd->hts", q, k) * d ** -0.5
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hts,shd->thd", p, v)


def mlp(x, gate, up, down):
    return linear(torch.nn.functional.silu(linear(x, gate)) * linear(x, up), down)


def moe(x, ids, weights, experts):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            out[t] += weights[t, slot] * mlp(x[t:t + 1], *experts[e])[0]
    return out


def model_logprobs(model, ids, temperature=1.0):
    """float64 forward of one sequence [T] with the model's parameters -> logprobs [T-1].

    Routing decisions (which experts) are taken from the model's own router so the reference
    differentiates the same piecewise-smooth function.
    """
    from rl.model.layers import linear_log_decay
    cfg = model.config
    P = {k: v.double() for k, v in model.state_dict().items()}
    pos = torch.arange(ids.numel())
    h = P["model.word_embeddings.weight"][ids]
    d = cfg.head_dim
    for l in range(cfg.num_hidden_layers):
        pre = f"model.layers.{l}."
        x = rms_norm(h, P[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = linear(x, P[pre + "attention.query_key_value.weight"])
        if cfg.is_softmax_layer(l):
            hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
            q = qkv[:, : hq * d].view(-1, hq, d)
            k = qkv[:, hq * d:(hq + hk) * d].view(-1, hk, d)
            v = qkv[:, (hq + hk) * d:].view(-1, hk, d)
        else:
            q, k, v = qkv.view(-1, 3, cfg.num_attention_heads, d).unbind(1)
        q = rms_norm(q, P[pre + "attention.query_layernorm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, P[pre + "attention.key_layernorm.weight"], cfg.rms_norm_eps)
        q, k = rope(q, pos, cfg.rotary_dim, cfg.rope_theta), rope(k, pos, cfg.rotary_dim, cfg.rope_theta)
        if cfg.is_softmax_layer(l):
            o = attention(q, k, v).reshape(ids.numel(), -1)
        else:
            o = lightning(q, k, v, torch.tensor(linear_log_decay(cfg, l))).reshape(ids.numel(), -1)
            o = gated_group_norm(o, linear(x, P[pre + "attention.g_proj.weight"]), P[pre + "attention.g_norm.weight"],
                                 cfg.group_norm_size, cfg.rms_norm_eps)
        h = h + linear(o, P[pre + "attention.dense.weight"])
        x = rms_norm(h, P[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if l < cfg.first_k_dense_replace:
            m = mlp(x, P[pre + "mlp.gate_proj.weight"], P[pre + "mlp.up_proj.weight"], P[pre + "mlp.down_proj.weight"])
        else:
            scores = torch.sigmoid(linear(x, P[pre + "mlp.gate.weight"]))
            with torch.no_grad():
                _, ids_sel, _ = model.model.layers[l].mlp.gate(x.float())
            w = scores.gather(1, ids_sel)
            w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
            experts = [tuple(P[f"{pre}mlp.experts.{e}.{n}_proj.weight"] for n in ("gate", "up", "down"))
                       for e in range(cfg.num_experts)]
            m = moe(x, ids_sel, w, experts)
            m = m + mlp(x, *(P[f"{pre}mlp.shared_experts.{n}_proj.weight"] for n in ("gate", "up", "down")))
        h = h + m
    h = rms_norm(h, P["model.norm.weight"], cfg.rms_norm_eps)
    lp = torch.log_softmax(linear(h, P["lm_head.weight"]) / temperature, -1)
    return lp[:-1].gather(1, ids[1:, None])[:, 0]


def assert_close(actual, expected, what, rtol=2e-3, atol=2e-5):
    """Tolerance check (gradients/correctness vs float64 only, never for parity)."""
    err = (actual.double() - expected.double()).abs()
    excess = err - (atol + rtol * expected.double().abs())
    if (excess > 0).any():
        worst = int(excess.reshape(-1).argmax())
        raise AssertionError(f"{what}: max err {err.max():.3e}; worst flat index {worst}: "
                             f"{actual.reshape(-1)[worst].item():.6g} vs {expected.reshape(-1)[worst].item():.6g}")


def float64_twin(model):
    """A deep copy of `model` whose state_dict() returns float64 leaf copies of its tensors
    (model_logprobs reads parameters through state_dict()): (twin, {name: float64 leaf})."""
    import copy
    twin = copy.deepcopy(model)
    params = {k: v.detach().double().requires_grad_(True) for k, v in twin.state_dict().items()}
    twin.state_dict = lambda: params
    return twin, params


def assert_grads_match(named_params, params64, min_checked=20, rtol=2e-2, atol=2e-4):
    """Every parameter with a float64 reference gradient matches it within tolerance."""
    checked = 0
    for name, p in named_params:
        if params64[name].grad is None:
            continue
        assert_close(p.grad, params64[name].grad, f"grad {name}", rtol=rtol, atol=atol)
        checked += 1
    assert checked >= min_checked, f"only {checked} parameters had a reference gradient"

