"""fp32 lm_head + log-softmax at temperature T: the only source of reported logprobs.

Logits come from the invariant GEMM (bf16 inputs, fp32 accumulate and output), in chunks of
ROWS_PER_CHUNK rows to bound the [rows, V] fp32 buffer (rows are independent, so bits are
too). One Triton program per row then walks V in fixed BLOCK_V blocks in order: an exact max,
then per-lane sums of exp(z - max) block by block and one fixed-shape final reduction, so a
row's log-normaliser does not depend on the other rows. Backward (trainer): analytic,
chunked; logits recomputed by the invariant GEMM, gradient GEMMs in the weight's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rl.kernels.triton.matmul import matmul_nt

ROWS_PER_CHUNK = 4096
BLOCK_V = 2048


@triton.jit
def _log_softmax_kernel(logits_ptr, tok_ptr, out_ptr, lse_ptr, V, stride_l, stride_o, temperature,
                        BLOCK: tl.constexpr, WRITE_ALL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    cols = tl.arange(0, BLOCK)
    run_max = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for off in range(0, V, BLOCK):
        z = tl.load(base + off + cols, mask=off + cols < V, other=float("-inf")) / temperature
        run_max = tl.maximum(run_max, z)
    row_max = tl.max(run_max, 0)
    run_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(0, V, BLOCK):
        ok = off + cols < V
        z = tl.load(base + off + cols, mask=ok, other=0.0) / temperature
        run_sum += tl.where(ok, tl.exp(z - row_max), 0.0)
    lse = row_max + tl.log(tl.sum(run_sum, 0))
    tl.store(lse_ptr + row, lse)
    if WRITE_ALL:
        for off in range(0, V, BLOCK):
            ok = off + cols < V
            z = tl.load(base + off + cols, mask=ok, other=0.0) / temperature
            tl.store(out_ptr + row * stride_o + off + cols, z - lse, mask=ok)
    else:
        tok = tl.load(tok_ptr + row)
        z = tl.load(base + tok) / temperature
        tl.store(out_ptr + row, z - lse)


def _rows_log_softmax(hidden, weight, temperature, token_ids):
    """-> (out, lse): out is [rows, V] log-probs (token_ids None) or [rows] gathered ones."""
    rows = hidden.shape[0]
    vocab = weight.shape[0]
    write_all = token_ids is None
    out = torch.empty((rows, vocab) if write_all else (rows,), dtype=torch.float32, device=hidden.device)
    lse = torch.empty((rows,), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows, ROWS_PER_CHUNK):
        stop = min(rows, start + ROWS_PER_CHUNK)
        logits = matmul_nt(hidden[start:stop], weight, torch.float32)
        o = out[start:stop]
        tok = token_ids[start:stop] if token_ids is not None else lse
        _log_softmax_kernel[(stop - start,)](
            logits, tok, o, lse[start:stop], vocab, logits.stride(0), o.stride(0) if write_all else 1,
            float(temperature), BLOCK=BLOCK_V, WRITE_ALL=write_all, num_warps=8)
    return out, lse


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_ids, temperature):
        out, lse = _rows_log_softmax(hidden, weight, temperature, token_ids)
        ctx.save_for_backward(hidden, weight, token_ids if token_ids is not None else lse, lse)
        ctx.gather, ctx.temperature = token_ids is not None, temperature
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, tok, lse = ctx.saved_tensors
        t = ctx.temperature
        # logits recomputed by the forward's GEMM; the two gradient GEMMs run in the weight's
        # dtype on cuBLAS (bf16 operands, fp32 accumulate) like any bf16 trainer's lm_head
        dt = weight.dtype
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ROWS_PER_CHUNK):
            sl = slice(start, start + ROWS_PER_CHUNK)
            h = hidden[sl]
            p = torch.exp(matmul_nt(h, weight, torch.float32) / t - lse[sl, None])   # softmax at T
            g = grad[sl]
            if ctx.gather:
                dz = p.mul_(-g[:, None])
                dz[torch.arange(dz.shape[0], device=dz.device), tok[sl].long()] += g
            else:
                dz = g - p * g.sum(-1, keepdim=True)
            dlogits = (dz / t).to(dt)
            if dh is not None:
                dh[sl] = (dlogits @ weight).to(hidden.dtype)
            if dw is not None:
                dw += (dlogits.t() @ h.to(dt)).float()
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None


def log_softmax_logits(hidden: torch.Tensor, lm_head_weight: torch.Tensor, temperature: float = 1.0):
    """hidden [N, Hd], lm_head [V, Hd] -> log_softmax(logits / T) fp32 [N, V]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _LogSoftmax.apply(hidden, lm_head_weight, None, temperature)


def logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, token_ids: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """hidden [N, Hd], token_ids [N] -> fp32 [N]: log p(token | prefix) at temperature T."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros((0,), dtype=torch.float32)
    return _LogSoftmax.apply(hidden, lm_head_weight, token_ids.contiguous(), temperature)
