"""Supervised warm start (SFT) on prompt/response pairs, through the trainer worker.

Role: `lockstep sft --config configs/sft_*.yaml` (trainer/sft_cli.py) runs `run_sft`. The
model is trained with the same `TrainerWorker` the RL loop uses (role `actor`, `sft_step`:
NLL of the response tokens only), in-process for world_size 1, as a Ray `TrainerGroup`
otherwise. It writes `runs/<name>/metrics.jsonl` (one JSON object per logged step or eval) and
an HF checkpoint directory `runs/<name>/checkpoint` (with the tokenizer).

Data: the synthetic arithmetic task of `rl.data.arithmetic_tasks` ("12+7=" -> "19"), train and
held-out test splits, tokenised with the project's char tokenizer: a row is
`[bos]? prompt response <eos>`, the loss covers `response <eos>`. Evaluation: NLL on the test
split and exact match of greedy decoding (argmax, up to `max_new_tokens`, stop at <eos>).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from rl.kernels import BatchMeta
from rl.model.checkpoint import load_model
from rl.model.tokenizer import build_char_tokenizer
from trainer.config import TrainerConfig


class ArithmeticData(BaseModel):
    """`rl.data.arithmetic_tasks` arguments."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["arithmetic"] = "arithmetic"
    digits: int = Field(1, ge=1, description="operands < 10**digits")
    ops: str = Field("+-", description="subset of '+-*'")
    num_train: int = Field(20000, ge=1, description="training problems drawn (train split; may repeat)")
    num_eval: int = Field(200, ge=1, description="held-out problems (test split, distinct)")
    seed: int = 0


class SFTConfig(BaseModel):
    """A `configs/sft_*.yaml` file."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="run name: outputs go to <out_dir>/<name>/")
    model: str = Field(..., description="model config JSON (random init) or HF checkpoint dir")
    out_dir: str = "runs"
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="rows per optimizer step (global, all ranks)")
    world_size: int = Field(1, ge=1, description="1: in-process worker; >1: a Ray TrainerGroup")
    eval_every: int = Field(50, ge=1, description="evaluate every this many steps (and at 0 and the end)")
    log_every: int = Field(10, ge=1)
    max_new_tokens: int = Field(6, ge=1, description="greedy decoding budget in evaluation")
    add_bos: bool = Field(False, description="prefix rows with <bos> (keep it equal to the RL prompts)")
    data: ArithmeticData = Field(default_factory=ArithmeticData)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)


def encode(tokenizer, prompt: str, response: str | None, add_bos: bool) -> tuple[list[int], int]:
    """Token ids of `[bos]? prompt response <eos>` (response None: the prompt alone) and the
    prompt length."""
    ids = ([tokenizer.bos_token_id] if add_bos else []) + tokenizer.encode(prompt, add_special_tokens=False)
    prompt_len = len(ids)
    if response is not None:
        ids = ids + tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids, prompt_len


def collate(rows: list[tuple[list[int], int]], pad_id: int) -> dict:
    """[(ids, prompt_len)] -> trainer batch (input_ids, lengths, response_mask on response tokens)."""
    seqlen = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), seqlen), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), seqlen))
    for b, (ids, prompt_len) in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, prompt_len: len(ids)] = 1.0
    return {"input_ids": input_ids, "lengths": torch.tensor([len(ids) for ids, _ in rows]),
            "response_mask": mask, "temperature": 1.0}


@torch.no_grad()
def greedy_decode(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Argmax continuation of each prompt (evaluation only: recomputes the full forward each
    step instead of caching; the rollout path is rollout/)."""
    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(seqs[i]) for i in active], batch_first=True)
        lengths = torch.tensor([len(seqs[i]) for i in active])
        valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        hidden = model.forward_tokens(ids[valid], BatchMeta.from_lengths(lengths))
        last = torch.cumsum(lengths, 0) - 1
        next_ids = model.log_softmax(hidden[last]).argmax(-1).tolist()
        still = []
        for i, tok in zip(active, next_ids):
            if tok == eos_id:
                continue
            seqs[i].append(tok)
            out[i].append(tok)
            still.append(i)
        active = still
    return out


