"""Expert parallelism: the routed experts of each MoE layer split across ranks, tokens sent to them and back.

DeepSeek-V3 keeps 256 routed experts per MoE layer, far too many for one GPU, so rank r holds experts
``r * E/R .. (r + 1) * E/R - 1`` (here R ranks, E/R experts each) and every rank keeps the router, the
shared expert and the attention (replicated, trained data-parallel). A MoE layer then runs in four moves:

1. **Route** locally: each rank scores its own tokens (N of them) and picks their k experts.
2. **Dispatch**: each token goes once to every rank that holds at least one of its experts, with the ids
   of those experts there and their gate weights. The amounts differ per pair of ranks, so this is an
   ``all_to_all_single`` with unequal splits, preceded by a small all-to-all of the counts.
3. **Compute**: each rank runs its experts on what it received (the same sorted dispatch as one process,
   ``model.moe.RoutedExperts``) and sums, per received token, its experts' weighted outputs.
4. **Combine**: the partial sums travel back by the reverse all-to-all and are added up per token.

Both exchanges sit inside the autograd graph (``all_to_all``: the backward of a dispatch is a combine of
the gradients and vice versa), so the gradients of the experts, the router and the inputs are those of
the single-process layer: each expert's gradient collects the tokens of every rank.

Ranks are grouped into **nodes** of ``ranks_per_node`` consecutive ranks. A copy to the sender's own rank
stays in memory, one to another rank of its node crosses NVLink, one to another node crosses InfiniBand,
about three times slower (~50 against ~160 GB/s). With **node-limited routing** (``max_nodes`` = M,
``Router.limit_nodes``) a token's experts lie on at most M nodes, which bounds its InfiniBand traffic: V3
sends each token at most once to each of M = 4 nodes and fans it out inside the node over NVLink.
``Traffic`` counts the copies of the real exchanges so that ``workbench.dist.comm`` can turn them into
bytes per token and compare them with the closed form.

Where it simplifies: one exchange straight to the destination rank (V3's two hops, InfiniBand to the
node then NVLink to the GPU, are counted from the same routing but not performed); the hidden states
travel in the model's dtype (V3 dispatches in FP8 and combines in BF16); no overlap of the exchanges
with computation (DualPipe's job; ``workbench.dist.pipeline`` measures what it buys); gloo on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from workbench.model.moe import MoE, RoutedExperts, RoutingStats, sequence_balance_loss


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with unequal splits inside autograd: the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))  # (sum(out_splits), ...)
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))  # gradients go back where the rows came from
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Send rows ``x[sum(in_splits[:j]) : ...]`` to rank j; receive ``out_splits[j]`` rows from rank j."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class Traffic:
    """Copies of token hidden states one rank sent in MoE dispatches (each comes back once in the combine)."""

    tokens: int = 0  # tokens routed on this rank
    to_self: int = 0  # copies to its own rank (no link)
    intra_node: int = 0  # copies to other ranks of its node (NVLink)
    inter_node: int = 0  # copies to ranks of other nodes (InfiniBand)
    node_hops: int = 0  # distinct other nodes per token, summed: what a two-hop dispatch (once per node) sends
    pairs: int = 0  # (token, expert) pairs: what a dispatch without deduplication would send
    max_nodes_seen: int = 0  # the most nodes any one token's experts lay on
    value_bytes: int = 4  # bytes of one value of a hidden state as sent
    hidden: int = 0  # values per hidden state
    metadata_bytes: int = 0  # expert ids and gate weights sent with the copies
    layers: set[int] = field(default_factory=set)  # the MoE layers counted

    def add(self, other: Traffic) -> None:
        for name in ("tokens", "to_self", "intra_node", "inter_node", "node_hops", "pairs", "metadata_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_nodes_seen = max(self.max_nodes_seen, other.max_nodes_seen)
        if other.tokens:  # a layer that never ran knows no sizes
            self.value_bytes, self.hidden = other.value_bytes, other.hidden
        self.layers |= other.layers

    def as_tensor(self) -> torch.Tensor:
        names = ("tokens", "to_self", "intra_node", "inter_node", "node_hops", "pairs", "metadata_bytes")
        return torch.tensor([getattr(self, n) for n in names], dtype=torch.float64)

    def per_token(self) -> dict[str, float]:
        """Copies and bytes per token per MoE layer (dispatch only; the combine sends as much back)."""
        n = max(1, self.tokens)  # tokens counted once per layer they passed through
        size = self.hidden * self.value_bytes
        return {
            "copies_to_self": self.to_self / n,
            "copies_intra_node": self.intra_node / n,
            "copies_inter_node": self.inter_node / n,
            "bytes_intra_node": self.intra_node * size / n,
            "bytes_inter_node": self.inter_node * size / n,
            "bytes_inter_node_two_hop": self.node_hops * size / n,
            "bytes_without_dedup": self.pairs * size / n,
            "metadata_bytes": self.metadata_bytes / n,
            "max_nodes_per_token": float(self.max_nodes_seen),
        }


class ExpertParallelMoE(nn.Module):
    """A ``MoE`` layer whose routed experts are split across the ranks of ``group`` (see the module doc).

    Built from a whole layer: it keeps the router and the shared experts (replicated) and copies only its
    own rank's experts. Forward is that of ``MoE``: (B, T, D) -> (B, T, D) and its ``RoutingStats``
    (``counts`` are this rank's tokens' loads over all E experts: sum them over ranks to balance).
    """

    def __init__(self, moe: MoE, ranks_per_node: int = 1, group=None) -> None:
        super().__init__()
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        E = moe.experts.n_experts
        if E % self.world:
            raise ValueError(f"{E} routed experts do not split over {self.world} ranks; use a rank count dividing {E}")
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be a positive integer, got {ranks_per_node!r}")
        if self.world % ranks_per_node:
            raise ValueError(f"{self.world} ranks do not form nodes of {ranks_per_node}; use a divisor of {self.world}")
        self.layer_idx, self.gate, self.shared_experts = moe.layer_idx, moe.gate, moe.shared_experts
        self.n_experts, self.per_rank, self.ranks_per_node = E, E // self.world, ranks_per_node
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        self.experts = _expert_slice(moe.experts, mine)  # only this rank's experts are copied
        self.traffic = Traffic()  # accumulated since the last ``reset_traffic``

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    def reset_traffic(self) -> None:
        self.traffic = Traffic()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # (N, D)
        N, R = flat.shape[0], self.world
        topk_idx, topk_weight, scores = self.gate(flat)  # (N, k), (N, k), (N, E)
        k = topk_idx.shape[1]
        owner = topk_idx // self.per_rank  # (N, k) the rank holding each chosen expert

        # 1. which ranks each token visits, and the counts every rank will receive
        visits = torch.zeros(N, R, dtype=torch.bool, device=flat.device).scatter_(1, owner, True)  # (N, R)
        dest, token = visits.t().nonzero(as_tuple=True)  # (P,), (P,): copies sorted by destination rank
        in_splits = visits.sum(dim=0)  # (R,) copies this rank sends to each rank
        out_counts = torch.empty_like(in_splits)
        dist.all_to_all_single(out_counts, in_splits, group=self.group)  # (R,) copies it receives from each
        send, recv = in_splits.tolist(), out_counts.tolist()

        # 2. dispatch: the hidden state once per visited rank, with the local ids and weights of its experts there
        here = owner[token] == dest[:, None]  # (P, k) the token's slots whose expert lives on that rank
        ids = torch.where(here, topk_idx[token] - dest[:, None] * self.per_rank, -1)  # (P, k) local ids or -1
        weights = torch.where(here, topk_weight[token], torch.zeros_like(topk_weight[token]))  # (P, k)
        recv_x = all_to_all(flat[token], recv, send, self.group)  # (Q, D)
        recv_w = all_to_all(weights, recv, send, self.group)  # (Q, k)
        recv_ids = ids.new_empty((sum(recv), k))
        dist.all_to_all_single(recv_ids, ids.contiguous(), recv, send, group=self.group)  # (Q, k), no gradient

        # 3. compute: every (received token, local expert) pair through this rank's experts
        row, slot = (recv_ids >= 0).nonzero(as_tuple=True)  # (M,), (M,)
        pair_out = self.experts(recv_x[row], recv_ids[row, slot][:, None], recv_w[row, slot][:, None])  # (M, D)
        partial = torch.zeros_like(recv_x).index_add_(0, row, pair_out)  # (Q, D) one sum per received token

        # 4. combine: the partial sums back to their tokens' ranks, added up per token
        back = all_to_all(partial, send, recv, self.group)  # (P, D)
        y = torch.zeros_like(flat).index_add_(0, token, back).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)

        self._count(visits, topk_idx, flat, k, metadata=int(ids.numel() * ids.element_size() +
                                                            weights.numel() * weights.element_size()))  # fmt: skip
        stats = RoutingStats(
            layer_idx=self.layer_idx,
            topk_idx=topk_idx.view(B, T, k),
            topk_weight=topk_weight.view(B, T, k),
            counts=torch.bincount(topk_idx.reshape(-1), minlength=self.n_experts),
            balance_loss=sequence_balance_loss(
                scores.view(B, T, -1), topk_idx.view(B, T, k), self.n_experts, self.gate.active
            ),
        )
        return y, stats

    @torch.no_grad()
    def _count(self, visits: torch.Tensor, topk_idx: torch.Tensor, flat: torch.Tensor, k: int, metadata: int) -> None:
        """Classify this forward's copies by link (own rank, own node, other node) into ``self.traffic``."""
        R, per_node = self.world, self.ranks_per_node
        node_of_rank = torch.arange(R, device=visits.device) // per_node  # (R,)
        same_node = node_of_rank == self.node  # (R,)
        nodes = visits.view(visits.shape[0], R // per_node, per_node).any(dim=-1)  # (N, nodes) nodes visited
        t = Traffic(
            tokens=visits.shape[0],
            to_self=int(visits[:, self.rank].sum()),
            intra_node=int(visits[:, same_node].sum()) - int(visits[:, self.rank].sum()),
            inter_node=int(visits[:, ~same_node].sum()),
            node_hops=int(nodes.sum()) - int(nodes[:, self.node].sum()),
            pairs=visits.shape[0] * k,
            max_nodes_seen=int(nodes.sum(dim=1).max()) if visits.shape[0] else 0,
            value_bytes=flat.element_size(),
            hidden=flat.shape[1],
            metadata_bytes=metadata,
            layers={self.layer_idx},
        )
        self.traffic.add(t)


def _expert_slice(full: RoutedExperts, mine: slice) -> RoutedExperts:
    """A ``RoutedExperts`` holding experts ``mine`` of ``full`` (its settings, copies of those weights)."""
    local = RoutedExperts.__new__(RoutedExperts)  # no allocation of a whole stack
    nn.Module.__init__(local)
    for key, value in vars(full).items():  # its plain settings (grouped_mm, FP8 options, ...)
        if not key.startswith("_"):
            setattr(local, key, value)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(local, name, nn.Parameter(getattr(full, name).detach()[mine].clone()))  # (E/R, out, in)
    local.n_experts = mine.stop - mine.start
    return local


def shard_experts(model: nn.Module, ranks_per_node: int = 1, max_nodes: int | None = None, group=None) -> nn.Module:
    """Replace every MoE layer of ``model`` (main and MTP) by its expert-parallel version, in place; with
    ``max_nodes``, route each token to experts on at most that many nodes. Every rank must call it with
    the same whole model. Returns the model."""
    world = dist.get_world_size(group)
    for block in [*model.layers, *model.mtp]:
        if block.is_moe:
            if max_nodes is not None:
                block.mlp.gate.limit_nodes(world // ranks_per_node, max_nodes)
            block.mlp = ExpertParallelMoE(block.mlp, ranks_per_node, group)
    return model


def expert_parallel_layers(model: nn.Module) -> list[ExpertParallelMoE]:
    return [b.mlp for b in [*model.layers, *model.mtp] if isinstance(b.mlp, ExpertParallelMoE)]


def global_traffic(model: nn.Module, group=None) -> Traffic:
    """The traffic of every expert-parallel layer, summed over the layers and over the ranks (a collective)."""
    total = Traffic()
    for layer in expert_parallel_layers(model):
        total.add(layer.traffic)
    summed = total.as_tensor()
    dist.all_reduce(summed, group=group)
    names = ("tokens", "to_self", "intra_node", "inter_node", "node_hops", "pairs", "metadata_bytes")
    for name, value in zip(names, summed.tolist()):
        setattr(total, name, int(value))
    most = torch.tensor([total.max_nodes_seen], dtype=torch.float64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    total.max_nodes_seen = int(most[0])
    return total


@torch.no_grad()
def gather_expert_grads(layer: ExpertParallelMoE) -> dict[str, torch.Tensor]:
    """The gradients of the whole expert stack of ``layer``, gathered from every rank (a collective)."""
    out = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        g = getattr(layer.experts, name).grad
        parts = [torch.empty_like(g) for _ in range(layer.world)]
        dist.all_gather(parts, g.contiguous(), group=layer.group)
        out[name] = torch.cat(parts)  # (E, out, in)
    return out


__all__ = [
    "ExpertParallelMoE",
    "Traffic",
    "all_to_all",
    "expert_parallel_layers",
    "gather_expert_grads",
    "global_traffic",
    "shard_experts",
]
