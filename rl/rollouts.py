"""RolloutPool: the rollout actors of a run, with weight sync and recovery.

Spreads a step's prompts over the workers, checks that every batch comes back at the weight
version the trainer last pushed, and survives a dead actor: it is replaced by a fresh one,
re-synced to the current weights (kept once in the Ray object store) and the rollout retried.
"""
from __future__ import annotations

import logging

log = logging.getLogger("lockstep")


class RolloutPool:
    def __init__(self, cfg, model_path: str, kernels: str, seed: int, actor_options: dict):
        import ray
        from rollout.worker import RolloutWorker
        self.cfg, self.model_path, self.kernels, self.seed = cfg, model_path, kernels, seed
        self._cls = ray.remote(**actor_options)(RolloutWorker)
        self.version = 0
        self.weights_ref = None
        self.restarts = 0
        self.workers = [self._spawn(i) for i in range(cfg.num_workers)]
        ray.get([w.health.remote() for w in self.workers])

    def _spawn(self, index: int):
        return self._cls.remote(self.model_path, kernels=self.kernels, temperature=self.cfg.temperature,
                                engine=self.cfg.engine, seed=self.seed + index, weight_version=self.version)

    def fingerprints(self) -> list[dict]:
        """Each worker's engine build fingerprint (rl.model.fingerprint)."""
        import ray
        return ray.get([w.fingerprint.remote() for w in self.workers])

    def update_weights(self, version: int, weights) -> None:
        import ray
        self.weights_ref = ray.put(weights)
        self.version = version
        ray.get([w.update_weights.remote(version, self.weights_ref) for w in self.workers])

    def _replace(self, index: int) -> None:
        import ray
        log.warning("rollout worker %d died; starting a replacement and re-syncing to version %d", index, self.version)
        try:
            ray.kill(self.workers[index])
        except Exception:
            pass
        self.workers[index] = self._spawn(index)
        if self.weights_ref is not None:
            ray.get(self.workers[index].update_weights.remote(self.version, self.weights_ref))
        self.restarts += 1

    def generate(self, prompts: list[list[int]], n: int, sampling: dict):
        """All samples of all prompts (prompt-major), checked to be at the current version.

        Each prompt's samples are seeded from (sampling["seed"], its index in `prompts`) exactly
        as one worker given the whole call would seed them, so the tokens do not depend on the
        number of workers, the sharding or a retry."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        from rollout.sampling import derive_seed
        sampling = dict(sampling)
        seed = sampling.pop("seed", 0)
        shards = [list(range(i, len(prompts), len(self.workers))) for i in range(len(self.workers))]
        for attempt in range(self.cfg.max_retries + 1):
            refs = [w.generate.remote([prompts[j] for j in idx],
                                      dict(sampling, prompt_seeds=[derive_seed(seed, j) for j in idx]), n)
                    if idx else None for w, idx in zip(self.workers, shards)]
            results, failed = [], []
            for i, ref in enumerate(refs):
                if ref is None:
                    results.append(None)
                    continue
                try:
                    results.append(ray.get(ref))
                except (RayActorError, RayTaskError) as err:
                    dead = isinstance(err, RayActorError) or "EngineDead" in str(err)
                    if not dead or attempt == self.cfg.max_retries:
                        raise
                    failed.append(i)
                    results.append(None)
            if not failed:
                break
            for i in failed:
                self._replace(i)
        samples = [None] * (len(prompts) * n)
        for idx, batch in zip(shards, results):
            if batch is None:
                continue
            if batch.weight_version != self.version:
                raise RuntimeError(f"rollout returned weight version {batch.weight_version}, "
                                   f"expected {self.version}: refusing to train on stale samples")
            for s in batch.samples:
                samples[idx[s.prompt_index] * n + s.sample_index] = s
        return samples

    def kill(self, index: int = 0) -> None:
        """Kill a worker (fault-injection for tests)."""
        import ray
        ray.kill(self.workers[index], no_restart=True)

    def shutdown(self) -> None:
        import ray
        for w in self.workers:
            try:
                ray.get(w.shutdown.remote(), timeout=30)
            except Exception:
                pass
            ray.kill(w)
