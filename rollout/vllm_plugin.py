"""vLLM general plugin: serve `BailingMoeLinearV2ForCausalLM` with lockstep's model and kernels.

Registered in pyproject.toml under the entry point group `vllm.general_plugins`
(`lockstep = rollout.vllm_plugin:register`); vLLM calls `register()` once in every process it
starts (front end, engine core, workers), so it is idempotent and imports only what vLLM has
loaded anyway; the model class is registered by its import path and loaded lazily by vLLM.
"""
from __future__ import annotations

ARCHITECTURE = "BailingMoeLinearV2ForCausalLM"
MODEL_CLASS = "rollout.vllm_model:LockstepBailingForCausalLM"
WEIGHT_BACKEND = "lockstep_shm"
WEIGHT_ENGINE_CLASS = "rollout.weight_transfer:SharedMemoryWeightTransferEngine"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from rl.model.config import BailingMoeLinearV2Config

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)  # re-registering is harmless
    # the CPU / one-node weight-sync backend (rollout.weight_transfer), loaded lazily
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    try:
        WeightTransferEngineFactory.register_engine(WEIGHT_BACKEND, *WEIGHT_ENGINE_CLASS.split(":"))
    except ValueError:
        pass  # already registered in this process
    # checkpoints written by rl.model carry no auto_map: teach AutoConfig our model_type
    try:
        AutoConfig.register(BailingMoeLinearV2Config.model_type, BailingMoeLinearV2Config)
    except ValueError:
        pass  # already registered in this process
