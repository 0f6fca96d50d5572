"""Analysis helpers the lessons measure with: knock-outs, post-hoc KV compression, per-unit outputs,
training FLOPs, and the claims ledger's rules."""

from __future__ import annotations

import json

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.analysis import claims, cost, kv, outputs, routing
from workbench.analysis.stats import Estimate, Verdict


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Model(ModelConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 2048, (2, 16), generator=g) for _ in range(2)]


def _moe(model):
    return next(b.mlp for b in model.layers if b.is_moe)


def test_knock_outs_change_the_output_and_restore_it(model, batches):
    ids = batches[0]
    before = model(ids).logits
    moe = _moe(model)
    for ctx in (
        routing.shared_expert_off(moe),
        routing.routed_expert_off(moe, 0),
        routing.routed_expert_masked(moe, 0),
    ):
        with ctx:
            during = model(ids).logits
        assert not torch.equal(during, before)
        assert torch.equal(model(ids).logits, before)


def test_routed_off_keeps_routing_while_mask_reroutes(model, batches):
    ids = batches[0]
    moe = _moe(model)
    chosen = model(ids).routing[0].topk_idx
    with routing.routed_expert_off(moe, 0):
        assert torch.equal(model(ids).routing[0].topk_idx, chosen)
    with routing.routed_expert_masked(moe, 0):
        assert not (model(ids).routing[0].topk_idx == 0).any()
    with pytest.raises(ValueError, match="expert must be in"), routing.routed_expert_off(moe, 99):
        pass


def test_effective_experts_counts_spread():
    usage = torch.zeros(1, 2, 8)
    usage[0, 0, :2] = 0.5  # two experts, evenly
    usage[0, 1, :] = 1 / 8  # all eight
    eff = routing.effective_experts(usage)
    assert eff[0, 0].item() == pytest.approx(2.0) and eff[0, 1].item() == pytest.approx(8.0)


def test_kv_compression_at_full_rank_changes_nothing_and_lower_rank_does(model, batches):
    r = model.config.kv_lora_rank
    ids = batches[0]
    base = model(ids).logits
    full = kv.fit_kv_compression(model, batches, r)
    with kv.compressed_kv(model, full):
        assert torch.allclose(model(ids).logits, base, atol=1e-4)
    low = kv.fit_kv_compression(model, batches, 2)
    with kv.compressed_kv(model, low):
        assert not torch.allclose(model(ids).logits, base, atol=1e-4)
    assert torch.equal(model(ids).logits, base)  # hooks removed
    assert kv.full_kv_rank(model.config) == 4 * (16 + 16)
    with pytest.raises(ValueError, match="rank must be"):
        kv.fit_kv_compression(model, batches, r + 1)


def test_outputs_per_unit(model, batches):
    losses = outputs.sequence_losses(model, batches)
    assert len(losses) == 4 and all(x > 0 for x in losses)
    assert outputs.sequence_agreement(model, model, batches) == [1.0] * 4
    main, mtp = outputs.main_and_mtp_losses(model, batches)
    assert len(main) == len(mtp) == 2
    same, first = outputs.same_text([[1, 2, 3], [1, 2]], [[1, 2, 3], [1, 5]])
    assert same == [True, False] and first == [None, 1]
    samples = [("q1", "<think>x</think>", 1.0, 1.0), ("q1", "a", 0.0, 0.0), ("q2", "b", 1.0, 0.0)]
    assert outputs.per_problem_accuracy(samples) == {"q1": 0.5, "q2": 1.0}
    split = outputs.reasoning_split(samples)
    assert split["right"] == {"reasoned": 1, "direct": 1} and split["total"] == {"reasoned": 1, "direct": 2}
    with pytest.raises(ValueError, match="different problems"):
        outputs.paired_rates({"a": 1.0}, {"b": 1.0})


def test_mtp_costs_more_flops_than_it_reads():
    tiny = ModelConfig.from_preset("tiny")
    assert cost.mtp_overhead(tiny, 128) == pytest.approx(0.64, abs=0.01)
    no_mtp = tiny.replace(num_nextn_predict_layers=0)
    assert cost.pretrain_flops(tiny, 10, 16, 128) == pytest.approx(
        cost.pretrain_flops(no_mtp, 10, 16, 128) * (1 + cost.mtp_overhead(tiny, 128))
    )
    rows = [{"completion_tokens": 320}, {"completion_tokens": 320}]
    one = cost.sft_flops(no_mtp, rows[:1], 10, 32)
    assert cost.sft_flops(no_mtp, rows, 10, 32) == pytest.approx(2 * one)
    with pytest.raises(ValueError, match="no SFT step"):
        cost.sft_flops(no_mtp, [{"loss": 1.0}], 10, 32)


def _verdict(lo, hi, n=5):
    return Verdict("A", "B", Estimate((lo + hi) / 2, 0.1, lo, hi, n, unit="seeds"), metric="m", knob="seeds")


def test_claim_labels_follow_their_rules():
    label, rule = claims.judge(_verdict(0.1, 0.2), holds=["a"], fails=["b"])
    assert label == "holds" and claims.expected_label(rule) == label
    assert claims.judge(_verdict(-0.2, 0.2), holds=["a"], fails=["b"])[0] == "cannot tell at this scale"
    assert claims.compare_figure(571e9, 671.03e9)[0] == "misquoted"
    assert claims.compare_figure(5.6e6, 5.576e6)[0] == "holds"
    assert claims.threshold(1.0, 0.5, "below")[0] == "does not hold"
    both = claims.combine(claims.compare_figure(5.6e6, 5.576e6), claims.threshold(1.0, 0.5, "below"))
    assert both[0] == "does not hold" and claims.expected_label(both[1]) == both[0]
    with pytest.raises(ValueError, match="does not follow"):
        claims.Finding("params-571", "holds", "x", claims.compare_figure(571e9, 671.03e9)[1])
    with pytest.raises(ValueError, match="unknown claim"):
        claims.claim("nope")
    assert claims.judge(_verdict(0.1, 0.2), misquoted=["a"])[0] == "misquoted"
    with pytest.raises(ValueError, match="two labels"):
        claims.judge(_verdict(0.1, 0.2), holds=["a"], fails=["a"])


def test_claims_link_to_their_sections():
    assert claims.anchor("1. Two eight-bit formats") == "1-two-eight-bit-formats"
    assert claims.link("fp8-rounding").startswith("[1. Two eight-bit formats](06_fp8.ipynb#")
    assert len({c.id for c in claims.CLAIMS}) == len(claims.CLAIMS)


def test_findings_are_collected_from_executed_notebooks(tmp_path):
    f = claims.Finding.of("params-571", claims.compare_figure(571e9, 671.03e9), "671.03B counted")
    out = {
        "output_type": "display_data",
        "data": {"text/markdown": f.markdown()},
        "metadata": {claims.CLAIM_KEY: f.record()},
    }
    nb = {"cells": [{"cell_type": "code", "outputs": [out], "source": ""}], "metadata": {}, "nbformat": 4}
    (tmp_path / "05_economics.ipynb").write_text(json.dumps(nb))
    found = claims.collect_findings(tmp_path)
    assert found["params-571"][0]["label"] == "misquoted" and found["params-571"][0]["executed"] == "05_economics.ipynb"
    assert claims.collect_findings(tmp_path / "missing") == {}
