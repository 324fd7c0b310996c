"""RolloutWorker: a vLLM engine serving our model with rl.kernels, usable in-process or as a
Ray actor (`ray.remote(RolloutWorker)`).

    worker = RolloutWorker("configs/model/tiny.json", seed=0, temperature=1.0,
                           engine={"max_num_batched_tokens": 256})
    batch = worker.generate([[5, 6, 7]], {"max_new_tokens": 32, "seed": 1}, n=4)
    worker.update_weights(1, trainer_state_dict)     # HF names, bf16; in place, no restart
    worker.health()

Every batch carries the weight version that produced all of its tokens. Updates and
generations exclude each other (one lock; a Ray actor also serialises calls), so a
generation requested during an update waits for it and never mixes versions; vLLM's own
per-token version spans are checked as well. Prompts vLLM cannot take get a per-sample
error; the rest of the batch completes. If the engine process dies, `health()` says so with
the cause taken from the engine's log, `generate` raises `EngineDead`, and `restart()` (or
the actor's owner making a new actor) brings a fresh engine up from the checkpoint, at the
checkpoint's version: the owner re-syncs weights after it.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch

from rollout.batch import RolloutBatch, RolloutSample
from rollout.engine_log import EngineLog
from rollout.sampling import SEED_KEY, derive_seed
from rollout.vllm_model import KERNELS_ATTR, TEMPERATURE_ATTR
from rollout.weight_transfer import RPC_TIMEOUT_S, push_weights

# vLLM settings the logprob contract depends on; callers may not override them
FIXED_ENGINE_ARGS = {
    "skip_tokenizer_init": True,            # prompts are token ids; stop on stop_token_ids
    "dtype": "bfloat16",                    # the trainer's weight dtype
    "logprobs_mode": "raw_logits",          # return compute_logits output verbatim: our logprobs
    "generation_config": "vllm",            # no sampling defaults from the checkpoint
    "enforce_eager": True,                  # no torch.compile / graph capture around our kernels
    "worker_extension_cls": "rollout.worker_extension.LockstepWorkerExtension",
    "weight_transfer_config": {"backend": "lockstep_shm"},
    "logits_processors": ["rollout.vllm_sampler:SeededSampler"],   # per-request seeded sampling
}
# vLLM features the plugin does not support (our model is unsharded, unquantised, bf16 KV)
UNSUPPORTED_ENGINE_ARGS = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "quantization": None,
                           "kv_cache_dtype": "auto", "speculative_config": None, "enable_lora": False}
# our names for common engine settings -> vLLM's
ENGINE_ALIASES = {"kv_cache_bytes": "kv_cache_memory_bytes", "num_kv_blocks": "num_gpu_blocks_override"}
ENGINE_DEFAULTS = {
    "kv_cache_memory_bytes": 1 << 30,
    "gpu_memory_utilization": 0.5,
    "enable_prefix_caching": True,
    "max_num_seqs": 256,
    "disable_log_stats": False,             # keeps counters (preemptions, prefix hits) readable
}
HEALTH_TIMEOUT_S = 20.0
SAMPLING_KEYS = {"temperature", "max_new_tokens", "seed", "prompt_seeds", "stop_token_ids", "top_p", "top_k",
                 "min_tokens"}


class EngineDead(RuntimeError):
    """The vLLM engine process is gone; the message names the cause from its log."""


def resolve_model(model: str | os.PathLike, seed: int) -> tuple[Path, Path | None]:
    """A checkpoint directory is used as is; a config JSON gets random weights (torch seed
    `seed`, the same init as rl.model.checkpoint.load_model) written to a temp checkpoint.
    Returns (checkpoint dir, temp dir to delete or None)."""
    path = Path(model)
    if path.is_dir():
        return path, None
    from rl.model.checkpoint import load_model, save_model
    torch.manual_seed(seed)
    temp = Path(tempfile.mkdtemp(prefix="lockstep-rollout-"))
    save_model(load_model(path), temp / "checkpoint")
    return temp / "checkpoint", temp


class RolloutWorker:
    def __init__(self, model: str | os.PathLike, kernels: str = "lockstep", temperature: float = 1.0,
                 engine: dict | None = None, seed: int = 0, weight_version: int = 0):
        from rl import kernels as K
        if kernels not in K.MODES:
            raise ValueError(f"RolloutWorker: kernels={kernels!r}; allowed: {', '.join(K.MODES)}")
        self.kernels = kernels
        self.temperature = self._check_temperature(temperature)
        self.seed, self._calls = int(seed), 0     # seeds calls that give no `seed`
        self.engine_args = self._engine_args(engine or {}, seed)
        self.checkpoint, self._temp_dir = resolve_model(model, seed)
        from rl.model.config import load_model_config
        self.config = load_model_config(self.checkpoint)
        self._initial_version = int(weight_version)
        self._lock = threading.RLock()
        self._llm = None
        self._start_engine()

    # -- engine lifecycle --------------------------------------------------------------------
    @staticmethod
    def _engine_args(engine: dict, seed: int) -> dict:
        args = dict(ENGINE_DEFAULTS, seed=seed)
        for key, value in engine.items():
            key = ENGINE_ALIASES.get(key, key)
            if key in FIXED_ENGINE_ARGS or key in ("hf_overrides", "model"):
                raise ValueError(f"RolloutWorker engine option {key!r} is fixed by lockstep "
                                 f"(the logprob contract depends on it)")
            if key in UNSUPPORTED_ENGINE_ARGS and value != UNSUPPORTED_ENGINE_ARGS[key]:
                raise ValueError(f"RolloutWorker engine option {key}={value!r} is not supported by the "
                                 f"lockstep plugin (allowed: {UNSUPPORTED_ENGINE_ARGS[key]!r})")
            args[key] = value
        if args.get("enable_prefix_caching") and args.get("enable_chunked_prefill") is False:
            raise ValueError("RolloutWorker: enable_prefix_caching needs chunked prefill for this "
                             "hybrid model (vLLM's 'align' state cache); drop enable_chunked_prefill=False")
        return args

    def _start_engine(self) -> None:
        from vllm import LLM
        self._log = EngineLog()
        self._dead_cause: str | None = None
        self._weights_consistent = True
        self._weight_shapes: dict[str, list[int]] | None = None
        self._version = self._initial_version
        self._engine_temperature = self.temperature or 1.0
        overrides = {KERNELS_ATTR: self.kernels, TEMPERATURE_ATTR: self._engine_temperature}
        kwargs = dict(self.engine_args, **FIXED_ENGINE_ARGS, model=str(self.checkpoint), hf_overrides=overrides)
        kwargs.setdefault("max_model_len", self.config.max_position_embeddings)
        self.max_model_len = int(kwargs["max_model_len"])
        started = time.perf_counter()
        with self._log.capture():
            self._llm = LLM(**kwargs)
        self.startup_s = time.perf_counter() - started
        try:
            self.build = self._check_engine_build()
        except BaseException:
            self._shutdown_engine()
            raise
        self._llm.llm_engine.set_weight_version(str(self._version))

    def _check_engine_build(self) -> dict:
        """The engine's build fingerprint, after checking it is this process's (the trainer-side
        recompute here must compute the engine's bits). Raises BuildMismatch."""
        from rl.model.fingerprint import BuildMismatch, check_same_build, fingerprint
        engine = self._rpc("lockstep_build")[0]
        try:
            check_same_build("this RolloutWorker process", fingerprint(), {"its vLLM engine process": engine})
        except BuildMismatch as err:
            raise BuildMismatch(f"{err}. The engine process imported another copy of lockstep or torch "
                                f"(PYTHONPATH, an editable install elsewhere) or the source changed while "
                                f"it started") from None
        return engine

    def fingerprint(self) -> dict:
        """Build fingerprint of the engine (rl.model.fingerprint): what rl.run compares with the trainer's."""
        return self.build

    def restart(self) -> dict:
        """Tear down the engine (dead or alive) and start a fresh one from the checkpoint.
        Weights and version return to the checkpoint's; re-sync with update_weights."""
        with self._lock:
            self._shutdown_engine()
            self._start_engine()
            return self.health()

    def _shutdown_engine(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:   # already dead: nothing to stop
            pass

    def shutdown(self) -> None:
        with self._lock:
            self._shutdown_engine()
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
                self._temp_dir = None

    # -- weights -----------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    def get_weight_version(self) -> int:
        """Same as the property, callable on a Ray actor."""
        return self._version

    def update_weights(self, version: int, weights: dict[str, torch.Tensor]) -> int:
        """Load trainer weights (HF names, bf16, the complete set) into the running engine as
        `version`. Waits for a generation in progress; the next generation runs entirely at
        `version`. A set with a missing, unknown or mis-shaped tensor is refused before the
        engine is touched."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"update_weights: version must be an int, got {version!r}")
        with self._lock:
            self._check_alive()
            self._check_weight_set(weights)
            self._weights_consistent = False
            self._watched(lambda: push_weights(self._llm, version, weights), RPC_TIMEOUT_S)
            self._version = version
            self._weights_consistent = True
            return version

    def _check_weight_set(self, weights: dict[str, torch.Tensor]) -> None:
        if self._weight_shapes is None:
            self._weight_shapes = self._rpc("lockstep_weight_shapes")[0]
        expected = self._weight_shapes
        for kind, names in (("missing", sorted(set(expected) - set(weights))),
                            ("unexpected", sorted(set(weights) - set(expected)))):
            if names:
                raise ValueError(f"update_weights: {kind} tensor {names[0]!r}"
                                 + (f" (and {len(names) - 1} more)" if len(names) > 1 else ""))
        for name, shape in expected.items():
            if list(weights[name].shape) != shape:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(weights[name].shape)}, "
                                 f"the model expects {tuple(shape)}")

    # -- generation --------------------------------------------------------------------------
    @staticmethod
    def _check_temperature(t) -> float:
        if not isinstance(t, (int, float)) or t < 0 or t != t:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
        return float(t)

    def _sampling_params(self, sampling: dict):
        from vllm import SamplingParams
        unknown = sorted(set(sampling) - SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"generate: unknown sampling key(s) {unknown}; allowed: {sorted(SAMPLING_KEYS)}")
        temperature = self._check_temperature(sampling.get("temperature", self.temperature))
        max_new = sampling.get("max_new_tokens", 256)
        if not isinstance(max_new, int) or max_new < 1:
            raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new!r}")
        # Our compute_logits returns log_softmax(logits / T); vLLM samples it at 1.0, which is
        # exactly softmax(logits / T). Greedy (T = 0) reports logprobs at T = 1.
        base = dict(temperature=1.0 if temperature > 0 else 0.0, max_tokens=max_new, logprobs=0,
                    detokenize=False, stop_token_ids=list(sampling.get("stop_token_ids") or []),
                    top_p=float(sampling.get("top_p", 1.0)), top_k=int(sampling.get("top_k", 0)),
                    min_tokens=int(sampling.get("min_tokens", 0)))
        return temperature, SamplingParams(**base)

    def _prompt_error(self, prompt) -> str | None:
        if len(prompt) == 0:
            return "empty prompt"
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            return f"token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})"
        if len(prompt) >= self.max_model_len:
            return (f"prompt of {len(prompt)} tokens exceeds the context limit: max_model_len is "
                    f"{self.max_model_len}, leaving no room for a response")
        return None

    def generate(self, prompts: list[list[int]], sampling: dict | None = None, n: int = 1) -> RolloutBatch:
        """n samples per prompt, ordered by (prompt_index, sample_index).

        `sampling`: temperature (default: the worker's; 0 = greedy, logprobs then at T = 1),
        max_new_tokens (256), stop_token_ids (pass the EOS id here: there is no tokenizer),
        top_p, top_k, min_tokens, seed, prompt_seeds. Sample j of prompt i is drawn with
        rollout.sampling (Gumbel-max keyed by a per-request seed and the token position) from
        seed `derive_seed(prompt_seeds[i], j)`, where `prompt_seeds` (one int per prompt) is given
        or `derive_seed(seed, i)` (= `request_seed(seed, i, j)` in all); `seed` defaults to
        (worker seed, call count).
        So the tokens depend only on the seed, the prompt's index and the logprobs: not on the
        batch, the engine's scheduling, preemption or a restart.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"generate: n must be an int >= 1, got {n!r}")
        sampling = dict(sampling or {})
        temperature, params = self._sampling_params(sampling)
        prompts = [[int(t) for t in p] for p in prompts]
        with self._lock:
            self._check_alive()
            if not self._weights_consistent:
                raise RuntimeError("generate: the last weight update failed part-way; "
                                   "call update_weights with a complete set first")
            self._set_engine_temperature(temperature or 1.0)
            seeds = self._request_seeds(sampling, len(prompts), n)
            started = time.perf_counter()
            errors, finished = self._run(prompts, params, n, seeds)
            samples = self._collect(prompts, n, errors, finished)
            elapsed = time.perf_counter() - started
            new_tokens = sum(len(s.response_ids) for s in samples)
            stats = {"seconds": elapsed, "new_tokens": new_tokens,
                     "tokens_per_s": new_tokens / elapsed if elapsed > 0 else 0.0}
            return RolloutBatch(samples=samples, weight_version=self._version, temperature=temperature,
                                stats=stats)

    def _set_engine_temperature(self, temperature: float) -> None:
        if temperature != self._engine_temperature:
            self._rpc("lockstep_set_temperature", temperature)
            self._engine_temperature = temperature

    def _request_seeds(self, sampling: dict, num_prompts: int, n: int) -> list[list[int]]:
        """seeds[i][j] for sample j of prompt i (see `generate`)."""
        prompt_seeds = sampling.get("prompt_seeds")
        if prompt_seeds is None:
            seed = sampling.get("seed")
            if seed is None:
                seed = derive_seed(self.seed, self._calls)
            elif not isinstance(seed, int) or seed < 0:
                raise ValueError(f"generate: seed must be an int >= 0, got {seed!r}")
            self._calls += 1
            prompt_seeds = [derive_seed(seed, i) for i in range(num_prompts)]
        elif (not isinstance(prompt_seeds, (list, tuple)) or len(prompt_seeds) != num_prompts
                or not all(isinstance(s, int) and s >= 0 for s in prompt_seeds)):
            raise ValueError(f"generate: prompt_seeds must be {num_prompts} ints >= 0 (one per prompt)")
        return [[derive_seed(p, j) for j in range(n)] for p in prompt_seeds]

    def _run(self, prompts, params, n, seeds):
        """Add each sample as its own request (vLLM rejects bad prompts one by one), then run
        the engine until all finish. Returns (errors by (i, j), finished outputs by (i, j))."""
        errors: dict[tuple[int, int], str] = {}
        request_of: dict[str, tuple[int, int]] = {}
        for i, prompt in enumerate(prompts):
            error = self._prompt_error(prompt)
            for j in range(n):
                if error is not None:
                    errors[(i, j)] = error
                    continue
                try:
                    request_params = params.clone()
                    request_params.extra_args = {SEED_KEY: seeds[i][j]}
                    (request_id,) = self._llm.enqueue([{"prompt_token_ids": prompt}], request_params,
                                                      use_tqdm=False)
                    # vLLM appends a random suffix internally; outputs carry the external id
                    request_of[request_id.split("-", 1)[0]] = (i, j)
                except Exception as err:   # vLLM's own input validation: this sample only
                    self._raise_if_dead(err)
                    errors[(i, j)] = f"{type(err).__name__}: {err}"
        outputs = self._watched(lambda: self._llm.wait_for_completion(use_tqdm=False))
        return errors, {request_of[out.request_id.split("-", 1)[0]]: out for out in outputs}

    def _collect(self, prompts, n, errors, finished) -> list[RolloutSample]:
        samples = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                if (i, j) in errors:
                    samples.append(RolloutSample(i, j, prompt, [], torch.zeros(0), None, errors[(i, j)]))
                    continue
                completion = finished[(i, j)].outputs[0]
                self._check_versions(completion)
                ids = list(completion.token_ids)
                logprobs = torch.tensor([step[tok].logprob for step, tok in zip(completion.logprobs, ids)],
                                        dtype=torch.float32)   # fp32 values carried as Python floats: exact
                samples.append(RolloutSample(i, j, prompt, ids, logprobs, completion.finish_reason))
        return samples

    def _check_versions(self, completion) -> None:
        spans = completion.weight_versions or []
        versions = {span.version for span in spans}
        if versions - {str(self._version)}:
            raise RuntimeError(f"generate: tokens sampled at weight versions {sorted(versions)}, "
                               f"expected only {self._version}")

    # -- health ------------------------------------------------------------------------------
    def _engine_processes(self) -> list:
        core = getattr(getattr(self._llm, "llm_engine", None), "engine_core", None)
        manager = getattr(getattr(core, "resources", None), "engine_manager", None)
        return list(getattr(manager, "processes", []) or [])

    def _engine_dead(self) -> bool:
        if self._llm is None:
            return True
        core = self._llm.llm_engine.engine_core
        if getattr(getattr(core, "resources", None), "engine_dead", False):
            return True
        return any(not p.is_alive() for p in self._engine_processes())

    def _death_cause(self) -> str:
        if self._dead_cause is None:
            self._log.settle()
            exits = []
            for proc in self._engine_processes():
                code = proc.exitcode
                if code is not None and code < 0:
                    exits.append(f"engine process {proc.pid} killed by {signal.Signals(-code).name}")
                elif code is not None:
                    exits.append(f"engine process {proc.pid} exited with code {code}")
            cause = self._log.cause()
            parts = ([cause] if cause else []) + exits
            self._dead_cause = "; ".join(parts) if parts else "engine process is gone (no log line)"
        return self._dead_cause

    def _raise_if_dead(self, err: BaseException) -> None:
        if self._engine_dead():
            raise EngineDead(f"vLLM engine died: {self._death_cause()}") from err

    def _check_alive(self) -> None:
        if self._engine_dead():
            raise EngineDead(f"vLLM engine is dead: {self._death_cause()}; restart() the worker")

    def _watched(self, call, timeout: float | None = None):
        """Run a blocking engine call in a helper thread while watching the engine process:
        vLLM's client waits forever for an answer from an engine that was killed."""
        box: dict = {}

        def run():
            try:
                box["value"] = call()
            except BaseException as err:   # re-raised in the caller's thread
                box["error"] = err

        thread = threading.Thread(target=run, daemon=True, name="lockstep-engine-call")
        thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while thread.is_alive():
            thread.join(0.25)
            if thread.is_alive() and self._engine_dead():
                raise EngineDead(f"vLLM engine died: {self._death_cause()}")
            if deadline is not None and time.monotonic() > deadline and thread.is_alive():
                raise TimeoutError(f"vLLM engine did not answer within {timeout:.0f} s")
        if "error" in box:
            self._raise_if_dead(box["error"])
            raise box["error"]
        return box["value"]

    def _rpc(self, method: str, *args, timeout: float = RPC_TIMEOUT_S):
        return self._watched(lambda: self._llm.collective_rpc(method, args=args, timeout=timeout), timeout)

    def health(self) -> dict:
        """Never raises. alive=False comes with `error` naming the cause from the engine log."""
        info = {"alive": False, "weight_version": self._version, "weights_consistent": self._weights_consistent,
                "kernels": self.kernels, "temperature": self._engine_temperature, "error": None,
                "engine_pids": [p.pid for p in self._engine_processes()], "busy": False}
        if self._engine_dead():
            info["error"] = f"vLLM engine is dead: {self._death_cause()}"
            return info
        if not self._lock.acquire(blocking=False):
            info.update(alive=True, busy=True)       # a generation or update is running
            return info
        try:
            state = self._rpc("lockstep_state", timeout=HEALTH_TIMEOUT_S)[0]
            info.update(alive=True, engine_state=state)
        except Exception as err:
            info["error"] = (f"vLLM engine is dead: {self._death_cause()}" if self._engine_dead()
                             else f"engine did not answer: {type(err).__name__}: {err}")
        finally:
            self._lock.release()
        return info

    # -- test and bench hooks ----------------------------------------------------------------
    def engine_counters(self) -> dict[str, float]:
        """vLLM's counters (e.g. vllm:num_preemptions, vllm:prefix_cache_hits), summed."""
        from vllm.v1.metrics.reader import Counter
        totals: dict[str, float] = {}
        for metric in self._llm.get_metrics():
            if isinstance(metric, Counter):
                totals[metric.name] = totals.get(metric.name, 0) + metric.value
        return totals

    def trace_engine(self, directory: str | os.PathLike | None) -> None:
        """Record every forward the engine runs from now on into `directory` (token ids,
        batch metadata, hidden states; see rollout.engine_trace, whose `replay` re-runs them
        outside the engine and names the first step that differs); None stops recording."""
        with self._lock:
            self._rpc("lockstep_trace", None if directory is None else str(directory))

    def inject_fault(self, message: str = "lockstep: injected fault") -> None:
        """Make the engine's next forward raise (tests of engine death)."""
        with self._lock:
            self._rpc("lockstep_inject_fault", message)

    def engine_pids(self) -> list[int]:
        return [p.pid for p in self._engine_processes()]
