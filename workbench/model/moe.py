"""DeepSeekMoE: shared experts plus many fine-grained routed experts, balanced without an auxiliary loss.

A MoE layer replaces one big feed-forward network with many small ones (experts). Each token is
sent to ``num_experts_per_tok`` (k) of the ``n_routed_experts`` (E) routed experts, and always to
the ``n_shared_experts`` shared experts, which hold knowledge every token needs so the routed experts
are free to specialise. Only the chosen experts run, which is why DeepSeek-V3 has 671B parameters
but about 37B active per token.

Routing, as DeepSeek-V3 does it (``Router``):

1. Affinity of token t for expert i: ``s_i = sigmoid(u_t . e_i)`` (V3), or a softmax over experts (V2).
2. Auxiliary-loss-free balancing adds a per-expert bias ``b_i`` (``e_score_correction_bias``) to the
   affinities **for choosing experts only**; the gate values that weight the experts' outputs use
   the unbiased ``s_i``.
3. Group-limited routing: experts are split into ``n_group`` groups (in V3 one group per node), each
   group scored by the sum of its two best biased affinities, and a token may only use experts in its
   best ``topk_group`` groups. This bounds communication in a real cluster.
4. Top-k inside the allowed groups; gate weights are the chosen ``s_i`` renormalised to sum to one
   (``norm_topk_prob``) and multiplied by ``routed_scaling_factor``.

``config.topk_method`` names the selection rule of each published generation: ``"noaux_tc"`` is V3's
(steps 1-4); DeepSeek-V2 scores a group by its **best** expert instead of its top two
(``"group_limited_greedy"``, V2-236B with 8 groups of which 3 are kept) or has no groups at all
(``"greedy"``, V2-Lite), with softmax affinities, no renormalisation and a scaling factor of 16 (V2) or 1
(V2-Lite). V2 checkpoints carry no balancing bias; the bias is kept here anyway (zero, so the choice is
exactly V2's) so that the same balancing and growing work on every model.

Node-limited routing (``Router.limit_nodes``, off by default): when the experts are spread over nodes
(expert parallelism, ``workbench.dist``), a token may use experts on at most M nodes, chosen by the sum
of the ``ceil(k / M)`` best biased affinities on each node, before the group limit. In DeepSeek-V3 the
groups *are* the nodes (8 groups, 4 allowed), so its group limit is its node limit; here the two may differ.

Balancing (``Router.update_bias``): after each optimiser step, each expert's bias moves by
``gamma`` toward balance: ``b_i += gamma * sign(mean_load - load_i)``. Overloaded experts become
less attractive, idle ones more. No gradient flows through this, so it doesn't fight the language
modelling loss the way an auxiliary loss does. DeepSeek-V3 keeps a tiny *sequence-wise* balance loss
(``sequence_balance_loss``, weight alpha) only to avoid extreme imbalance within one sequence.

Growing (``MoE.grow``): a trained layer can take more routed experts. The new ones are inserted at the
end of each routing group (so every old expert keeps its group), start *dormant* (their bias sits below
every old bias by more than the whole range of an affinity, so they are never chosen and the layer
computes exactly what it computed before) or *inactive* (``Router.active`` false: never routed, never
balanced; how a layer that should not grow keeps the expert count that one config imposes on all).

Dispatch (``RoutedExperts``): the (token, expert) pairs are sorted by expert so that each expert
multiplies one contiguous slice. ``torch.nn.functional.grouped_mm`` runs all the slices in one call
(on CUDA in bf16, and on CPU in float32 when the widths are 16-byte aligned); elsewhere a loop over
*experts* (never tokens) runs one matmul per expert. No token is ever dropped: there is no capacity factor.
With ``config.fp8`` that loop runs each expert's three GEMMs through ``fp8.fp8_linear`` instead
(DeepSeek-V3 trains its experts in FP8 too; there is no grouped FP8 kernel here).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import ModelConfig
from workbench.fp8 import fp8_linear
from workbench.model.layers import MLP

GROW_INITS = ("copy", "average", "random")


@dataclass
class RoutingStats:
    """What one MoE layer did in one forward pass."""

    layer_idx: int
    topk_idx: torch.Tensor  # (B, T, k) the chosen routed experts of each token
    topk_weight: torch.Tensor  # (B, T, k) their gate weights
    counts: torch.Tensor  # (E,) how many tokens each expert received
    balance_loss: torch.Tensor  # () the sequence-wise balance loss of this layer

    @property
    def max_violation(self) -> float:
        """MaxVio = (max load - mean load) / mean load: 0 when perfectly balanced."""
        c = self.counts.float()
        return float((c.max() - c.mean()) / c.mean().clamp_min(1e-9))


class Router(nn.Module):
    """Scores experts and picks the top-k of each token (Hugging Face name: ``mlp.gate``)."""

    def __init__(self, config: ModelConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # the balancing bias: a buffer (saved, never trained by gradient), kept in float32
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # which experts may be routed to: the config's inactive_experts are never chosen nor balanced (a
        # non-persistent buffer: the state lives in the config, so the weights keep the published layout)
        self.register_buffer("active", self.active_mask(config, layer_idx), persistent=False)
        self.node_limit: tuple[int, int] | None = None  # (nodes, max nodes per token), see limit_nodes

    @staticmethod
    def active_mask(config: ModelConfig, layer_idx: int | None) -> torch.Tensor:
        """bool (E,): the experts of layer ``layer_idx`` that may be routed to (not in ``inactive_experts``)."""
        active = torch.ones(config.n_routed_experts, dtype=torch.bool)
        active[(config.inactive_experts or {}).get(layer_idx, [])] = False
        return active

    def limit_nodes(self, n_nodes: int | None, max_nodes: int = 1) -> None:
        """Route each token to experts on at most ``max_nodes`` of ``n_nodes`` nodes (node j holds experts
        j * E / n_nodes .. (j + 1) * E / n_nodes - 1, as expert parallelism places them). None: no limit."""
        if n_nodes is None:
            self.node_limit = None
            return
        E, k = self.n_experts, self.top_k
        for name, value in (("n_nodes", n_nodes), ("max_nodes", max_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if E % n_nodes or max_nodes > n_nodes:
            fits = [n for n in range(1, E + 1) if E % n == 0]
            raise ValueError(f"n_nodes={n_nodes} must divide the {E} experts and max_nodes={max_nodes} must not exceed "
                             f"it; use n_nodes among {fits}")  # fmt: skip
        if self.n_group > 1 and self.topk_method != "greedy" and self.n_group % n_nodes:
            fits = [n for n in range(1, self.n_group + 1) if self.n_group % n == 0]
            raise ValueError(f"each node must hold whole routing groups: n_group={self.n_group} is not a multiple "
                             f"of n_nodes={n_nodes}; use n_nodes among {fits}")  # fmt: skip
        if max_nodes * (E // n_nodes) < k:
            raise ValueError(f"max_nodes={max_nodes} nodes of {E // n_nodes} experts cannot hold a token's k={k} "
                             f"experts; use max_nodes >= {math.ceil(k / (E // n_nodes))}")  # fmt: skip
        self.node_limit = (n_nodes, max_nodes)

    def _node_mask(self, choice: torch.Tensor) -> torch.Tensor:
        """(N, E) biased scores -> (N, E) with the experts outside each token's best max_nodes nodes at -inf."""
        n_nodes, max_nodes = self.node_limit
        N = choice.shape[0]
        per_node = choice.view(N, n_nodes, -1)  # (N, nodes, E / nodes)
        q = min(per_node.shape[-1], math.ceil(self.top_k / max_nodes))
        finite = per_node.masked_fill(~torch.isfinite(per_node), -1e9)  # a masked expert counts as very poor
        node_scores = finite.topk(q, dim=-1).values.sum(dim=-1)  # (N, nodes): sum of each node's best q
        best = node_scores.topk(max_nodes, dim=-1).indices  # (N, max_nodes)
        allowed = torch.zeros_like(node_scores, dtype=torch.bool).scatter_(1, best, True)
        return per_node.masked_fill(~allowed[:, :, None], float("-inf")).view(N, -1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities (N, E) in float32 (float64 for a float64 model) for tokens x (N, hidden)."""
        dtype = torch.promote_types(x.dtype, torch.float32)  # never below fp32: routing is decided here
        logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (N, E)
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, hidden) -> topk_idx (N, k), topk_weight (N, k), scores (N, E)."""
        N = x.shape[0]
        scores = self.scores(x)  # (N, E)
        choice = scores + self.e_score_correction_bias  # the bias steers selection only
        if not bool(self.active.all()):
            choice = choice.masked_fill(~self.active, float("-inf"))  # inactive experts are never chosen
        if self.node_limit is not None:
            choice = self._node_mask(choice)  # (N, E): experts on at most M nodes per token
        if self.n_group > 1 and self.topk_method != "greedy":  # greedy (V2-Lite): no groups
            grouped = choice.view(N, self.n_group, -1)  # (N, G, E/G)
            if self.topk_method == "group_limited_greedy":  # V2: a group is as good as its best expert
                group_scores = grouped.max(dim=-1).values  # (N, G)
            else:  # noaux_tc (V3)
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G): sum of each group's top-2
            best_groups = group_scores.topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
            choice = grouped.masked_fill(~allowed[:, :, None], float("-inf")).view(N, -1)
        topk_idx = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        topk_weight = scores.gather(1, topk_idx)  # (N, k) unbiased affinities
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight * self.routed_scaling_factor, scores

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor, gamma: float, mask: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i), for the experts in
        ``mask`` (a bool (E,) tensor; None: all experts)."""
        E = self.e_score_correction_bias.shape[0]
        if not isinstance(counts, torch.Tensor) or counts.shape != (E,):
            shape = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise ValueError(f"expert counts must be a tensor of shape ({E},) (tokens per expert), got {shape}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != (E,) or mask.dtype != torch.bool):
            raise ValueError(f"the balancing mask must be a bool tensor of shape ({E},)")
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma (the bias update speed) must be a finite number >= 0, got {gamma}")
        load = counts.float().to(self.e_score_correction_bias.device)
        active = self.active.to(load.device)
        step = gamma * torch.sign(load[active].mean() - load)  # balance among the experts that exist
        movable = active if mask is None else active & mask.to(load.device)
        step = torch.where(movable, step, torch.zeros_like(step))
        self.e_score_correction_bias += step

    @torch.no_grad()
    def grow(self, layout: GrowthLayout, rows: torch.Tensor, *, live: bool, margin: float = 2.0) -> None:
        """Take the new experts of ``layout``: router rows (n, hidden); a dormant bias (below every active
        bias by ``margin``: never chosen until raised) when ``live``, else inactive."""
        E = layout.experts_after
        weight = self.weight.new_empty(E, self.weight.shape[1])  # (E + n, hidden)
        weight[layout.old_to_new], weight[layout.new] = self.weight, rows.to(weight)
        bias = self.e_score_correction_bias.new_zeros(E)
        bias[layout.old_to_new] = self.e_score_correction_bias
        active = self.active.new_zeros(E)
        active[layout.old_to_new] = self.active
        if live:
            existing = self.e_score_correction_bias[self.active & torch.isfinite(self.e_score_correction_bias)]
            bias[layout.new] = float(existing.min()) - margin
            active[layout.new] = True
        self.weight = nn.Parameter(weight)
        self.e_score_correction_bias = bias
        self.active = active
        self.n_experts = E


@dataclass(frozen=True)
class GrowthLayout:
    """Where experts go when each of ``groups`` routing groups gets ``n / groups`` new ones at its end."""

    experts_before: int
    n: int
    groups: int

    @property
    def experts_after(self) -> int:
        return self.experts_before + self.n

    @property
    def old_to_new(self) -> list[int]:
        """Old expert j lives at index old_to_new[j]."""
        per_old, per_new = self.experts_before // self.groups, self.n // self.groups
        return [(j // per_old) * (per_old + per_new) + j % per_old for j in range(self.experts_before)]

    @property
    def new(self) -> list[int]:
        """The new experts' indices, group by group."""
        per_old, per_new = self.experts_before // self.groups, self.n // self.groups
        return [g * (per_old + per_new) + per_old + i for g in range(self.groups) for i in range(per_new)]

    def group_of_new(self, slot: int) -> int:
        return slot // (self.n // self.groups)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights, run on their sorted slices of tokens."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts = E
        self.use_grouped_mm = config.use_grouped_mm
        self.fp8 = config.fp8
        self.fp8_options = {"grad_fmt": config.fp8_grad_format, "backend": config.fp8_backend}
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))  # expert e: Linear(D -> I) weights
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))  # Linear(I -> D)

    @torch.no_grad()
    def grow(self, layout: GrowthLayout, weights: dict[str, torch.Tensor]) -> None:
        """Take the new experts of ``layout``: ``weights[name]`` (n, out, in) for gate/up/down_proj."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            old = getattr(self, name)
            stacked = old.new_empty((layout.experts_after, *old.shape[1:]))  # (E + n, out, in)
            stacked[layout.old_to_new], stacked[layout.new] = old, weights[name].to(old)
            setattr(self, name, nn.Parameter(stacked))
        self.n_experts = layout.experts_after

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x (N, D), topk_idx / topk_weight (N, k) -> (N, D): sum over k of weight * expert(x)."""
        N, k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)  # (N*k,)
        order = flat_expert.argsort(stable=True)  # (token, slot) pairs sorted by expert
        token_of = order // k  # (N*k,) which token each sorted pair belongs to
        counts = torch.bincount(flat_expert, minlength=self.n_experts)  # (E,)
        xs = x[token_of]  # (N*k, D), expert 0's tokens first, then expert 1's, ...

        if self.use_grouped_mm and not self.fp8 and _grouped_mm_ok(xs, self.gate_proj):
            offs = counts.cumsum(0).to(torch.int32)  # end of each expert's slice
            h = F.silu(F.grouped_mm(xs, self.gate_proj.transpose(1, 2), offs=offs)) * F.grouped_mm(
                xs, self.up_proj.transpose(1, 2), offs=offs
            )  # (N*k, I)
            ys = F.grouped_mm(h, self.down_proj.transpose(1, 2), offs=offs)  # (N*k, D)
        else:
            # FP8: quantised operands, see workbench.fp8
            linear = functools.partial(fp8_linear, **self.fp8_options) if self.fp8 else F.linear
            outs = []
            for e, xe in enumerate(xs.split(counts.tolist())):  # a loop over experts, not tokens
                if xe.shape[0] == 0:
                    continue
                he = F.silu(linear(xe, self.gate_proj[e])) * linear(xe, self.up_proj[e])  # (n_e, I)
                outs.append(linear(he, self.down_proj[e]))  # (n_e, D)
            ys = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[1])

        ys = ys * topk_weight.reshape(-1)[order, None].to(ys.dtype)  # weight each expert's output
        return torch.zeros_like(x).index_add_(0, token_of, ys.to(x.dtype))  # (N, D) back in token order


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped_mm kernel can run these experts: bf16 on CUDA; float32 on CPU when the
    rows are 16-byte aligned (hidden and expert widths multiples of 4), which its CPU kernel requires."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16
    return (
        x.dtype == torch.float32 and weight.dtype == torch.float32 and x.shape[1] % 4 == 0 and weight.shape[1] % 4 == 0
    )


