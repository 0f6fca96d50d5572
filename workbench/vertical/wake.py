"""Waking the new experts for the new domain: a logistic probe per new router row, and a bias raised by
bisection up to a forgetting budget (the share of old-domain tokens allowed onto the new experts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.model import Model
from workbench.util import eval_mode
from workbench.vertical.grow import DORMANT_MARGIN, AddedExperts, moe_layers


@torch.no_grad()
def _router_inputs(model: Model, ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The (N, hidden) inputs of each listed layer's router for token ids (B, T)."""
    captured: dict[int, torch.Tensor] = {}
    moes = moe_layers(model)
    hooks = [
        moes[i].gate.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, args[0].detach()))
        for i in layers
    ]
    try:
        with eval_mode(model):
            model(ids.to(model.device), compute_mtp=any(i >= model.config.num_hidden_layers for i in layers))
    finally:
        for h in hooks:
            h.remove()
    return captured


def _share_to(router, x: torch.Tensor, experts: torch.Tensor) -> float:
    """The share of router inputs x (N, hidden) that send at least one routed slot to ``experts``."""
    topk_idx, _, _ = router(x)  # (N, k)
    return float(torch.isin(topk_idx, experts).any(dim=-1).float().mean())


@torch.no_grad()
def selection_rate(model: Model, added: AddedExperts, ids: torch.Tensor) -> dict[int, float]:
    """Per live layer: the fraction of tokens of ids (B, T) that send a routed slot to a new expert."""
    inputs = _router_inputs(model, ids, added.layers)
    moes, out = moe_layers(model), {}
    new = torch.tensor(added.new_experts, device=model.device)
    for i in added.layers:
        out[i] = _share_to(moes[i].gate, inputs[i], new)
    return out


PROBES = ("logistic", "mean", "none")


def fit_probe(x_new: torch.Tensor, x_old: torch.Tensor, steps: int = 100, l2: float = 1e-3) -> torch.Tensor:
    """A linear classifier w (hidden,) with sigmoid(x . w) ~ P(token is new-domain): logistic regression
    without intercept (exactly what a router row computes), the two domains weighted equally, fit by L-BFGS."""
    x = torch.cat([x_new, x_old]).float()  # (N, hidden)
    y = torch.cat([torch.ones(len(x_new)), torch.zeros(len(x_old))]).to(x.device)
    weight = torch.cat([torch.full((len(x_new),), 0.5 / len(x_new)), torch.full((len(x_old),), 0.5 / len(x_old))])
    weight = weight.to(x.device)
    w = torch.zeros(x.shape[1], device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="none") * weight).sum()
        loss = loss + l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


@torch.no_grad()
def wake_experts(
    model: Model,
    added: AddedExperts,
    new_ids: torch.Tensor,
    old_ids: torch.Tensor,
    *,
    old_rate: float = 0.05,
    rate: float | None = None,
    probe: str = "logistic",
) -> dict[str, dict[int, float]]:
    """Make the new experts reachable for the new domain: a probe router row, then a bias.

    new_ids / old_ids (B, T): token windows of the new domain and of what the base knows.
    probe: the new router rows become a linear classifier of the router inputs x of the two domains,
        ``"logistic"`` (fit by ``fit_probe``) or ``"mean"`` (``mean(x_new) - mean(x_old)``, scaled so its
        logits spread like the old rows'); ``"none"`` keeps the rows ``init`` gave.
    old_rate: the bias is the highest at which at most this share of old-domain tokens select a new
        expert (the forgetting budget; the new domain gets whatever share that leaves) ...
    rate: ... or, if given, the bias at which this share of the new domain's tokens select one.
    Returns ``{"new": {layer: share}, "old": {layer: share}, "bias": {layer: bias}}``.
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    target, which = (old_rate, "old") if rate is None else (rate, "new")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"{'old_rate' if rate is None else 'rate'} must be in [0, 1), got {target}")
    moes = moe_layers(model)
    new = torch.tensor(added.new_experts, device=model.device)
    report: dict[str, dict[int, float]] = {"new": {}, "old": {}, "bias": {}}
    for i in added.layers:  # in order: waking a layer changes what the layers above it receive
        x = {
            "new": _router_inputs(model, new_ids, [i])[i].float(),
            "old": _router_inputs(model, old_ids, [i])[i].float(),
        }
        router = moes[i].gate
        old = router.active.clone()  # the old experts that exist (not the new ones, nor inactive slots)
        old[new] = False
        if probe == "logistic":
            router.weight[new] = fit_probe(x["new"], x["old"]).to(router.weight.dtype)
        elif probe == "mean":
            d = x["new"].mean(0) - x["old"].mean(0)  # (hidden,)
            old_spread = (x["old"] @ router.weight[old].float().T).std(dim=0).mean()
            spread = (torch.cat([x["new"], x["old"]]) @ d).std()
            router.weight[new] = (d * old_spread / spread.clamp_min(1e-9)).to(router.weight.dtype)

        def share(bias: float, tokens: torch.Tensor, router=router) -> float:
            router.e_score_correction_bias[new] = bias
            return _share_to(router, tokens, new)

        old_bias = router.e_score_correction_bias[old & torch.isfinite(router.e_score_correction_bias)].float()
        lo = float(old_bias.min()) - DORMANT_MARGIN  # share 0 here
        hi = float(old_bias.max()) + DORMANT_MARGIN  # share 1 here
        for _ in range(40):  # bisection: both shares grow with the bias
            mid = (lo + hi) / 2
            ok = share(mid, x[which]) <= target if which == "old" else share(mid, x[which]) < target
            lo, hi = (mid, hi) if ok else (lo, mid)
        bias = lo if which == "old" else hi  # old: stay within the budget; new: reach the target
        report["new"][i] = share(bias, x["new"])
        report["old"][i] = share(bias, x["old"])
        report["bias"][i] = bias
    return report
