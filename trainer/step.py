"""The micro-batch loop of one mini-batch: forward, loss, backward (no optimizer step).

Kept apart from the worker so the gradient tests run exactly this code on a plain module
(`PlainEngine`) against a float64 reference.
"""
from __future__ import annotations

from typing import Callable

import torch

from trainer.batch import dummy_rows, num_rows, row_chunks, take_rows, to_device
from trainer.objectives import MetricAccumulator, Objective


class PlainEngine:
    """The two engine calls `accumulate` makes, on an ordinary nn.Module (tests, tools)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()


def accumulate(engine, objective: Objective, mini: dict, num_tokens: float, num_seqs: float,
               micro_batch_size: int, metrics: MetricAccumulator, pre: torch.Tensor | None = None,
               world_size: int = 1, max_over_ranks: Callable[[int], int] = lambda n: n,
               rank: int = 0, device="cpu") -> str | None:
    """Forward/backward every micro-batch of `mini`, accumulating gradients in `engine`.

    `num_tokens`/`num_seqs` are the mini-batch's global (all-rank) denominators. Every rank runs
    `max_over_ranks(own count)` micro-batches (padding with a 2-token dummy row), because
    ZeRO-2/3 backward and ZeRO-3 forward are collectives. `pre` [b, T], if given, receives the
    outputs of these forwards (the pre-update logprobs when no step has happened yet). Micro-batches
    move to `device` (the engine's) one at a time; `mini` and `pre` stay where they are.

    A micro-batch without response tokens backpropagates an exact zero and is counted as
    skipped. A loss that raises `ValueError` (non-finite logprobs, ...) becomes a NaN loss on
    the same graph: every rank still runs the same collectives, and DeepSpeed skips the step on
    the non-finite gradient norm. Returns that error message, if any.
    """
    chunks = row_chunks(num_rows(mini), micro_batch_size)
    count = max_over_ranks(len(chunks))
    temperature = float(mini.get("temperature", 1.0))
    failure = None
    for i in range(count):
        real = i < len(chunks)
        mb = to_device(take_rows(mini, chunks[i]) if real else {**dummy_rows(), "temperature": temperature},
                       device)
        out, entropy = objective.forward(engine, mb)
        if pre is not None and real:
            pre[chunks[i]] = out.detach()
        tokens = float(mb["response_mask"].sum())
        if tokens == 0:
            loss = out.sum() * 0.0
            if real:
                metrics.add({"skipped": torch.ones(())}, 0.0)
        else:
            try:
                result = objective.loss(out, entropy, mb, num_tokens, num_seqs)
                loss = result.loss
                metrics.add(result.metrics, tokens)
            except ValueError as err:
                failure = failure or f"rank {rank}: {err}"
                loss = out.sum() * float("nan")
        # DeepSpeed averages gradients over ranks; the losses are already global shares.
        engine.backward(loss * world_size, scale_wrt_gas=False)
    return failure
