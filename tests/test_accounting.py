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
