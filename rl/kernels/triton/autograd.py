"""Gradients for forward-only Triton kernels: recompute a differentiable torch reference.

`with_reference_grad(fast, reference, tensors, consts)` returns `fast(*tensors, *consts)` (the
invariant forward, bits unchanged) and, under autograd, backpropagates through
`reference(*tensors, *consts)` recomputed in torch. The contract asks gradients to be correct
(checked against float64), not bit-identical to anything, so the reference may use any torch
kernel (cuBLAS, SDPA, fla); it only has to compute the same function.
"""
from __future__ import annotations

import torch


class _FastForwardReferenceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fast, reference, consts, *tensors):
        ctx.reference, ctx.consts = reference, consts
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            out = fast(*tensors, *consts)
        ctx.multi = isinstance(out, tuple)
        if ctx.multi:
            ctx.mark_non_differentiable(*[o for o in out if not o.is_floating_point()])
        return out

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        inputs = [t.detach().requires_grad_(n) for t, n in zip(tensors, need)]
        with torch.enable_grad():
            out = ctx.reference(*inputs, *ctx.consts)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads)
                 if g is not None and o.is_floating_point() and o.requires_grad]
        wanted = [i for i, n in zip(inputs, need) if n]
        if not pairs or not wanted:
            return (None, None, None, *[None] * len(inputs))
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                       allow_unused=True))
        return (None, None, None, *[next(got) if n else None for n in need])


def with_reference_grad(fast, reference, tensors, consts=()):
    needs = torch.is_grad_enabled() and any(t.requires_grad for t in tensors if isinstance(t, torch.Tensor))
    if not needs:
        with torch.no_grad():
            return fast(*tensors, *consts)
    return _FastForwardReferenceGrad.apply(fast, reference, tuple(consts), *tensors)
