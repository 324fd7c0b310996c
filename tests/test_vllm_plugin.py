"""The vLLM plugin's pieces without starting an engine: registration, the metadata -> BatchMeta
translation, state declarations, weight buckets, engine-log cause extraction, option checks.
(End-to-end parity inside a running engine: tests/test_rollout_vllm.py.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests_paths import TINY


def test_register_is_idempotent_and_maps_our_architecture():
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from rl.model.config import BailingMoeLinearV2Config
    from rollout.vllm_plugin import ARCHITECTURE, register
    register()
    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    assert AutoConfig.for_model("bailing_moe_linear").__class__ is BailingMoeLinearV2Config


def test_entry_point_is_installed():
    from importlib.metadata import entry_points
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "lockstep"]
    assert eps and eps[0].value == "rollout.vllm_plugin:register"


def test_declared_state_matches_the_layer():
    from rl.model.checkpoint import load_model
    from rollout.vllm_model import LockstepBailingForCausalLM, linear_state_shapes
    model = load_model(TINY)
    layer = next(l.attention for l in model.model.layers if not l.is_softmax)
    assert linear_state_shapes(model.config) == layer.state_shapes()
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=model.config))
    assert LockstepBailingForCausalLM.get_mamba_state_shape_from_config(vllm_config) == layer.state_shapes()
    assert LockstepBailingForCausalLM.get_mamba_state_dtype_from_config(vllm_config) == (torch.float32,) * 2


def test_attention_metadata_becomes_batchmeta():
    """vLLM: decodes first, then prefills; int32 locations; seq_lens include new tokens."""
    from rollout.vllm_model import batch_from_attention, batch_from_linear
    qsl = torch.tensor([0, 1, 2, 7, 7], dtype=torch.int32)          # 2 decodes, 1 prefill of 5, 1 padded
    seq_lens = torch.tensor([40, 17, 9, 0], dtype=torch.int32)
    attn = SimpleNamespace(query_start_loc=qsl, seq_lens=seq_lens, num_actual_tokens=7, max_query_len=5,
                           block_table=torch.arange(12, dtype=torch.int32).view(4, 3),
                           slot_mapping=torch.arange(9))
    batch = batch_from_attention(attn, num_reqs=3, num_tokens=7)
    assert batch.query_start_loc.tolist() == [0, 1, 2, 7] and batch.query_start_loc.dtype == torch.int64
    assert batch.context_lens.tolist() == [39, 16, 4]
    assert batch.slot_mapping.tolist() == list(range(7)) and batch.block_table.shape == (3, 3)
    assert batch.positions().tolist() == [39, 16, 4, 5, 6, 7, 8] and batch.max_query_len == 5
    lin = SimpleNamespace(query_start_loc=qsl, seq_lens=seq_lens, num_prefills=1,
                          state_indices_tensor=torch.tensor([5, 2, 9, -1], dtype=torch.int32))
    batch = batch_from_linear(lin, num_reqs=3)
    assert batch.state_indices.tolist() == [5, 2, 9] and batch.context_lens.tolist() == [39, 16, 4]
    assert batch.max_query_len is None                  # a prefill: the host does not know it
    decodes = SimpleNamespace(query_start_loc=qsl[:3], seq_lens=seq_lens[:2], num_prefills=0,
                              state_indices_tensor=torch.tensor([5, 2], dtype=torch.int32))
    batch = batch_from_linear(decodes, num_reqs=2)
    assert batch.max_query_len == 1 and batch.is_decode()


def test_weight_buckets_split_and_round_trip(tmp_path):
    from safetensors.torch import load_file

    from rollout.weight_transfer import write_buckets
    weights = {f"w{i}": torch.randn(64, 64).to(torch.bfloat16) for i in range(5)}   # 8 KiB each
    paths = write_buckets(weights, tmp_path, bucket_bytes=20 << 10)
    assert len(paths) == 3
    back = {}
    for p in paths:
        back.update(load_file(str(p)))
    assert set(back) == set(weights)
    for name in weights:
        assert torch.equal(back[name], weights[name])


def test_engine_log_names_the_root_cause():
    from rollout.engine_log import EngineLog
    log = EngineLog()
    log.lines.extend([
        "(Worker pid=7) ERROR 11-29 [multiproc_executor.py:1063] Traceback (most recent call last):",
        '(Worker pid=7) ERROR 11-29 [multiproc_executor.py:1063]   File "x.py", line 3, in forward',
        "(Worker pid=7) ERROR 11-29 [multiproc_executor.py:1063] RuntimeError: lockstep: injected fault",
        "(EngineCore pid=6) ERROR 11-29 [core.py:1200] EngineCore encountered a fatal error.",
        "(EngineCore pid=6) ERROR 11-29 [core.py:1512] RuntimeError: Worker failed with error "
        "'lockstep: injected fault', please check the stack trace above for the root cause",
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.",
    ])
    assert log.cause() == "RuntimeError: lockstep: injected fault"


def test_engine_log_capture_forwards_and_keeps(capfd):
    import os
    from rollout.engine_log import EngineLog
    log = EngineLog()
    with log.capture():
        os.write(2, b"from the engine\n")
    log.settle(quiet_s=0.05, timeout_s=1.0)
    assert "from the engine" in log.tail()
    assert "from the engine" in capfd.readouterr().err


def test_worker_rejects_options_that_break_the_contract():
    from rollout.worker import RolloutWorker
    with pytest.raises(ValueError, match="logprobs_mode"):
        RolloutWorker._engine_args({"logprobs_mode": "raw_logprobs"}, seed=0)
    with pytest.raises(ValueError, match="enforce_eager"):
        RolloutWorker._engine_args({"enforce_eager": False}, seed=0)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not supported"):
        RolloutWorker._engine_args({"kv_cache_dtype": "fp8"}, seed=0)
    args = RolloutWorker._engine_args({"kv_cache_bytes": 1 << 20, "num_kv_blocks": 9}, seed=3)
    assert args["kv_cache_memory_bytes"] == 1 << 20 and args["num_gpu_blocks_override"] == 9 and args["seed"] == 3


def test_worker_rejects_bad_sampling_keys():
    from rollout.worker import RolloutWorker
    worker = RolloutWorker.__new__(RolloutWorker)      # no engine needed for argument checks
    worker.temperature = 1.0
    with pytest.raises(ValueError, match="unknown sampling key"):
        worker._sampling_params({"max_tokens": 3})
    with pytest.raises(ValueError, match="temperature"):
        worker._sampling_params({"temperature": -1})
    temperature, params = worker._sampling_params({"temperature": 0.5, "max_new_tokens": 7})
    # our compute_logits applies T; vLLM samples the returned log-probs at 1.0
    assert temperature == 0.5 and params.temperature == 1.0 and params.max_tokens == 7 and params.logprobs == 0
