"""ModelConfig: presets, validation messages that name the field and the fix, config.json round trips."""

from __future__ import annotations

import json

import pytest

from workbench import ConfigError, ModelConfig


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_presets_are_valid_and_round_trip_through_config_json(name, tmp_path):
    config = ModelConfig.from_preset(name)
    assert ModelConfig.from_hf(config.to_hf()) == config
    config.save(tmp_path / "config.json")
    assert ModelConfig.from_hf(tmp_path) == config
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"


@pytest.mark.parametrize(
    "overrides, field, fix",
    [
        (dict(n_routed_experts=10, n_group=4), "n_group", "choose n_group among"),
        (
            dict(num_experts_per_tok=6, n_group=4, topk_group=1, n_routed_experts=16),
            "num_experts_per_tok",
            "raise topk_group to at least 2",
        ),
        (dict(topk_group=5, n_group=4, n_routed_experts=16), "topk_group", "between 1 and n_group"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim", "even"),
        (dict(num_experts_per_tok=20, n_group=1, topk_group=1), "num_experts_per_tok", "between 1 and"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace", "between 0 and"),
        (dict(scoring_func="relu"), "scoring_func", "'sigmoid' or 'softmax'"),
        (dict(attn_mode="flash"), "attn_mode", "'naive' or 'absorb'"),
        (dict(q_lora_rank=0), "q_lora_rank", "None"),
        (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling", "yarn"),
        (dict(hidden_size=-1), "hidden_size", "positive"),
    ],
)
def test_impossible_configs_name_the_field_and_the_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_preset("tiny", **overrides)
    assert field in str(err.value) and fix in str(err.value)


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="choose one of"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_preset("tiny", hidden=3)


def test_reads_deepseeks_own_config_json():
    """The fields of DeepSeek-V3's published config.json (those we model) give the deepseek-v3 preset."""
    published = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "ep_size": 1,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-06,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "rope_theta": 10000,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
    }
    assert ModelConfig.from_hf(published) == ModelConfig.from_preset("deepseek-v3")


def test_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_hf(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf({"model_type": "llama"})
