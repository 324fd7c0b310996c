"""RolloutWorker as a Ray actor: generate, update_weights through the object store, health,
engine death seen from the owner (the in-process tests cover restart and the fault path)."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from rl.model.checkpoint import load_model
from tests_paths import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    owned = not ray.is_initialized()          # another module's session is reused, not shut down
    if owned:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if owned:
        ray.shutdown()


def test_worker_as_ray_actor(ray_session, tmp_path):
    from rl.model.checkpoint import save_model
    from rollout.parity import mismatches
    from rollout.worker import RolloutWorker
    ray = ray_session
    torch.manual_seed(5)
    base = load_model(TINY).eval()
    save_model(base, tmp_path / "ckpt")                      # a checkpoint dir, as the driver passes
    actor = ray.remote(RolloutWorker).options(num_cpus=1).remote(
        str(tmp_path / "ckpt"), temperature=1.0, engine={"kv_cache_bytes": 64 << 20, "max_num_seqs": 16})
    prompts = [[4, 5, 6], list(range(4, 40))]
    batch = ray.get(actor.generate.remote(prompts, {"max_new_tokens": 20, "seed": 0}, 2), timeout=600)
    assert batch.weight_version == 0 and not mismatches(batch, base, 1.0)

    torch.manual_seed(6)
    new = load_model(TINY).eval()
    weights = ray.put(new.state_dict())                      # trainer side: into the object store
    assert ray.get(actor.update_weights.remote(1, weights), timeout=300) == 1
    batch = ray.get(actor.generate.remote(prompts, {"max_new_tokens": 20, "seed": 0}, 2), timeout=600)
    assert batch.weight_version == 1 and not mismatches(batch, new, 1.0)
    assert ray.get(actor.get_weight_version.remote()) == 1

    health = ray.get(actor.health.remote())
    assert health["alive"] and health["weight_version"] == 1
    os.kill(ray.get(actor.engine_pids.remote())[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while health["alive"] and time.monotonic() < deadline:
        time.sleep(0.5)
        health = ray.get(actor.health.remote())
    assert not health["alive"] and "SIGKILL" in health["error"], health
    ray.kill(actor)
