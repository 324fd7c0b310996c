"""The driver: builds the Ray actors of a run and runs the step loop (the composition root).

    sample prompts → rollout (n samples each, vLLM) → rewards (parallel) → advantages →
    train (PPO epochs/mini-batches, DeepSpeed) → alignment check → weight sync → next step

Also: held-out evaluation, checkpoints every N steps and on SIGTERM/Ctrl-C, `--resume`,
rollout-actor recovery, a trainer failure that names the rank, metrics/report/wandb.
Entry points: `lockstep train` / `python -m rl.train` (rl/train.py).
"""
from __future__ import annotations

import json
import logging
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from alignment.check import AlignmentCheck, DriftAbort
from rl.batching import build_train_batch
from rl.logger import RunLogger
from rl.placement import plan_placement, start_ray
from rl.report import write_report
from rl.tasks import TaskSource

log = logging.getLogger("lockstep")


class TrainerFailure(RuntimeError):
    """A trainer rank died or raised; the message names the rank."""


class Run:
    def __init__(self, cfg, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        self.logger = RunLogger(self.run_dir, cfg, resume)
        self.stop_requested = False
        self.step = 0
        self.version = 0
        self.times: dict[str, float] = {}
        self.step_hooks: list = []      # called as hook(run, metrics) after each step (tests, tools)

    # -- setup -------------------------------------------------------------------------------
    def build(self):
        cfg = self.cfg
        from rewards.batch import RewardFn
        from rl.model.checkpoint import load_model  # noqa: F401  (fail early on a bad model path)
        self.tasks = TaskSource(cfg.data, cfg.seed)
        self.reward_fn = RewardFn.from_config(cfg.rewards)
        model_path = cfg.model.path
        latest = self.latest_checkpoint() if self.resume else None
        if latest is not None:
            model_path = str(latest / "actor")
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.eos_id = self.tokenizer.eos_token_id
        plan = plan_placement(cfg)
        start_ray(cfg)
        from rl.rollouts import RolloutPool
        from trainer.group import TrainerGroup
        self.logger.phase(f"starting {plan['summary']}")
        opts = plan["trainer_actor_options"]
        self.actor = TrainerGroup("actor", model_path, cfg.trainer, cfg.algo, cfg.placement.trainer_world_size,
                                  num_cpus_per_worker=opts["num_cpus"], num_gpus_per_worker=opts["num_gpus"])
        self.ref = None
        if cfg.algo.kl.use_kl_loss or cfg.algo.kl.kl_reward_coef:
            self.ref = TrainerGroup("reference", cfg.model.path, cfg.trainer, cfg.algo, 1,
                                    num_cpus_per_worker=opts["num_cpus"], num_gpus_per_worker=opts["num_gpus"])
        self.critic = None
        if cfg.algo.needs_critic:
            critic_path = str(latest / "critic") if latest is not None else cfg.model.path
            self.critic = TrainerGroup("critic", critic_path, cfg.trainer, cfg.algo, cfg.placement.trainer_world_size,
                                       num_cpus_per_worker=opts["num_cpus"], num_gpus_per_worker=opts["num_gpus"])
        self.rollout = RolloutPool(cfg.rollout, model_path, cfg.model.kernels, cfg.seed, plan["rollout_actor_options"])
        self.check_builds()
        self.check = AlignmentCheck(cfg.alignment.on_drift, cfg.alignment.threshold)
        if latest is not None:
            self.restore(latest)

    def check_builds(self) -> None:
        """The trainer ranks and every rollout engine must run the same model/kernel source,
        torch and triton (rl.model.fingerprint); a difference stops the run before step 1."""
        from rl.model.fingerprint import check_same_build
        trainer = self.actor.run("fingerprint")
        others = {f"trainer rank {r}": fp for r, fp in enumerate(trainer[1:], 1)}
        others.update({f"rollout worker {i}": fp for i, fp in enumerate(self.rollout.fingerprints())})
        for warning in check_same_build("trainer rank 0", trainer[0], others):
            log.warning("hardware differs (the drift check will tell whether the bits do): %s", warning)

    # -- checkpoints ---------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        root = self.run_dir / "checkpoints"
        done = sorted((p for p in root.glob("step_*") if (p / "state.json").exists()),
                      key=lambda p: int(p.name.split("_")[1])) if root.exists() else []
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        path = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        self.actor.save(str(path / "actor"), self.tokenizer)
        if self.critic is not None:
            self.critic.save(str(path / "critic"))
        (path / "state.json").write_text(json.dumps({"step": self.step, "weight_version": self.version,
                                                     "corrected": self.check.corrected}))
        self.logger.phase(f"checkpoint {path}")
        return path

    def restore(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        self.actor.load(str(path / "actor"))
        if self.critic is not None:
            self.critic.load(str(path / "critic"))
        self.step, self.version = state["step"], state["weight_version"]
        self.check.corrected = state.get("corrected", False)
        self.rollout.update_weights(self.version, self.actor.get_weights())
        self.logger.phase(f"resumed from {path} at step {self.step}, weight version {self.version}")

    # -- one step ------------------------------------------------------------------------------
    @contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        yield
        self.times[f"time/{phase}"] = self.times.get(f"time/{phase}", 0.0) + time.perf_counter() - t0

    def train_step(self) -> dict:
        cfg, n = self.cfg, self.cfg.rollout.n_samples
        self.times = {}
        t0 = time.perf_counter()
        with self.timed("rollout"):
            problems = self.tasks.prompts_for_step(self.step, cfg.rollout.prompts_per_step)
            prompt_ids = [self.encode(p["prompt"]) for p in problems]
            samples = self.rollout.generate(prompt_ids, n, self.sampling(cfg.seed * 1_000_003 + self.step))
        # samples are prompt-major: sample i belongs to prompt i // n (its GRPO group)
        failed = [s for s in samples if s.error is not None]
        kept = [(i // n, s) for i, s in enumerate(samples) if s.error is None]
        if not kept:
            raise RuntimeError(f"step {self.step}: every rollout sample failed: {failed[0].error}")
        samples = [s for _, s in kept]
        with self.timed("reward"):
            items = [self.reward_item(problems[g], s) for g, s in kept]
            rewards, reward_metrics = self.reward_fn.score_batch(items)
        with self.timed("advantage"):
            group_ids = [g for g, _ in kept]
            batch, batch_metrics = build_train_batch(
                samples, rewards, group_ids, cfg.algo, cfg.rollout.temperature,
                ref_logprobs_fn=self.ref.forward_logprobs if self.ref is not None else None,
                values_fn=self.critic.forward_values if self.critic is not None else None)
        metrics = {**reward_metrics, **batch_metrics, "batch/failed_samples": float(len(failed))}
        lengths = [len(s.response_ids) for s in samples]
        metrics.update({"reward/mean": sum(rewards) / len(rewards),
                        "response/mean_length": sum(lengths) / len(lengths),
                        "response/max_length": float(max(lengths)),
                        "rollout/weight_version": self.version})
        if batch is None:
            metrics["batch/skipped"] = 1.0
        else:
            with self.timed("train"):
                train_metrics = self.call_trainer(self.actor, "train_step", batch)
            with self.timed("alignment"):
                align, action = self.check(batch["old_logprobs"], train_metrics.pop("pre_update_logprobs"),
                                           batch["response_mask"].bool(), train_metrics.pop("pre_update_rows", None))
            if action == "correct":
                self.switch_to_correction()
            metrics.update(align)
            metrics.update({k: float(v) for k, v in train_metrics.items() if _scalar(v)})
            if self.critic is not None:
                critic_metrics = self.call_trainer(self.critic, "train_step", batch)
                metrics.update({f"critic/{k}": float(v) for k, v in critic_metrics.items() if _scalar(v)})
            with self.timed("sync"):
                self.version += 1
                self.rollout.update_weights(self.version, self.actor.get_weights())
        self.times["time/step"] = time.perf_counter() - t0
        metrics.update(self.times)
        rollout_s = self.times["time/rollout"]
        metrics["perf/rollout_tokens_per_s"] = sum(lengths) / rollout_s if rollout_s > 0 else 0.0
        return metrics

    def switch_to_correction(self) -> None:
        algo = self.cfg.algo.model_copy(update={"old_logprobs": "recompute"})
        algo.is_correction.type = self.cfg.alignment.correction
        self.actor.run("set_algo", algo.model_dump())
        self.actor.algo = algo

    def call_trainer(self, group, method: str, batch: dict) -> dict:
        try:
            return getattr(group, method)(batch)
        except Exception as err:
            rank = failed_rank(group)
            where = f"trainer rank {rank} ({group.role})" if rank is not None else f"trainer ({group.role})"
            raise TrainerFailure(f"{where} failed in {method}: {type(err).__name__}: {err}") from err

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Held-out accuracy: greedy, and sampled at the rollout temperature (the policy RL
        optimises; `data.eval_samples` per problem, fixed seed so evaluations compare)."""
        problems = self.tasks.eval
        if not problems:
            return {}
        prompts = [self.encode(p["prompt"]) for p in problems]
        out = {"eval/problems": len(problems)}
        k = self.cfg.data.eval_samples
        for name, n, sampling in (("greedy_accuracy", 1, {**self.sampling(0), "temperature": 0.0}),
                                  ("accuracy", k, self.sampling(self.cfg.seed + 7))):
            samples = self.rollout.generate(prompts, n, sampling)
            items = [self.reward_item(problems[i // n], s) for i, s in enumerate(samples)]
            scores, _ = self.reward_fn.score_batch(items)
            out[f"eval/{name}"] = sum(1.0 for s in scores if s >= 1.0) / len(scores)
        return out

    # -- helpers -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def sampling(self, seed: int) -> dict:
        r = self.cfg.rollout
        return {"temperature": r.temperature, "max_new_tokens": r.max_new_tokens,
                "stop_token_ids": [self.eos_id], "seed": seed}

    def reward_item(self, problem: dict, sample) -> dict:
        ids = [t for t in sample.response_ids if t != self.eos_id]
        return {"data_source": problem["data_source"], "solution_str": self.tokenizer.decode(ids),
                "ground_truth": problem["ground_truth"], "extra_info": problem.get("extra_info") or {}}

    # -- the run -------------------------------------------------------------------------------
    def __call__(self) -> dict:
        cfg = self.cfg
        self.build()
        self.install_signal_handlers()      # after ray.init: Ray's core replaces SIGTERM handlers
        summary: dict = {}
        try:
            if self.step == 0:
                with self.timed("eval"):
                    first = self.evaluate()
                if first:
                    self.logger.log(0, first)
                    summary["eval/accuracy_start"] = first["eval/accuracy"]
                    summary["eval/greedy_accuracy_start"] = first["eval/greedy_accuracy"]
                    self.logger.phase(f"held-out accuracy at start: {first['eval/accuracy']:.3f} "
                                      f"(greedy {first['eval/greedy_accuracy']:.3f})")
            while self.step < cfg.run.steps and not self.stop_requested:
                metrics = self.train_step()
                self.step += 1
                if cfg.data.eval_every and self.step % cfg.data.eval_every == 0 and self.step < cfg.run.steps:
                    metrics.update(self.evaluate())
                self.logger.log(self.step, metrics)
                self.logger.progress(self.step - 1, cfg.run.steps, metrics)
                for hook in self.step_hooks:
                    hook(self, metrics)
                if self.step % cfg.logging.report_every == 0:
                    write_report(self.logger.rows, self.run_dir / "report.png", cfg.name)
                if cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0:
                    self.save_checkpoint()
            if self.stop_requested:
                self.logger.phase("stop requested: checkpointing")
                self.save_checkpoint()
            else:
                final = self.evaluate()
                if final:
                    self.logger.log(self.step, final)
                    summary["eval/accuracy_end"] = final["eval/accuracy"]
                    summary["eval/greedy_accuracy_end"] = final["eval/greedy_accuracy"]
                if not (cfg.run.checkpoint_every and self.step % cfg.run.checkpoint_every == 0):
                    self.save_checkpoint()
        except DriftAbort as err:
            self.save_checkpoint()
            self.logger.console.print(f"[red]aborted: {err}[/]")
            raise
        except TrainerFailure as err:
            self.emergency_save()
            self.logger.console.print(f"[red]run stopped: {err}[/]")
            raise
        finally:
            write_report(self.logger.rows, self.run_dir / "report.png", cfg.name)
            self.logger.summary({**summary, "rollout restarts": self.rollout.restarts if hasattr(self, "rollout") else 0})
            self.logger.close()
            self.shutdown()
        return {**summary, "steps": self.step, "run_dir": str(self.run_dir)}

    def emergency_save(self) -> None:
        """After a trainer failure: keep the last synced weights (model only) beside the
        last full checkpoint, so nothing trained is lost."""
        try:
            import ray
            weights = ray.get(self.rollout.weights_ref) if self.rollout.weights_ref is not None else None
            if weights:
                from safetensors.torch import save_file
                path = self.run_dir / "checkpoints" / f"emergency_step_{self.step:06d}"
                path.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"),
                          metadata={"format": "pt"})
                self.logger.phase(f"last synced weights saved to {path} (resume uses the last full checkpoint)")
        except Exception as err:
            log.warning("emergency save failed: %s", err)

    def install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.logger.console.print(f"[yellow]{signal.Signals(signum).name}: finishing this step, then checkpointing[/]")
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def shutdown(self) -> None:
        for name in ("rollout", "actor", "ref", "critic"):
            part = getattr(self, name, None)
            if part is not None:
                try:
                    part.shutdown()
                except Exception:
                    pass
        if getattr(self, "reward_fn", None) is not None:
            self.reward_fn.close()


def failed_rank(group) -> int | None:
    """The first rank whose actor is dead or unresponsive, if any."""
    import ray
    for rank, worker in enumerate(group.workers):
        try:
            ray.get(worker.ready.remote(), timeout=10)
        except Exception:
            return rank
    return None


def load_tokenizer(model_path: str):
    path = Path(model_path)
    if path.is_dir() and (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    from rl.model.config import load_model_config
    from rl.model.tokenizer import build_char_tokenizer
    return build_char_tokenizer(load_model_config(path).vocab_size)


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)


def run(cfg, resume: bool = False) -> dict:
    return Run(cfg, resume)()
