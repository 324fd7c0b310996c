"""Placement of a run's actors and the Ray cluster it runs on.

`plan_placement(cfg)` turns the config into the actors to start and their Ray resource
requests, with no side effects (it is what `run.dry_run` prints, e.g. for a GPU-cluster
config on a laptop). Colocated: trainer and rollout actors share devices (fractional
requests: each takes half of a GPU/CPU slot). Separate: rollout workers get their own.
`start_ray` joins `ray.address` or starts a local cluster.
"""
from __future__ import annotations

import os


def plan_placement(cfg) -> dict:
    p, r = cfg.placement, cfg.rollout
    share = 0.5 if p.colocate else 1.0
    trainer_opts = {"num_cpus": p.cpus_per_actor, "num_gpus": p.gpus_per_actor * share}
    rollout_opts = {"num_cpus": p.cpus_per_actor, "num_gpus": p.gpus_per_actor * share}
    actors = [{"role": "actor", "rank": i, **trainer_opts} for i in range(p.trainer_world_size)]
    if cfg.algo.needs_critic:
        actors += [{"role": "critic", "rank": i, **trainer_opts} for i in range(p.trainer_world_size)]
    if cfg.algo.kl.use_kl_loss or cfg.algo.kl.kl_reward_coef:
        actors.append({"role": "reference", "rank": 0, **trainer_opts})
    actors += [{"role": "rollout", "rank": i, **rollout_opts} for i in range(r.num_workers)]
    totals = {"CPU": sum(a["num_cpus"] for a in actors), "GPU": sum(a["num_gpus"] for a in actors)}
    summary = (f"{p.trainer_world_size} trainer rank(s) (ZeRO-{cfg.trainer.zero_stage}), "
               f"{r.num_workers} rollout worker(s) (vLLM, kernels {cfg.model.kernels}), "
               f"{'colocated' if p.colocate else 'separate'}")
    return {"summary": summary, "actors": actors, "totals": totals,
            "trainer_actor_options": trainer_opts, "rollout_actor_options": rollout_opts}


def start_ray(cfg) -> None:
    import ray
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # the working directory is shipped by `ray job submit --working-dir`; locally, actors
    # import the project from the driver's sys.path
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)}}
    if address:
        ray.init(address=address, runtime_env=None if os.environ.get("RAY_JOB_ID") else env,
                 log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
