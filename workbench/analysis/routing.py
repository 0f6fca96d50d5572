"""How specialised the experts are, and what each one contributes: summaries of ``expert_usage_by_domain``
(``workbench.train.measure``) and knock-outs.

``specialisation`` is, per layer, the mean total-variation distance between each domain's expert
distribution and the average over domains: 0 when every domain uses the experts in the same
proportions, 1 when the domains use disjoint sets of experts. An untrained router is not at 0 (it
routes on whatever the random embeddings of each domain's tokens happen to look like), so always
compare against the same measurement at initialisation, over several initialisations.

``effective_experts`` is, per layer and domain, exp(entropy) of the domain's usage: the number of
equally used experts that would give the same spread. A domain confined to its own k experts scores
k; one spread evenly over all E experts scores E.

Knock-outs (context managers that restore the layer exactly on exit):

* ``shared_expert_off(moe)``: the shared expert's output is zeroed (its down-projection set to 0);
* ``routed_expert_off(moe, e)``: expert ``e``'s output is zeroed, tokens keep their routing: the same
  kind of removal as the shared expert's, a computation taken away;
* ``routed_expert_masked(moe, e)``: expert ``e`` is never chosen (its bias pushed far down), so its
  tokens go to their runner-up expert instead: what a router does without it.

Comparing the shared expert's knock-out with a routed *mask* would compare removing a computation
with re-routing around it; compare like with like.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def specialisation(usage: torch.Tensor) -> torch.Tensor:
    """Per layer: mean total-variation distance of each domain's expert usage from the domains' mean."""
    mean = usage.mean(dim=1, keepdim=True)  # (layers, 1, E)
    return 0.5 * (usage - mean).abs().sum(dim=-1).mean(dim=-1)  # (layers,)


def effective_experts(usage: torch.Tensor) -> torch.Tensor:
    """(layers, domains): exp(entropy) of each domain's usage, the number of experts it spreads over."""
    p = usage.clamp_min(0)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # (layers, domains, E)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy.exp()


def _check_moe(moe) -> None:
    if not hasattr(moe, "experts") or not hasattr(moe, "gate"):
        raise ValueError(f"expected a MoE layer (model.layers[i].mlp of a MoE block), got {type(moe).__name__}")


@contextmanager
def shared_expert_off(moe) -> Iterator[None]:
    """Zero the shared expert's output inside the block (restored exactly afterwards)."""
    _check_moe(moe)
    if moe.shared_experts is None:
        raise ValueError("this MoE layer has no shared expert (n_shared_experts=0)")
    w = moe.shared_experts.down_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            w.copy_(saved)


@contextmanager
def routed_expert_off(moe, expert: int) -> Iterator[None]:
    """Zero routed expert ``expert``'s output; the router still sends it its tokens (restored afterwards)."""
    _check_moe(moe)
    if not 0 <= expert < moe.experts.n_experts:
        raise ValueError(f"expert must be in [0, {moe.experts.n_experts}), got {expert}")
    w = moe.experts.down_proj  # (E, D, I)
    saved = w[expert].detach().clone()
    with torch.no_grad():
        w[expert].zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            w[expert].copy_(saved)


@contextmanager
def routed_expert_masked(moe, expert: int) -> Iterator[None]:
    """Never choose routed expert ``expert``: its tokens go to their next-best expert (restored afterwards)."""
    _check_moe(moe)
    if not 0 <= expert < moe.experts.n_experts:
        raise ValueError(f"expert must be in [0, {moe.experts.n_experts}), got {expert}")
    bias = moe.gate.e_score_correction_bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[expert] = -1e4  # far below any affinity in [0, 1]: never among the top-k
    try:
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)


__all__ = [
    "effective_experts",
    "routed_expert_masked",
    "routed_expert_off",
    "shared_expert_off",
    "specialisation",
]
