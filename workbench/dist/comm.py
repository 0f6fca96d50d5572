"""What expert parallelism communicates: the closed form, and DeepSeek-V3's H800 cluster in numbers.

A MoE layer under expert parallelism sends each token's hidden state to the ranks that hold its experts
and receives the weighted outputs back (``workbench.dist.expert_parallel``). How many copies leave a rank
per token, and over which link, depends only on where the chosen experts live. Under *uniform* routing
(every allowed expert equally likely, which a well-balanced router approaches) it has a closed form: a
token choosing k of the A experts it may use misses rank j, which holds a_j of them, with probability
C(A - a_j, k) / C(A, k) (hypergeometric), so

    E[copies to rank j] = 1 - C(A - a_j, k) / C(A, k)

summed over the ranks of the token's own node (NVLink, or no link for its own rank) and of the others
(InfiniBand). Group-limited routing (``topk_group`` of ``n_group`` groups) and node-limited routing (M of
the nodes) restrict the allowed set; ``expected_traffic`` averages over the allowed sets, drawn
uniformly too, and over the token's home rank. The measured ``Traffic`` of a real exchange is compared
with it (lesson 11), and ``v3_cluster_figures`` applies it to the 671B config on DeepSeek's cluster.

The cluster facts (DeepSeek-V3 technical report, also in the project's DESIGN notes): 8 H800 GPUs per
node on NVLink (~160 GB/s), nodes on InfiniBand (~50 GB/s per GPU), 20 of each GPU's 132 SMs reserved for
communication, each token's experts on at most M = 4 nodes, dispatch in FP8 (with one float scale per
128 values), combine in BF16. Where it simplifies: bandwidths are taken as sustained, latency and
congestion are ignored, and the compute side is a FLOP count at an assumed utilisation.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Any

from workbench.config import ModelConfig

NVLINK_GBPS = 160.0  # GB/s between GPUs of a node (H800, as DeepSeek-V3 reports it)
IB_GBPS = 50.0  # GB/s per GPU between nodes (InfiniBand)
SMS_TOTAL = 132  # streaming multiprocessors of an H800
SMS_COMM = 20  # of them reserved for communication in DeepSeek-V3's training
H800_BF16_TFLOPS = 989.0  # dense peak (same as an H100 SXM); FP8 doubles it
H800_FP8_TFLOPS = 1979.0
FP8_DISPATCH_BYTES = 1 + 4 / 128  # per value: one FP8 byte plus a float32 scale per 128 values
BF16_COMBINE_BYTES = 2
_MAX_SETS = 200_000
_FLOPS: dict[tuple[str, int], float] = {}


def _miss(allowed: int, held: int, k: int) -> float:
    """P(a token drawing k of ``allowed`` experts uniformly uses none of the ``held`` ones)."""
    return math.comb(allowed - held, k) / math.comb(allowed, k)


def expected_traffic(
    n_experts: int,
    k: int,
    ranks: int,
    ranks_per_node: int = 1,
    n_group: int = 1,
    topk_group: int = 1,
    max_nodes: int | None = None,
) -> dict[str, float]:
    """Expected copies of one token's hidden state per MoE layer dispatch, under uniform routing.

    Experts are placed as expert parallelism places them (rank r: experts r*E/R .. (r+1)*E/R - 1; node n:
    ranks n*rpn .. (n+1)*rpn - 1); groups are consecutive experts. Returns ``copies_to_self``,
    ``copies_intra_node``, ``copies_inter_node`` (a copy per rank visited, as our exchange sends them),
    ``node_hops`` (a copy per other node visited, as a two-hop dispatch sends over InfiniBand) and
    ``nodes_per_token`` (nodes visited, the own one included).
    """
    E, R, rpn = n_experts, ranks, ranks_per_node
    for name, value in (("n_experts", E), ("k", k), ("ranks", R), ("ranks_per_node", rpn), ("n_group", n_group)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if E % R or R % rpn or E % n_group or not 1 <= topk_group <= n_group or k > E:
        raise ValueError(
            f"need ranks | n_experts, ranks_per_node | ranks, n_group | n_experts, 1 <= topk_group <= n_group and "
            f"k <= n_experts; got E={E}, ranks={R}, ranks_per_node={rpn}, n_group={n_group}, topk_group={topk_group}"
        )
    nodes, per_rank, per_group = R // rpn, E // R, E // n_group
    if max_nodes is not None and not 1 <= max_nodes <= nodes:
        raise ValueError(f"max_nodes must be between 1 and the {nodes} nodes, got {max_nodes}")
    node_sets = list(itertools.combinations(range(nodes), max_nodes)) if max_nodes else [tuple(range(nodes))]
    per_node = E // nodes
    totals = {"copies_to_self": 0.0, "copies_intra_node": 0.0, "copies_inter_node": 0.0, "node_hops": 0.0,
              "nodes_per_token": 0.0}  # fmt: skip
    weight_sum = 0.0
    for node_set in node_sets:
        node_experts = {e for n in node_set for e in range(n * per_node, (n + 1) * per_node)}
        groups = [
            g for g in range(n_group) if any(e in node_experts for e in range(g * per_group, (g + 1) * per_group))
        ]
        picks = min(topk_group, len(groups)) if n_group > 1 else len(groups)
        group_sets = list(itertools.combinations(groups, picks))
        if len(node_sets) * len(group_sets) > _MAX_SETS:
            raise ValueError(f"{len(node_sets) * len(group_sets)} allowed sets are too many to average exactly")
        for group_set in group_sets:
            allowed = sorted(
                e for g in group_set for e in range(g * per_group, (g + 1) * per_group) if e in node_experts
            )
            A = len(allowed)
            if k > A:
                continue
            held_rank = [0] * R
            for e in allowed:
                held_rank[e // per_rank] += 1
            hit_rank = [1 - _miss(A, h, k) for h in held_rank]  # (R,) P(the token visits rank j)
            hit_node = [1 - _miss(A, sum(held_rank[n * rpn : (n + 1) * rpn]), k) for n in range(nodes)]
            node_sum = [sum(hit_rank[n * rpn : (n + 1) * rpn]) for n in range(nodes)]
            w = 1.0 / (len(node_sets) * len(group_sets))
            # averaged over the token's home rank (uniform): rank j is "self" for one home, "own node" for the
            # other rpn - 1 homes of its node, and "other node" for the remaining R - rpn
            totals["copies_to_self"] += w * sum(hit_rank) / R
            totals["copies_intra_node"] += w * (rpn - 1) * sum(node_sum) / R
            totals["copies_inter_node"] += w * (R - rpn) * sum(node_sum) / R
            totals["node_hops"] += w * (R - rpn) * sum(hit_node) / R
            totals["nodes_per_token"] += w * sum(hit_node)
            weight_sum += w
    if weight_sum == 0:
        raise ValueError(f"no allowed set holds k={k} experts; raise max_nodes or topk_group")
    return {name: value / weight_sum for name, value in totals.items()}


def v3_cluster_figures(
    config: ModelConfig | None = None,
    gpus_per_node: int = 8,
    nodes: int = 8,
    max_nodes: int | None = 4,
    context: int = 4096,
    utilisation: float = 0.4,
) -> dict[str, Any]:
    """DeepSeek-V3's expert-parallel communication on its H800 cluster, per token and MoE layer.

    config: the 671B config by default (256 experts over ``nodes`` x ``gpus_per_node`` GPUs, EP64).
    Traffic under uniform routing from ``expected_traffic`` with V3's node limit (its group limit: groups
    are nodes) or without it; bytes with FP8 dispatch and BF16 combine over the two-hop scheme (one copy
    per other node over InfiniBand, the fan-out inside a node over NVLink); the time of those bytes on
    each link against the time of the layer's training FLOPs on the 112 SMs left to computation at
    ``utilisation`` of the FP8 peak (an assumption: report it with the figures).
    """
    from workbench.model.accounting import flops_per_token

    config = config or ModelConfig.from_preset("deepseek-v3")
    ranks = gpus_per_node * nodes
    if max_nodes is None:  # no node limit: the group limit is lifted too (groups are the nodes in V3)
        t = expected_traffic(config.n_routed_experts, config.num_experts_per_tok, ranks, gpus_per_node)
    else:
        t = expected_traffic(config.n_routed_experts, config.num_experts_per_tok, ranks, gpus_per_node,
                             n_group=nodes, topk_group=max_nodes)  # fmt: skip
    D = config.hidden_size
    per_value = FP8_DISPATCH_BYTES + BF16_COMBINE_BYTES  # dispatch one way, combine the other
    ib_bytes = t["node_hops"] * D * per_value
    # inside nodes: every rank visited except those a copy arrives at over InfiniBand, plus the own node's
    nvlink_copies = t["copies_intra_node"] + max(0.0, t["copies_inter_node"] - t["node_hops"])
    nvlink_bytes = nvlink_copies * D * per_value
    key = (json.dumps(dataclasses.asdict(config), sort_keys=True), context)
    if key not in _FLOPS:  # counting the 671B config's weights on the meta device takes seconds: once
        _FLOPS[key] = flops_per_token(config, context=context, training=True)["total"]
    layer_flops = _FLOPS[key] / config.num_hidden_layers  # per token, average over the layers
    compute_share = (SMS_TOTAL - SMS_COMM) / SMS_TOTAL
    flops_per_s = H800_FP8_TFLOPS * 1e12 * utilisation * compute_share
    compute_us = layer_flops / flops_per_s * 1e6
    # training moves the bytes twice: forward (dispatch + combine) and backward (their gradients)
    ib_us, nvlink_us = 2 * ib_bytes / (IB_GBPS * 1e9) * 1e6, 2 * nvlink_bytes / (NVLINK_GBPS * 1e9) * 1e6
    return {
        "ranks": ranks,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "experts_per_gpu": config.n_routed_experts // ranks,
        "max_nodes": max_nodes,
        "nodes_per_token": t["nodes_per_token"],
        "ib_copies_per_token": t["node_hops"],
        "nvlink_copies_per_token": nvlink_copies,
        "ib_bytes_per_token": ib_bytes,
        "nvlink_bytes_per_token": nvlink_bytes,
        "training_flops_per_token_per_layer": layer_flops,
        "compute_sm_share": compute_share,
        "utilisation_assumed": utilisation,
        "compute_us_per_token_per_layer": compute_us,
        "ib_us_per_token_per_layer": ib_us,
        "nvlink_us_per_token_per_layer": nvlink_us,
        "comm_to_compute": max(ib_us, nvlink_us) / compute_us,
    }


__all__ = [
    "BF16_COMBINE_BYTES",
    "FP8_DISPATCH_BYTES",
    "H800_BF16_TFLOPS",
    "H800_FP8_TFLOPS",
    "IB_GBPS",
    "NVLINK_GBPS",
    "SMS_COMM",
    "SMS_TOTAL",
    "expected_traffic",
    "v3_cluster_figures",
]
