"""Rollout: sampling with the trainer's own model and kernels.

- `rollout.worker.RolloutWorker` — a vLLM engine serving our model (in-process or as a Ray
  actor): generate, update_weights, health. Results: `rollout.batch.RolloutBatch`.
- `rollout.vllm_plugin` — the `vllm.general_plugins` entry point; `rollout.vllm_model` is the
  model class vLLM runs, `rollout.weight_transfer` the one-node weight-sync backend,
  `rollout.worker_extension` the control methods inside the engine process.
- `rollout.reference` — the reference decoder (no vLLM).
- `rollout.parity` — recompute a batch with the trainer forward and compare bits.
See rollout/README.md for how the plugin hooks into vLLM and what is verified.
"""
