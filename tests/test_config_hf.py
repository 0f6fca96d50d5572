"""config.json as the DeepSeek family publishes it: every field honoured or refused, one note for the rest."""

from __future__ import annotations

import json
import warnings

import pytest

from workbench import ConfigError, ModelConfig
from workbench.config import HF_IGNORED_FIELDS, ConfigNote

transformers = pytest.importorskip("transformers")


def _quiet(hf: dict) -> ModelConfig:
    """from_hf that must not warn at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ModelConfig.from_hf(hf)


def _tiny_hf(**changes) -> dict:
    return {**ModelConfig.from_preset("tiny").to_hf(), **changes}


@pytest.mark.parametrize("topk_method", ["noaux_tc", "group_limited_greedy", "greedy"])
def test_our_config_json_round_trips_without_a_note(topk_method):
    config = ModelConfig.from_preset("tiny", topk_method=topk_method, num_nextn_predict_layers=0)
    hf = json.loads(json.dumps(config.to_hf()))
    assert hf["model_type"] == ("deepseek_v3" if topk_method == "noaux_tc" else "deepseek_v2")
    assert _quiet(hf) == config


@pytest.mark.parametrize("cls", ["DeepseekV2Config", "DeepseekV3Config"])
def test_transformers_saved_configs_read_without_a_note(cls, tmp_path):
    config = ModelConfig.from_preset(
        "tiny", num_nextn_predict_layers=0 if cls == "DeepseekV2Config" else 1,
        **({"topk_method": "group_limited_greedy", "scoring_func": "softmax", "norm_topk_prob": False}
           if cls == "DeepseekV2Config" else {}),
    )  # fmt: skip
    getattr(transformers, cls)(**config.to_hf()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "head_dim" in saved  # transformers 5's own fields
    back = _quiet(saved)
    assert back.replace(**{k: getattr(config, k) for k in ("bias_update_speed", "attn_mode")}) == config


def test_fields_that_do_not_change_the_math_are_named_in_one_note():
    hf = _tiny_hf(aux_loss_alpha=0.001, seq_aux=True, ep_size=8, pretraining_tp=1, attention_dropout=0.0,
                  some_future_field=3)  # fmt: skip
    with pytest.warns(ConfigNote) as caught:
        ModelConfig.from_hf(hf)
    assert len(caught) == 1
    note = str(caught[0].message)
    for part in ("aux_loss_alpha=0.001", "seq_aux=True", "ep_size=8", "some_future_field"):
        assert part in note
    assert "pretraining_tp" not in note and "attention_dropout" not in note  # neutral values: nothing to say
    assert set(HF_IGNORED_FIELDS) >= {"aux_loss_alpha", "seq_aux", "ep_size", "num_key_value_heads"}


@pytest.mark.parametrize(
    "changes, says",
    [
        (dict(topk_method="sinkhorn"), "topk_method='sinkhorn' is not implemented"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(mlp_bias=True), "mlp_bias=True"),
        (dict(moe_layer_freq=2), "moe_layer_freq=2"),
        (dict(rope_interleave=False), "rope_interleave=False"),
        (dict(n_routed_experts=None), "n_routed_experts is null"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling type 'dynamic'"),
        (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "rope scaling type 'llama3'"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "low_freq": 1}),
         "keys this workbench does not implement: low_freq"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                               "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor"),
        (dict(model_type="deepseek_v2", norm_topk_prob=True, routed_scaling_factor=16.0, workbench=None),
         "two disagree"),  # a published V2 file (not ours, whose rule is V3's: normalise, then scale)
    ],
)  # fmt: skip
def test_fields_that_would_change_the_math_are_refused(changes, says):
    with pytest.raises(ConfigError, match="cannot be honoured") as info:
        ModelConfig.from_hf(_tiny_hf(**changes))
    assert says in str(info.value)


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(_tiny_hf(hidden_act="relu", attention_bias=True, topk_method="x"))
    message = str(info.value)
    assert "hidden_act" in message and "attention_bias" in message and "topk_method" in message


def test_a_config_without_the_shapes_is_refused():
    hf = _tiny_hf()
    del hf["hidden_size"], hf["kv_lora_rank"]
    with pytest.raises(ConfigError, match="lacks hidden_size, kv_lora_rank"):
        ModelConfig.from_hf(hf)


def test_v2_defaults_apply_where_a_v2_config_is_silent():
    """A V2 config.json written by transformers has no scoring_func and no num_nextn_predict_layers: V2's own
    values (softmax, no MTP), not V3's."""
    hf = _tiny_hf(model_type="deepseek_v2")
    for key in ("scoring_func", "norm_topk_prob", "routed_scaling_factor", "topk_method", "num_nextn_predict_layers"):
        del hf[key]
    config = _quiet(hf)
    assert (config.scoring_func, config.norm_topk_prob, config.routed_scaling_factor) == ("softmax", False, 1.0)
    assert config.topk_method == "greedy" and config.num_nextn_predict_layers == 0
    hf["model_type"] = "deepseek_v3"
    v3 = _quiet(hf)
    assert (v3.scoring_func, v3.norm_topk_prob, v3.topk_method, v3.num_nextn_predict_layers) == (
        "sigmoid", True, "noaux_tc", 1)  # fmt: skip


def test_rope_scaling_default_is_no_scaling_and_kimi_reads_as_v3():
    assert _quiet(_tiny_hf(rope_scaling={"type": "default"})).rope_scaling is None
    kimi = _quiet(_tiny_hf(model_type="kimi_k2", n_group=1, topk_group=1))
    assert kimi.topk_method == "noaux_tc" and kimi.n_group == 1


def test_greedy_routing_ignores_the_groups():
    """V2-Lite's greedy routing has no groups: a config whose groups could not hold its top-k is valid."""
    config = ModelConfig.from_preset("tiny", topk_method="greedy", n_group=2, topk_group=1, num_experts_per_tok=6)
    assert config.num_experts_per_tok == 6
    with pytest.raises(ConfigError, match="larger than the experts the groups allow"):
        ModelConfig.from_preset("tiny", topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                num_experts_per_tok=6)  # fmt: skip
