"""HF checkpoint round trip, strict loading, config validation, bad prompts."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bits import assert_bits_equal
from rl.model import BailingMoeLinearV2ForCausalLM, load_model_config
from rl.model.checkpoint import load_model, save_model
from rl.model.tokenizer import build_char_tokenizer
from rollout.reference import generate
from tests_paths import ROOT, TINY


def _logprobs(model):
    ids = torch.randint(4, 128, (3, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.sequence_logprobs(ids, [50, 20, 33])


def test_save_reload_identical(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ck", build_char_tokenizer(128))
    assert_bits_equal(_logprobs(load_model(tmp_path / "ck")), _logprobs(tiny_model), "reloaded")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert isinstance(hf, BailingMoeLinearV2ForCausalLM)
    assert_bits_equal(_logprobs(hf), _logprobs(tiny_model), "AutoModelForCausalLM")
    tok = AutoTokenizer.from_pretrained(tmp_path / "ck")
    assert tok.decode(tok("12+7=19").input_ids) == "12+7=19"


def test_released_key_names(tiny_model):
    keys = set(tiny_model.state_dict())
    for key in ("model.word_embeddings.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.0.attention.query_key_value.weight", "model.layers.0.attention.g_proj.weight",
                "model.layers.0.attention.g_norm.weight", "model.layers.0.attention.query_layernorm.weight",
                "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.experts.7.down_proj.weight",
                "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.2.attention.dense.weight",
                "model.norm.weight", "lm_head.weight"):
        assert key in keys, key
    assert not any("decay" in k or "slope" in k for k in keys)


def test_missing_key_named(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ck")
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    del tensors["model.layers.2.attention.dense.weight"]
    save_file(tensors, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing key 'model.layers.2.attention.dense.weight'"):
        load_model(tmp_path / "ck")


def test_misshaped_key_named(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ck")
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :64].contiguous()
    save_file(tensors, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(128, 64\), model expects \(128, 128\)"):
        load_model(tmp_path / "ck")


def test_other_architecture_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ValueError, match="qwen2.*not 'bailing_moe_linear'"):
        load_model(tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("n_group", 3, "n_group=3; allowed: a divisor of num_experts"),
    ("linear_decay_form", "other", "linear_decay_form='other'; allowed: engine, hf"),
    ("hidden_size", -1, "hidden_size=-1; allowed: a positive integer"),
    ("num_key_value_heads", 3, "num_key_value_heads=3; allowed: a divisor of num_attention_heads"),
])
def test_invalid_config_field_named(tmp_path, field, value, message):
    cfg = json.loads(TINY.read_text())
    cfg[field] = value
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_model_config(tmp_path / "c.json")


def test_unknown_config_field_named(tmp_path):
    cfg = json.loads(TINY.read_text())
    cfg["num_expertz"] = 8
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['num_expertz'\]; allowed fields: .*num_experts"):
        load_model_config(tmp_path / "c.json")


def test_all_shipped_configs_load():
    for path in sorted((ROOT / "configs" / "model").glob("*.json")):
        load_model_config(path)


def test_ring_mini_parameter_count():
    with torch.device("meta"):
        model = BailingMoeLinearV2ForCausalLM(load_model_config(ROOT / "configs/model/ring-mini-linear-2.0.json"))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e9 - 16.4) < 0.1, count


def test_prompt_too_long_names_index(tiny_model):
    prompts = [[5, 6], [7] * 600, [8]]
    with pytest.raises(ValueError, match="prompt 1 has 600 tokens"):
        generate(tiny_model, prompts, 4)
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        generate(tiny_model, [[5], [6], []], 4)
