"""Accounting on the meta device: DeepSeek-V3's published figures come out of our model."""

from __future__ import annotations

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.model.accounting import (
    count_params,
    flops_per_token,
    kv_cache_bytes_per_token,
    kv_cache_values_per_token_per_layer,
)


def test_deepseek_v3_has_671b_parameters_and_37b_active():
    counts = count_params(ModelConfig.from_preset("deepseek-v3"))
    assert round(counts["total"] / 1e9, 2) == 671.03
    assert 36.5e9 < counts["active"] < 38e9
    assert 11e9 < counts["mtp"] < 12e9  # + embedding and head copies = DeepSeek's "14B MTP module"


def test_kv_cache_per_token_matches_deepseeks_numbers():
    config = ModelConfig.from_preset("deepseek-v3")
    assert kv_cache_values_per_token_per_layer(config) == {"mla": 576, "mha": 40960}
    kv = kv_cache_bytes_per_token(config, dtype=torch.bfloat16)
    assert kv["mla"] == 61 * 576 * 2
    assert kv["mha"] == 61 * 40960 * 2
    assert kv["mqa"] < kv["mla"] < kv["gqa"] < kv["mha"]


def test_counts_match_a_real_model():
    config = ModelConfig.from_preset("tiny")
    model = Model(config)
    counts = count_params(config)
    assert counts["total"] + counts["mtp"] == model.num_parameters()
    tied = ModelConfig.from_preset("tiny", tie_word_embeddings=True)
    assert count_params(tied)["total"] == sum(p.numel() for p in Model(tied).parameters()) - count_params(tied)["mtp"]


def test_flops_per_token():
    config = ModelConfig.from_preset("deepseek-v3")
    fwd = flops_per_token(config, context=0)
    counts = count_params(config)
    assert fwd["attention"] == 0
    assert fwd["matmul"] == pytest.approx(2 * (counts["active"] - counts["breakdown"]["embedding"]), rel=1e-3)
    train = flops_per_token(config, context=4096, training=True)
    assert train["total"] == pytest.approx(3 * flops_per_token(config, context=4096)["total"])


def _random_configs(n: int, seed: int = 0) -> list[ModelConfig]:
    """Configs that vary every field the count depends on."""
    import random

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        groups = rng.choice([1, 2, 4])
        experts = groups * rng.choice([2, 3, 4])
        layers = rng.randint(1, 5)
        k = rng.randint(1, min(experts, 4))
        topk_group = max(1, min(groups, -(-k // (experts // groups))))
        out.append(
            ModelConfig(
                vocab_size=rng.choice([64, 96, 130]),
                hidden_size=rng.choice([16, 24, 32]),
                num_hidden_layers=layers,
                first_k_dense_replace=rng.randint(0, layers),
                intermediate_size=rng.choice([8, 40]),
                moe_intermediate_size=rng.choice([4, 12]),
                n_routed_experts=experts,
                n_shared_experts=rng.randint(0, 2),
                num_experts_per_tok=k,
                n_group=groups,
                topk_group=topk_group,
                topk_method=rng.choice(["noaux_tc", "group_limited_greedy", "greedy"])
                if experts // groups >= 2
                else "greedy",
                num_attention_heads=rng.choice([1, 2, 3]),
                q_lora_rank=rng.choice([None, 8, 20]),
                kv_lora_rank=rng.choice([4, 12]),
                qk_nope_head_dim=rng.choice([4, 8]),
                qk_rope_head_dim=rng.choice([2, 4]),
                v_head_dim=rng.choice([4, 6]),
                max_position_embeddings=rng.choice([16, 64]),
                tie_word_embeddings=rng.random() < 0.3,
                num_nextn_predict_layers=rng.randint(0, 2),
                fp8=rng.random() < 0.2,
            )
        )
    return out


@pytest.mark.parametrize("config", _random_configs(40), ids=lambda c: f"L{c.num_hidden_layers}E{c.n_routed_experts}")
def test_closed_form_count_equals_the_meta_device_count(config):
    from workbench.model.accounting import count_params_meta, model_bytes

    assert count_params(config) == count_params_meta(config)
    with torch.device("meta"):
        model = Model(config)
    seen, params, buffers = set(), 0, 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            if isinstance(t, torch.nn.Parameter):
                params += t.numel() * 2
            else:
                buffers += t.numel() * t.element_size()
    assert model_bytes(config, torch.bfloat16) == params + buffers


def _no_model(monkeypatch):
    """Make building a Model fail: what follows must count without one."""

    def refuse(self, config):
        raise AssertionError("a Model was built")

    monkeypatch.setattr(Model, "__init__", refuse)


def test_counting_a_huge_config_builds_no_model(monkeypatch):
    per_moe_layer = (count_params(ModelConfig.from_preset("deepseek-v3", num_hidden_layers=4))["total"]
                     - count_params(ModelConfig.from_preset("deepseek-v3", num_hidden_layers=3))["total"])  # fmt: skip
    v3 = count_params(ModelConfig.from_preset("deepseek-v3"))["total"]
    _no_model(monkeypatch)
    counts = count_params(ModelConfig.from_preset("deepseek-v3", num_hidden_layers=2_000_000))
    assert counts["total"] == v3 + (2_000_000 - 61) * per_moe_layer


def test_info_on_a_huge_config_builds_no_model(capsys, monkeypatch):
    import json

    from workbench.cli import main

    _no_model(monkeypatch)
    assert main(["info", "--preset", "deepseek-v3", "--set", "num_hidden_layers=2000000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"]["total"] > 2e16


def test_layer_by_layer_bytes_match_what_layered_execution_keeps(tmp_path):
    from workbench.io.hf import save_hf
    from workbench.io.layered import LayeredModel
    from workbench.model.accounting import layered_bytes

    for changes in ({}, {"tie_word_embeddings": True, "first_k_dense_replace": 0}):
        config = ModelConfig.from_preset("tiny", num_nextn_predict_layers=0, **changes)
        folder = tmp_path / str(len(changes))
        save_hf(Model(config), folder)
        layered = LayeredModel(folder)
        rope = sum(t.numel() * t.element_size() for t in (layered.model.rope_cos, layered.model.rope_sin))
        mask = config.n_routed_experts  # a router's bool mask of active experts: computed, not read
        assert layered_bytes(config, torch.float32) == layered.resident_bytes + rope + mask
