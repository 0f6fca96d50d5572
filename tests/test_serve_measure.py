"""What lesson 10 computes and measures: the serving arithmetic (KV bytes, contexts that fit, a request's
cost) against hand-computed values, and the HTTP measurements against what the server reports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workbench import ModelConfig
from workbench.analysis.claims import REPORTED
from workbench.analysis.serving import contexts_that_fit, kv_per_token, request_cost, weight_bytes
from workbench.model.accounting import count_params

ROOT = Path(__file__).resolve().parent.parent


def test_kv_bytes_per_token_of_deepseek_v3_by_hand():
    v3 = ModelConfig.from_preset("deepseek-v3")
    kv = kv_per_token(v3, torch.bfloat16)
    layers, heads = v3.num_hidden_layers, v3.num_attention_heads
    assert kv["mla"] == layers * (v3.kv_lora_rank + v3.qk_rope_head_dim) * 2 == 61 * (512 + 64) * 2
    assert kv["mha"] == layers * heads * (v3.qk_nope_head_dim + v3.qk_rope_head_dim + v3.v_head_dim) * 2
    assert kv_per_token(v3, torch.float32)["mla"] == 2 * kv["mla"]


def test_contexts_that_fit_after_the_weights():
    assert contexts_that_fit(100.0, 40.0, 2.0, 10) == 3  # 60 bytes left, 20 per context
    assert contexts_that_fit(100.0, 40.0, 2.0, 30) == 1
    assert contexts_that_fit(100.0, 120.0, 2.0, 10) == 0  # the weights alone do not fit
    v3 = ModelConfig.from_preset("deepseek-v3")
    fp8 = weight_bytes(v3, 1.0)
    assert fp8 == count_params(v3)["total"] and weight_bytes(v3, 2.0) == 2 * fp8
    assert weight_bytes(v3, 1.0, include_mtp=True) > fp8
    for bad in (dict(memory_bytes=0.0), dict(kv_bytes_per_token=-1.0), dict(weights=float("nan")), dict(context=0)):
        args = dict(memory_bytes=100.0, weights=1.0, kv_bytes_per_token=1.0, context=1) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            contexts_that_fit(**args)
    with pytest.raises(ValueError, match="bytes_per_param"):
        weight_bytes(v3, 0)


def test_request_cost_at_the_published_prices():
    hit, miss, out = (REPORTED[k].value for k in ("v3_cache_hit_price", "v3_cache_miss_price", "v3_output_price"))
    assert (hit, miss, out) == (0.07, 0.27, 1.10)
    assert request_cost(1e6, 0, 0, hit, miss, out) == pytest.approx(miss)
    assert request_cost(1e6, 1e6, 0, hit, miss, out) == pytest.approx(hit)
    assert request_cost(1e6, 5e5, 1e6, hit, miss, out) == pytest.approx((hit + miss) / 2 + out)
    with pytest.raises(ValueError, match="cached_tokens"):
        request_cost(10, 11, 0, hit, miss, out)


def test_the_measurements_read_what_the_server_reports():
    pytest.importorskip("openai")
    from workbench.io.hf import load_hf
    from workbench.io.tokenizer import tokenizer_of
    from workbench.serve.measure import in_process, long_prefix, prefix_trial, throughput

    model = load_hf(ROOT / "data" / "tiny-model")
    tok = tokenizer_of(model)
    context = model.config.max_position_embeddings
    assert long_prefix(tok, context, 0) != long_prefix(tok, context, 1)
    with in_process(model, model_id="m", max_batch=4) as live:
        r = throughput(live.client, "m", 4, 2, 3)
        assert r["clients"] == 2 and 4 <= r["tokens"] <= 12 and r["tokens_per_s"] > 0
        t = prefix_trial(live.client, "m", tok, context, 0)
        assert t["prefix_tokens"] < context
        assert t["miss_cached"] < 0.1 * t["prefix_tokens"] < t["prefix_tokens"] <= t["hit_cached"]
        assert live.engine.metrics()["requests"] == 6
        with pytest.raises(ValueError, match="clients"):
            throughput(live.client, "m", 1, 0, 1)
