"""Adding a vertical: growing the MoE layers, training only what was added, saving the grown model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from workbench.config import ConfigError
from workbench.io.files import CheckpointError
from workbench.io.hf import load_hf
from workbench.io.tokenizer import load_tokenizer
from workbench.tasks import get_task
from workbench.vertical import (
    INITS,
    AddedExperts,
    VerticalConfig,
    add_expert,
    fit_probe,
    load_vertical,
    moe_layers,
    run_vertical,
    save_vertical,
    selection_rate,
    train_only_new_experts,
    train_vertical,
    vertical_dataset,
    wake_experts,
)

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-model"


@pytest.fixture(scope="module")
def base():
    return load_hf(TINY)


@pytest.fixture(scope="module")
def data():
    tok = load_tokenizer()
    cfg = VerticalConfig(steps=3, batch_size=4, eval_every=0, n_new_docs=60, n_old_docs=120)
    ds = vertical_dataset(get_task("roman"), cfg, tok)
    g = torch.Generator().manual_seed(0)
    new_ids, _ = ds.domain_batch("roman", "val", 4, 48, g)
    old_ids = torch.cat([ds.domain_batch(d, "val", 1, 48, g)[0] for d in ds.domains if d != "roman"])
    return cfg, ds, new_ids, old_ids


def _routing(model, ids):
    with torch.no_grad():
        out = model(ids, compute_mtp=True)
    return out.logits, [s.topk_idx for s in out.routing]


@pytest.mark.parametrize("init", INITS)
def test_parameter_count_grows_by_exactly_the_new_experts(base, init):
    c = base.config
    grown, added = add_expert(base, n=2, init=init)
    n_moe = len(moe_layers(base))  # every MoE layer gets the slots, MTP's included
    per_expert = 3 * c.moe_intermediate_size * c.hidden_size + c.hidden_size  # three matrices + router row
    assert grown.num_parameters() - base.num_parameters() == 2 * per_expert * n_moe == added.params_added
    assert added.params_live == 2 * per_expert * len(added.layers)
    assert grown.config.n_routed_experts == c.n_routed_experts + 2 and base.config.n_routed_experts == 8
    assert base.num_parameters() == added.params_before  # the base is not touched


@pytest.mark.parametrize("init", INITS)
def test_dormant_new_experts_leave_the_base_function_unchanged(base, data, init):
    _, _, new_ids, old_ids = data
    ids = torch.cat([new_ids, old_ids])
    # in float64 the grown model computes exactly what the base computes: same experts, same logits
    base64 = copy.deepcopy(base).double()
    grown, added = add_expert(base64, n=2, init=init, probe_ids=new_ids)
    base_logits, base_topk = _routing(base64, ids)
    grown_logits, grown_topk = _routing(grown, ids)
    remap = torch.tensor(added.old_to_new)
    for b, g in zip(base_topk, grown_topk):  # every token picks the same experts (at their new indices)
        assert torch.equal(remap[b], g)
    assert torch.equal(grown_logits, base_logits)
    assert selection_rate(grown, added, ids) == {i: 0.0 for i in added.layers}
    # (in float32 the router's matmul has more rows and BLAS may sum in another order: equal to rounding)


def test_copy_uses_the_expert_the_domain_uses_most_and_keeps_groups(base, data):
    _, _, new_ids, _ = data
    grown, added = add_expert(base, n=2, init="copy", probe_ids=new_ids)
    assert added.new_experts == [4, 9] and added.old_to_new == [0, 1, 2, 3, 5, 6, 7, 8]  # one per group of 4
    for layer, srcs in added.sources.items():
        old, new = moe_layers(base)[layer].experts, moe_layers(grown)[layer].experts
        for slot, src in zip(added.new_experts, srcs):
            assert src // 4 == slot // 5  # copied from its own group
            assert torch.equal(new.gate_proj[slot], old.gate_proj[src])
    grown, added = add_expert(base, n=2, init="average", layers=[2])
    assert added.layers == [2] and added.absent_layers == [1, 3]
    gate = moe_layers(grown)[1].gate  # absent: the new slots are never routed, the old ones are
    assert not gate.active[added.new_experts].any() and gate.active[added.old_to_new].all()
    assert grown.config.inactive_experts == {1: added.new_experts, 3: added.new_experts}
    avg = moe_layers(base)[2].experts.down_proj.mean(dim=0)
    torch.testing.assert_close(moe_layers(grown)[2].experts.down_proj[4], avg)


def test_bad_growth_requests_say_what_to_do(base):
    with pytest.raises(ConfigError, match="n_group=2.*use n=2"):
        add_expert(base, n=1)
    with pytest.raises(ConfigError, match="init must be one of"):
        add_expert(base, n=2, init="clone")
    with pytest.raises(ConfigError, match="not MoE layers"):
        add_expert(base, n=2, layers=[0])  # layer 0 is dense
    with pytest.raises(ConfigError, match="source=9"):
        add_expert(base, n=2, source=9)


def test_wake_routes_the_asked_share_of_new_domain_tokens(base, data):
    _, _, new_ids, old_ids = data
    grown, added = add_expert(base, n=2, probe_ids=new_ids)
    report = wake_experts(grown, added, new_ids, old_ids, rate=0.5)
    for layer in added.layers:
        assert report["new"][layer] == pytest.approx(0.5, abs=0.05)
        assert report["old"][layer] < report["new"][layer]  # the probe separates the domains
    assert selection_rate(grown, added, new_ids) == report["new"]


def test_only_the_new_experts_receive_gradients(base, data):
    _, _, new_ids, old_ids = data
    grown, added = add_expert(base, n=2, probe_ids=new_ids)
    wake_experts(grown, added, new_ids, old_ids, rate=0.5)
    ids = torch.cat([new_ids, old_ids])
    tokens = [5, 6]
    with train_only_new_experts(grown, added, train_tokens=tokens) as trainable:
        grown(ids, labels=ids).loss.backward()
        new = torch.zeros(10, dtype=torch.bool)
        new[added.new_experts] = True
        for name, p in grown.named_parameters():
            if p.grad is None:  # frozen whole (the set of tensors with a gradient is checked below)
                continue
            rows = torch.zeros(p.shape[0], dtype=torch.bool)
            rows[tokens if p.shape[0] == grown.config.vocab_size else added.new_experts] = True
            assert p.grad[~rows].abs().sum() == 0, name  # old experts, old router rows, other tokens: zero
            assert p.grad[rows].abs().sum() > 0, name
        grads = {n for n, p in grown.named_parameters() if p.grad is not None}
        assert grads == {f"layers.{i}.mlp.{t}" for i in added.layers for t in (
            "experts.gate_proj", "experts.up_proj", "experts.down_proj", "gate.weight")} | {
            "embed_tokens.weight", "lm_head.weight"}  # fmt: skip
        per_expert = 3 * 48 * 96 + 96
        assert trainable.parameters == 2 * per_expert * len(added.layers) + 2 * 2 * 96
    # on exit the model is trainable as a whole again
    assert all(p.requires_grad for p in grown.parameters())
    assert all(not hasattr(m.gate, "bias_update_mask") for m in moe_layers(grown).values())  # no hidden state


def test_vertical_training_changes_only_what_was_added(base, data):
    cfg, ds, new_ids, old_ids = data
    grown, added = add_expert(base, n=2, probe_ids=new_ids)
    wake_experts(grown, added, new_ids, old_ids, rate=0.5)
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    report = train_vertical(grown, added, get_task("roman"), cfg, dataset=ds, progress=False)
    after = grown.state_dict()
    new = added.new_experts
    old = added.old_to_new
    changed = set()
    for k, v in before.items():
        if torch.equal(v, after[k]):
            continue
        changed.add(k)
        if k.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj", "gate.weight")):
            assert torch.equal(v[old], after[k][old]), f"{k}: an old expert moved"  # bit for bit
            assert not torch.equal(v[new], after[k][new]), k
        elif k.endswith("e_score_correction_bias"):
            assert torch.equal(v[old], after[k][old]), f"{k}: balancing moved an old expert's bias"
        else:  # the embedding / head rows of the tokens the base never saw
            rows = torch.tensor(added.train_tokens)
            keep = torch.ones(v.shape[0], dtype=torch.bool)
            keep[rows] = False
            assert k in ("embed_tokens.weight", "lm_head.weight") and torch.equal(v[keep], after[k][keep]), k
    assert {f"layers.{i}.mlp.experts.down_proj" for i in added.layers} <= changed
    assert added.train_tokens and len(report.metrics) == cfg.steps
    assert 0 < report.trainable.fraction < 0.1 and 0 < report.flops_saved < 1


def test_grown_model_saves_and_loads_like_any_other(base, data, tmp_path):
    cfg, ds, new_ids, old_ids = data
    grown, added = add_expert(base, n=2, layers=[1], probe_ids=new_ids)
    wake_experts(grown, added, new_ids, old_ids, rate=0.5)
    save_vertical(grown, added, tmp_path / "grown")
    loaded, added2 = load_vertical(tmp_path / "grown")
    assert added2 == added
    assert loaded.config.n_routed_experts == 10
    ids = torch.cat([new_ids, old_ids])
    a, ta = _routing(grown, ids)
    b, tb = _routing(loaded, ids)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert torch.isinf(moe_layers(loaded)[2].gate.e_score_correction_bias[added.new_experts]).all()
    plain = load_hf(tmp_path / "grown")  # no vertical.json needed to use it
    assert torch.equal(plain(ids).logits, a)
    with pytest.raises(FileNotFoundError, match="no grown model"):
        AddedExperts.load(TINY)


def test_wake_keeps_the_old_domain_within_the_forgetting_budget(base, data):
    _, _, new_ids, old_ids = data
    for probe in ("logistic", "mean"):
        grown, added = add_expert(base, n=2, probe_ids=new_ids)
        report = wake_experts(grown, added, new_ids, old_ids, old_rate=0.1, probe=probe)
        for layer in added.layers:
            assert report["old"][layer] <= 0.1
        assert selection_rate(grown, added, old_ids) == report["old"]
    with pytest.raises(ValueError, match="probe must be one of"):
        wake_experts(grown, added, new_ids, old_ids, probe="svm")


def test_fit_probe_separates_two_clouds():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    x_new = torch.randn(200, 16, generator=g) + direction
    x_old = torch.randn(300, 16, generator=g) - direction
    w = fit_probe(x_new, x_old)
    accuracy = ((x_new @ w > 0).float().mean() + (x_old @ w < 0).float().mean()) / 2
    assert accuracy > 0.9 and torch.nn.functional.cosine_similarity(w, direction, dim=0) > 0.8


def test_run_vertical_grows_trains_and_reports(tmp_path):
    out = tmp_path / "run"
    kw = dict(replay_task=None, steps=3, grpo_steps=1, progress=False)
    report = run_vertical(TINY, "roman", out, **kw)
    summary = report["summary"]
    assert set(summary["accuracy"]) == {"base", "cold_start", "grpo"} and "trained" in summary
    saved = json.loads((out / "report.json").read_text())
    assert saved["added"]["n"] == 4 and saved["stages"]["grpo"]["new_expert_share"]
    grown, added = load_vertical(out / "model")
    assert grown.config.n_routed_experts == 12 and added.train_tokens
    with pytest.raises(CheckpointError, match="overwrite"):  # the model folder exists: refused
        run_vertical(TINY, "roman", out, **kw)