def sequence_balance_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, active: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over the sequences.

    scores (B, T, E) affinities, topk_idx (B, T, k). Per sequence:
    f_i = E / (k T) * #tokens choosing i,  P_i = mean_t s_i / sum_j s_j,  L = sum_i f_i P_i
    (1 when perfectly balanced, up to E / k when every token picks the same experts). With ``active``
    (E,) bool, only the active experts count: E is their number and the others' affinities are left out.
    """
    B, T, k = topk_idx.shape
    n_counted = n_experts
    if active is not None and not bool(active.all()):
        scores = scores.masked_fill(~active, 0.0)
        n_counted = int(active.sum())
    chosen = torch.zeros(B, T, n_experts, device=scores.device).scatter_(2, topk_idx, 1.0)
    f = chosen.sum(dim=1) * n_counted / (k * T)  # (B, E)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return (f * p).sum(dim=-1).mean()


class MoE(nn.Module):
    """Shared experts + routed experts: (B, T, hidden) -> (B, T, hidden), plus routing statistics."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(config, layer_idx)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingStats]:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        topk_idx, topk_weight, scores = self.gate(flat)  # (N, k), (N, k), (N, E)
        y = self.experts(flat, topk_idx, topk_weight).view(B, T, D)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        k = topk_idx.shape[1]
        stats = RoutingStats(
            layer_idx=self.layer_idx,
            topk_idx=topk_idx.view(B, T, k),
            topk_weight=topk_weight.view(B, T, k),
            counts=torch.bincount(topk_idx.reshape(-1), minlength=self.gate.n_experts),
            balance_loss=sequence_balance_loss(
                scores.view(B, T, -1), topk_idx.view(B, T, k), self.gate.n_experts, self.gate.active
            ),
        )
        return y, stats

    @torch.no_grad()
    def grow(
        self,
        layout: GrowthLayout,
        init: str = "copy",
        *,
        live: bool = True,
        sources: list[int] | None = None,
        std: float = 0.02,
        generator: torch.Generator | None = None,
        margin: float = 2.0,
    ) -> None:
        """Add the routed experts of ``layout`` to this layer, dormant (``live``) or inactive.

        init: their weights and router rows: ``"copy"`` of the expert ``sources[slot]`` (an old index) for
        each new slot, ``"average"`` of the layer's experts, or ``"random"`` (normal, std ``std``).
        """
        if init not in GROW_INITS:
            raise ValueError(f"init must be one of {GROW_INITS}, got {init!r}")
        per_old = layout.experts_before // layout.groups
        if init == "copy" and sources is None:  # the first expert of each new slot's group
            sources = [layout.group_of_new(slot) * per_old for slot in range(layout.n)]
        if init == "copy" and len(sources) != layout.n:
            raise ValueError(f"init='copy' needs one source expert per new expert ({layout.n}), got {sources!r}")
        ex, router = self.experts, self.gate
        olds = {name: getattr(ex, name) for name in ("gate_proj", "up_proj", "down_proj")}  # (E, out, in)
        if init == "copy":
            weights = {name: w[sources] for name, w in olds.items()}  # (n, out, in)
            rows = router.weight[sources]  # (n, hidden)
        elif init == "average":
            weights = {name: w.mean(dim=0, keepdim=True).expand(layout.n, *w.shape[1:]) for name, w in olds.items()}
            rows = router.weight.mean(dim=0, keepdim=True).expand(layout.n, -1)
        else:  # drawn slot by slot: the weights of a slot, then its router row
            drawn = {name: [] for name in olds}
            row_list = []
            for _ in range(layout.n):
                for name, w in olds.items():
                    drawn[name].append(torch.randn(w.shape[1:], generator=generator) * std)
                row_list.append(torch.randn(router.weight.shape[1], generator=generator) * std)
            weights = {name: torch.stack(ws) for name, ws in drawn.items()}
            rows = torch.stack(row_list)
        ex.grow(layout, weights)
        router.grow(layout, rows, live=live, margin=margin)
