"""Expert parallelism on gloo: the split layer computes what the whole layer computes (forward and every
gradient), node-limited routing never uses more than M nodes, and the counted traffic matches the closed form."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench import Model, ModelConfig
from workbench.dist.comm import expected_traffic
from workbench.dist.expert_parallel import ExpertParallelMoE, gather_expert_grads, global_traffic, shard_experts
from workbench.dist.process import launch
from workbench.model.moe import Router

# 16 experts, top-4, 4 groups all allowed: tokens spread over every rank unless the node limit says otherwise
EP = ModelConfig.from_preset("tiny", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=4)


def _layer_and_data(n_tokens: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    moe = Model(EP).double().layers[1].mlp
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, n_tokens // 4, EP.hidden_size, dtype=torch.float64, generator=gen)  # (B, T, D)
    g = torch.randn(x.shape, dtype=torch.float64, generator=gen)  # the upstream gradient
    return moe, x, g


def _split_layer(ranks_per_node: int, max_nodes: int | None):
    moe, x, g = _layer_and_data()
    rank, world = dist.get_rank(), dist.get_world_size()
    if max_nodes:
        moe.gate.limit_nodes(world // ranks_per_node, max_nodes)
    layer = ExpertParallelMoE(moe, ranks_per_node)
    xs = x.chunk(world)[rank].clone().requires_grad_()
    y, stats = layer(xs)
    (y * g.chunk(world)[rank]).sum().backward()
    replicated = {n: p.grad.clone() for n, p in layer.named_parameters() if not n.startswith("experts.")}
    for grad in replicated.values():
        dist.all_reduce(grad)  # the router and shared expert are replicated: their gradients add up
    return {"y": y.detach(), "x_grad": xs.grad, "experts": gather_expert_grads(layer), "replicated": replicated,
            "nodes": layer.traffic.max_nodes_seen, "counts": stats.counts}  # fmt: skip


def _check_against_one_process(world: int, ranks_per_node: int, max_nodes: int | None) -> None:
    moe, x, g = _layer_and_data()
    if max_nodes:
        moe.gate.limit_nodes(world // ranks_per_node, max_nodes)
    x = x.clone().requires_grad_()
    y, stats = moe(x)
    (y * g).sum().backward()
    ranks = launch(_split_layer, world, ranks_per_node, max_nodes)
    tol = dict(rtol=0, atol=1e-12)  # float64: only the order of sums differs
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), y, **tol)
    assert torch.allclose(torch.cat([r["x_grad"] for r in ranks]), x.grad, **tol)
    for name, grad in ranks[0]["experts"].items():
        assert torch.allclose(grad, getattr(moe.experts, name).grad, **tol), name
    for name, grad in ranks[0]["replicated"].items():
        assert torch.allclose(grad, dict(moe.named_parameters())[name].grad, **tol), name
    assert torch.equal(sum(r["counts"] for r in ranks), stats.counts)  # the global loads
    if max_nodes:
        assert max(r["nodes"] for r in ranks) <= max_nodes


@pytest.mark.parametrize("max_nodes", [None, 1])
def test_two_ranks_compute_the_whole_layer(max_nodes):
    _check_against_one_process(2, 1, max_nodes)


@pytest.mark.slow
@pytest.mark.parametrize(("ranks_per_node", "max_nodes"), [(1, None), (2, None), (2, 1), (1, 2)])
def test_four_ranks_in_nodes_compute_the_whole_layer(ranks_per_node, max_nodes):
    _check_against_one_process(4, ranks_per_node, max_nodes)


# ---- node-limited routing (one process) ------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from([(16, 4, 4, 4), (16, 4, 2, 4), (16, 2, 2, 1), (32, 8, 4, 8), (32, 1, 1, 4), (8, 2, 1, 2)]),
    k=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_node_limited_routing_never_uses_more_than_m_nodes(layout, k, seed, data):
    E, n_group, topk_group, n_nodes = layout
    per_node = E // n_nodes
    max_nodes = data.draw(st.integers(max(1, -(-k // per_node)), n_nodes))
    k = min(k, topk_group * (E // n_group))
    cfg = ModelConfig.from_preset("tiny", n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
                                  topk_group=topk_group)  # fmt: skip
    torch.manual_seed(seed)
    router = Router(cfg, 1)
    torch.nn.init.normal_(router.weight, 0.0, 1.0)
    router.e_score_correction_bias.normal_(0.0, 0.1)
    x = torch.randn(64, cfg.hidden_size)
    free_idx, _, _ = router(x)
    router.limit_nodes(n_nodes, max_nodes)
    idx, weight, _ = router(x)
    nodes = [len(set((row // per_node).tolist())) for row in idx]
    assert max(nodes) <= max_nodes
    assert all(len(set(row.tolist())) == k for row in idx)  # k distinct experts, never a masked one
    assert torch.isfinite(weight).all()
    router.limit_nodes(n_nodes, n_nodes)  # every node allowed: the router's own choice
    assert torch.equal(router(x)[0], free_idx)
    router.limit_nodes(None)
    assert torch.equal(router(x)[0], free_idx)


def test_node_limits_that_cannot_work_are_refused_with_the_fix():
    router = Router(EP, 1)
    with pytest.raises(ValueError, match="n_nodes among"):
        router.limit_nodes(3, 1)
    with pytest.raises(ValueError, match="max_nodes >= 2"):  # nodes of 2 experts, a token needs 4
        Router(EP.replace(n_group=1, topk_group=1), 1).limit_nodes(8, 1)
    with pytest.raises(ValueError, match="whole routing groups"):
        Router(EP.replace(n_group=2, topk_group=2), 1).limit_nodes(4, 2)


# ---- the traffic of real exchanges against the closed form -------------------------------------------
def _traffic(ranks_per_node: int, max_nodes: int | None, n_tokens: int):
    torch.manual_seed(0)
    model = Model(EP)
    shard_experts(model, ranks_per_node, max_nodes)
    gen = torch.Generator().manual_seed(10 + dist.get_rank())
    with torch.no_grad():
        model(torch.randint(0, EP.vocab_size, (4, n_tokens // 4), generator=gen))
    return global_traffic(model).per_token()


@pytest.mark.parametrize(("ranks_per_node", "max_nodes"), [(1, None), (1, 1)])
def test_counted_traffic_matches_the_closed_form(ranks_per_node, max_nodes):
    """An untrained router routes nearly uniformly: the copies per token match the expectation closely."""
    world = 2
    got = launch(_traffic, world, ranks_per_node, max_nodes, 512)[0]
    want = expected_traffic(16, 4, world, ranks_per_node, n_group=4, topk_group=4, max_nodes=max_nodes)
    for name in ("copies_to_self", "copies_inter_node"):
        assert abs(got[name] - want[name]) <= 0.1 * max(want[name], 0.1), (name, got[name], want[name])
    if max_nodes:
        assert got["max_nodes_per_token"] <= max_nodes
        assert got["bytes_inter_node"] < got["bytes_without_dedup"]
