"""The model's parts: MLA modes and cache, routing, balancing, MTP, the loss and its parts."""

from __future__ import annotations

import pytest
import torch

from workbench import Model, ModelConfig
from workbench.model.moe import RoutedExperts, Router, sequence_balance_loss

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}

CONFIGS = {
    "tiny": ModelConfig.from_preset("tiny"),
    "no_q_lora": ModelConfig.from_preset("tiny", q_lora_rank=None, first_k_dense_replace=0),
    "yarn_softmax": ModelConfig.from_preset(
        "tiny", rope_scaling=YARN, scoring_func="softmax", n_group=1, topk_group=1, num_nextn_predict_layers=2
    ),
}


def _model(config: ModelConfig, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = Model(config).eval()
    for router in model.routers():  # non-zero balancing bias, as in a trained model
        router.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_naive_and_absorbed_attention_agree(name):
    model = _model(CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        naive = model(ids, attn_mode="naive").logits
        absorb = model(ids, attn_mode="absorb").logits
    assert naive.shape == (2, 24, model.config.vocab_size)
    torch.testing.assert_close(naive, absorb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["naive", "absorb"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_full_forward(name, mode):
    model = _model(CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids, attn_mode=mode).logits
        cache = model.new_cache()
        parts = [model(ids[:, :7], cache=cache, attn_mode=mode).logits]  # prefill
        parts.append(model(ids[:, 7:10], cache=cache, attn_mode=mode).logits)  # a chunk after a prefix
        for t in range(10, 20):  # then token by token
            parts.append(model(ids[:, t : t + 1], cache=cache, attn_mode=mode).logits)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_absorbed_cache_holds_only_latent_and_rope_key():
    config = CONFIGS["tiny"]
    model = _model(config)
    ids = torch.randint(0, config.vocab_size, (1, 10))
    sizes = {}
    for mode in ("naive", "absorb"):
        cache = model.new_cache()
        with torch.no_grad():
            model(ids, cache=cache, attn_mode=mode)
        sizes[mode] = cache.nbytes()
    per_token_layer = 4 * 10 * config.num_hidden_layers  # fp32 bytes x tokens x layers
    assert sizes["absorb"] == per_token_layer * (config.kv_lora_rank + config.qk_rope_head_dim)
    assert sizes["naive"] == per_token_layer * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)


def test_cache_truncate_rolls_back():
    model = _model(CONFIGS["tiny"])
    ids = torch.randint(0, 2048, (1, 12))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :10], cache=cache, attn_mode="absorb")
        a = model(ids[:, 10:11], cache=cache, attn_mode="absorb").logits
        model(ids[:, 11:12], cache=cache, attn_mode="absorb")
        cache.truncate(10)
        b = model(ids[:, 10:11], cache=cache, attn_mode="absorb").logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(99)


def test_positions_beyond_max_length_are_rejected():
    model = _model(CONFIGS["tiny"])
    ids = torch.zeros(1, model.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids)


# ---- routing ------------------------------------------------------------------------------------
def _router(**overrides) -> Router:
    config = ModelConfig.from_preset("tiny", **overrides)
    torch.manual_seed(0)
    router = Router(config)
    torch.nn.init.normal_(router.weight, 0, 0.5)
    return router


def test_group_limited_routing_stays_in_best_groups():
    router = _router(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    x = torch.randn(500, 96)
    idx, weight, scores = router(x)
    groups = idx // 4  # (N, k) group of each chosen expert
    assert all(len(set(g.tolist())) <= 2 for g in groups)
    # and the groups used are the two best by the sum of their top-2 scores
    group_scores = scores.view(500, 4, 4).topk(2, dim=-1).values.sum(-1)
    best = group_scores.topk(2, dim=-1).indices.sort(dim=-1).values
    for g, b in zip(groups, best):
        assert set(g.tolist()) <= set(b.tolist())


def test_gate_weights_are_normalised_unbiased_affinities():
    router = _router(routed_scaling_factor=2.5)
    router.e_score_correction_bias[3] = 10.0  # selection bias: expert 3 always chosen...
    x = torch.randn(64, 96)
    idx, weight, scores = router(x)
    assert (idx == 3).any(dim=-1).all()
    # ...but its weight comes from the unbiased sigmoid affinity, renormalised and scaled
    expected = scores.gather(1, idx)
    expected = expected / expected.sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(weight, expected)
    torch.testing.assert_close(weight.sum(-1), torch.full((64,), 2.5))


def test_grouped_mm_dispatch_equals_per_expert_loop(monkeypatch):
    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    experts = RoutedExperts(config)
    for p in experts.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(50, config.hidden_size)
    idx = torch.randint(0, config.n_routed_experts, (50, 2))
    w = torch.rand(50, 2)
    import workbench.model.moe as moe

    monkeypatch.setattr(moe, "_grouped_mm_ok", lambda x, w: False)  # the per-expert loop
    loop = experts(x, idx, w)
    # reference: token by token, expert by expert
    ref = torch.zeros_like(x)
    for t in range(50):
        for j in range(2):
            e = idx[t, j]
            h = torch.nn.functional.silu(x[t] @ experts.gate_proj[e].T) * (x[t] @ experts.up_proj[e].T)
            ref[t] += w[t, j] * (h @ experts.down_proj[e].T)
    torch.testing.assert_close(loop, ref, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(moe, "_grouped_mm_ok", lambda x, w: True)  # grouped_mm (also runs on CPU in fp32)
    torch.testing.assert_close(experts(x, idx, w), ref, atol=1e-5, rtol=1e-4)
    # and the gradients of the two paths agree
    grads = []
    for use in (False, True):
        monkeypatch.setattr(moe, "_grouped_mm_ok", lambda x, w, use=use: use)
        experts.zero_grad()
        (experts(x, idx, w) * torch.linspace(-1, 1, x.shape[1])).sum().backward()
        grads.append([p.grad.clone() for p in experts.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_no_token_is_dropped():
    model = _model(CONFIGS["tiny"])
    ids = torch.randint(0, 2048, (3, 16))
    with torch.no_grad():
        out = model(ids)
    for stats in out.routing:
        assert int(stats.counts.sum()) == 3 * 16 * model.config.num_experts_per_tok
        assert stats.topk_idx.shape == (3, 16, model.config.num_experts_per_tok)


def test_loss_free_bias_drives_maxvio_down_on_a_skewed_router():
    """A router that prefers a few experts: balancing by bias fixes it, no balancing does not."""
    config = ModelConfig.from_preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=2)
    torch.manual_seed(0)
    x = torch.randn(2048, config.hidden_size)

    def maxvio_after(gamma: float, steps: int = 300) -> tuple[float, float]:
        torch.manual_seed(1)  # the same skewed router for both runs
        router = Router(config)
        torch.nn.init.normal_(router.weight, 0, 0.02)
        with torch.no_grad():
            router.weight[:3] += 0.3 * x.mean(0) / x.mean(0).norm()  # experts 0-2 favoured...
            router.weight[:3] *= 8  # ...strongly
        first = None
        for _ in range(steps):
            idx, _, _ = router(x)
            counts = torch.bincount(idx.view(-1), minlength=16).float()
            vio = float((counts.max() - counts.mean()) / counts.mean())
            first = vio if first is None else first
            router.update_bias(counts, gamma)
        return first, vio

    start, balanced = maxvio_after(gamma=1e-2)
    _, unbalanced = maxvio_after(gamma=0.0)
    assert start > 1.0, "the router should start badly skewed"
    assert unbalanced == pytest.approx(start)
    assert balanced < 0.25 * start


def test_sequence_balance_loss_is_one_when_balanced_and_large_when_collapsed():
    E, k, T = 8, 2, 16
    uniform = torch.full((1, T, E), 0.5)
    balanced_idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], dim=-1)[None]  # every expert 4x
    assert float(sequence_balance_loss(uniform, balanced_idx, E)) == pytest.approx(1.0)
    collapsed_scores = torch.zeros(1, T, E)
    collapsed_scores[..., :2] = 1.0
    collapsed_idx = torch.tensor([0, 1]).expand(1, T, 2)
    assert float(sequence_balance_loss(collapsed_scores, collapsed_idx, E)) == pytest.approx(E / k)


# ---- the objective ------------------------------------------------------------------------------
def test_loss_is_main_plus_weighted_mtp_plus_weighted_balance():
    config = CONFIGS["yarn_softmax"].replace(mtp_loss_weight=0.5, seq_aux_loss_alpha=0.01)
    model = _model(config)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    assert len(out.mtp_losses) == 2
    expected = out.main_loss + 0.5 * torch.stack(out.mtp_losses).mean() + 0.01 * out.balance_loss
    torch.testing.assert_close(out.loss, expected)
    # main loss: position i predicts token i+1; MTP depth d: position i predicts token i+1+d
    logits = out.logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.main_loss, manual)
    assert set(out.loss_parts()) == {"loss", "main_loss", "mtp_loss", "balance_loss"}


def test_mtp_depth_one_predicts_two_ahead():
    config = CONFIGS["tiny"]
    model = _model(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    # recompute the MTP branch by hand
    mtp = model.mtp[0]
    cos, sin = model.rope(0, 12)
    ahead = torch.nn.functional.pad(ids[:, 1:], (0, 1))
    h, _ = mtp(out.hidden, model.embed_tokens(ahead), cos, sin)
    lg = model.lm_head(mtp.shared_head.norm(h))
    manual = torch.nn.functional.cross_entropy(lg[:, :-2].reshape(-1, config.vocab_size), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp_losses[0], manual)


def test_gradients_reach_every_trained_parameter():
    model = _model(CONFIGS["tiny"]).train()
    ids = torch.randint(0, 2048, (4, 32))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(not b.requires_grad for n, b in model.named_buffers())


def test_update_expert_bias_checks_the_number_of_layers():
    model = _model(CONFIGS["tiny"])
    ids = torch.randint(0, 2048, (2, 8))
    out = model(ids)  # no MTP in this forward: fewer routing stats than routers
    with pytest.raises(ValueError, match="MoE layers"):
        model.update_expert_bias(out.routing)
    out = model(ids, compute_mtp=True)
    before = [r.e_score_correction_bias.clone() for r in model.routers()]
    model.update_expert_bias(out.routing, gamma=0.1)
    assert any(not torch.equal(b, r.e_score_correction_bias) for b, r in zip(before, model.routers()))


# ---- growing a MoE: the model's own seam ---------------------------------------------------------
def test_grow_experts_is_exact_dormant_and_recorded_in_the_config():
    base = _model(CONFIGS["tiny"]).double()
    grown = _model(CONFIGS["tiny"]).double()
    grown.load_state_dict(base.state_dict())
    E, G = base.config.n_routed_experts, base.config.n_group
    moe_idx = [b.mlp.layer_idx for b in [*base.layers, *base.mtp] if b.is_moe]
    live = moe_idx[:1]
    layout = grown.grow_experts(G, live, init="random", generator=torch.Generator().manual_seed(0))
    assert grown.config.n_routed_experts == E + G and base.config.n_routed_experts == E  # a new config
    assert grown.config.inactive_experts == {i: layout.new for i in moe_idx if i not in live}
    ids = torch.randint(0, 2048, (2, 16))
    a, b = base(ids, labels=ids), grown(ids, labels=ids)
    assert torch.equal(a.logits, b.logits)  # dormant and inactive experts change nothing
    for sa, sb in zip(a.routing, b.routing):
        assert torch.equal(torch.tensor(layout.old_to_new)[sa.topk_idx], sb.topk_idx)
    # an inactive expert is never chosen whatever its bias; a dormant one is, once its bias is raised
    for router in grown.routers():
        router.e_score_correction_bias[layout.new] = 100.0
    chosen = grown(ids).routing
    for i, stats in zip(moe_idx, chosen):
        picked_new = torch.isin(stats.topk_idx, torch.tensor(layout.new)).any()
        assert bool(picked_new) == (i in live)


def test_balancing_moves_only_active_experts_in_the_mask():
    model = _model(CONFIGS["tiny"])
    model.grow_experts(model.config.n_group, live_layers=[])  # every new slot inactive
    router = model.routers()[0]
    active = router.active.clone()
    before = router.e_score_correction_bias.clone()
    counts = torch.arange(router.n_experts, dtype=torch.float32)  # skewed load
    mask = torch.zeros(router.n_experts, dtype=torch.bool)
    mask[0] = True
    router.update_bias(counts, 0.1, mask=mask)
    moved = router.e_score_correction_bias != before
    assert moved.tolist() == mask.tolist()  # only expert 0 moved
    router.update_bias(counts, 0.1)
    moved = router.e_score_correction_bias != before
    assert not moved[~active].any() and moved[active].any()  # inactive experts never move


def test_a_grown_model_saves_and_loads_with_its_inactive_experts(tmp_path):
    from safetensors.torch import load_file

    from workbench import load_hf, save_hf

    model = _model(CONFIGS["tiny"])
    layout = model.grow_experts(model.config.n_group, live_layers=[1])
    save_hf(model, tmp_path / "m")
    back = load_hf(tmp_path / "m")
    assert back.config == model.config
    for a, b in zip(model.routers(), back.routers()):
        assert torch.equal(a.active, b.active)
    bias = load_file(str(tmp_path / "m" / "model.safetensors"))["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert torch.isinf(bias[layout.new]).all()  # other readers (transformers) never route there either
    ids = torch.randint(0, 2048, (1, 12))
    assert torch.equal(model.eval()(ids).logits, back(ids).logits)
