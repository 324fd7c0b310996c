"""Prompt sources for an RL run: which problems each step trains on, and the held-out set.

Deterministic by (seed, step): a resumed run draws exactly the prompts the uninterrupted run
would have drawn. Text is tokenised with the checkpoint's tokenizer (the project's char
tokenizer for the synthetic tasks).
"""
from __future__ import annotations

import random
from pathlib import Path

from rl import data


class TaskSource:
    def __init__(self, cfg, seed: int):
        self.cfg, self.seed = cfg, seed
        if cfg.task == "arith":
            # a pool of training problems; steps draw from it by (seed, step)
            self.train = list(data.arithmetic_tasks(20000, seed, digits=cfg.digits, ops=cfg.ops, split="train"))
            self.eval = list(data.arithmetic_tasks(cfg.eval_size, seed, digits=cfg.digits, ops=cfg.ops, split="test"))
        elif cfg.task == "code":
            self.train = list(data.code_tasks(5000, seed, split="train"))
            self.eval = list(data.code_tasks(cfg.eval_size, seed, split="test"))
        else:
            loader = data.load_gsm8k if cfg.task == "gsm8k" else data.load_prompts
            rows = loader(Path(cfg.path))
            if not rows:
                raise ValueError(f"data.path {cfg.path}: no usable rows ({len(rows.skipped)} skipped)")
            self.skipped = rows.skipped
            rng = random.Random(seed)
            order = list(range(len(rows)))
            rng.shuffle(order)
            held = min(cfg.eval_size, len(rows) // 10)
            self.eval = [rows[i] for i in order[:held]]
            self.train = [rows[i] for i in order[held:]]

    def prompts_for_step(self, step: int, count: int) -> list[dict]:
        rng = random.Random(f"{self.seed}:step:{step}")
        return [self.train[rng.randrange(len(self.train))] for _ in range(count)]