class Evaluator:
    """Held-out NLL (via the trainer's forward) and greedy exact match (on a local model copy
    loaded with the trainer's `get_weights()`)."""

    def __init__(self, cfg: SFTConfig, tokenizer, problems: list[dict]):
        self.cfg, self.tok, self.problems = cfg, tokenizer, problems
        self.batch = collate([encode(tokenizer, p["prompt"], p["answer"], cfg.add_bos) for p in problems],
                             tokenizer.pad_token_id)
        self.prompts = [encode(tokenizer, p["prompt"], None, cfg.add_bos)[0] for p in problems]
        self.model = load_model(cfg.model, dtype=torch.bfloat16 if cfg.trainer.bf16 else torch.float32)

    def __call__(self, trainer) -> dict:
        logprobs = trainer.forward_logprobs(self.batch)
        mask = self.batch["response_mask"].bool()
        nll = float(-logprobs[mask].double().sum() / mask.sum())
        self.model.load_state_dict(trainer.get_weights())
        outs = greedy_decode(self.model, self.prompts, self.cfg.max_new_tokens, self.tok.eos_token_id)
        texts = [self.tok.decode(o) for o in outs]
        exact = sum(t == p["answer"] for t, p in zip(texts, self.problems)) / len(self.problems)
        return {"eval_loss": nll, "exact_match": exact,
                "samples": [f"{p['prompt']}{t}" for p, t in zip(self.problems[:3], texts[:3])]}


def build_trainer(cfg: SFTConfig):
    if cfg.world_size == 1:
        from trainer.group import free_port
        from trainer.worker import TrainerWorker
        return TrainerWorker("actor", cfg.model, cfg.trainer, None, 0, 1, "127.0.0.1", free_port())
    from trainer.group import TrainerGroup
    return TrainerGroup("actor", cfg.model, cfg.trainer, None, world_size=cfg.world_size)


def run_sft(cfg: SFTConfig, log=print) -> dict:
    """Train, evaluate, checkpoint. Returns the summary written to `summary.json`."""
    from rl.data import arithmetic_tasks
    from rl.model.config import load_model_config

    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(load_model_config(cfg.model).vocab_size)
    data = cfg.data
    train = list(arithmetic_tasks(data.num_train, data.seed, digits=data.digits, ops=data.ops, split="train"))
    test = list(arithmetic_tasks(data.num_eval, data.seed, digits=data.digits, ops=data.ops, split="test"))
    rows = [encode(tokenizer, p["prompt"], p["answer"], cfg.add_bos) for p in train]
    evaluate = Evaluator(cfg, tokenizer, test)
    trainer = build_trainer(cfg)
    order = random.Random(data.seed)
    metrics_path = run_dir / "metrics.jsonl"
    start = time.time()
    history = []

    with open(metrics_path, "w") as out:
        def record(entry: dict) -> None:
            entry = {"time_s": round(time.time() - start, 3), **entry}
            history.append(entry)
            out.write(json.dumps(entry) + "\n")
            out.flush()
            log(json.dumps({k: v for k, v in entry.items() if k != "samples"}))

        record({"step": 0, **evaluate(trainer)})
        cursor, perm = 0, []
        for step in range(1, cfg.steps + 1):
            picks = []
            while len(picks) < cfg.batch_size:
                if cursor == len(perm):
                    perm, cursor = list(range(len(rows))), 0
                    order.shuffle(perm)
                picks.append(rows[perm[cursor]])
                cursor += 1
            result = trainer.sft_step(collate(picks, tokenizer.pad_token_id))
            if step % cfg.log_every == 0 or step == cfg.steps:
                record({"step": step, "loss": result["loss"], "grad_norm": result["grad_norm"],
                        "lr": result["lr"], "skipped_steps": result["skipped_steps"]})
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record({"step": step, **evaluate(trainer)})
        checkpoint = trainer.save(str(run_dir / "checkpoint"), tokenizer)

    evals = [h for h in history if "exact_match" in h]
    summary = {"name": cfg.name, "steps": cfg.steps, "wall_s": round(time.time() - start, 1),
               "eval_loss_before": evals[0]["eval_loss"], "eval_loss_after": evals[-1]["eval_loss"],
               "exact_match_before": evals[0]["exact_match"], "exact_match_after": evals[-1]["exact_match"],
               "checkpoint": checkpoint, "metrics": str(metrics_path)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if hasattr(trainer, "shutdown"):
        trainer.shutdown()
    return summary
