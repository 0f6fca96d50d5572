"""The per-request domain gate: switch a vertical's delta on for its own requests, and off for everything else.

Why
---
Every delta method forgets something when its delta is always on: trained on the new domain alone, it
overwrites how the base answers the old one; mixed with replay, it learns less of the new one. A request,
though, is one domain at a time. So read the request first, with the *untouched base*, and decide which
model answers it: the base (exactly the base: nothing forgotten) or the base with the vertical's delta.

How
---
The feature of a request is the mean over its prompt tokens of the base's last hidden state (D,). For each
vertical a logistic probe (``wake.fit_probe``, the same classifier that wakes new experts) separates that
vertical's training prompts from the old task's and from the other verticals'. A request goes to the
vertical whose probe gives the largest positive logit, or to the base when none is positive. With one
delta per vertical switched per request, verticals compose without summing their weights (summed deltas
collapse: two attention adapters add up, two sets of new experts wake on both domains).

Two gates
---------
``probe="linear"`` (the default): the features above, one logistic probe per vertical. It separates domains
whose prompts differ in shape (addition vs a records lookup) perfectly, and same-shaped ones (subtraction
with and without borrowing) only as well as a linear function of a mean can: telling them apart is a digit
comparison (is the first number's ones digit below the second's?), and the probe misroutes some requests
(``scripts/vertical_compare.py compose`` measures it). That is where two verticals on one base conflict:
never in the weights, always in the routing.

``probe="mlp"`` resolves it: the features are every layer's hidden state at the last prompt token (the
position that has read the whole question) and the mean of the last layer, standardised, and one small MLP
(one hidden layer) classifies a request into the old domain or one of the verticals, trained with Adam on
the same prompts. A comparison of digits is an interaction, which a hidden layer can represent and a
single linear probe cannot.

Where it simplifies: both gates are fit on a few hundred prompts per domain and never updated; a
production router would be trained on logged traffic, or requests would carry an explicit route.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workbench.model import Model
from workbench.util import eval_mode
from workbench.vertical.wake import fit_probe

OLD = None  # the route of a request that no vertical claims: the base


FEATURES = ("mean", "layers")
GATES = ("linear", "mlp")


@torch.no_grad()
def prompt_features(base: Model, prompts: Sequence[str], tokenizer, kind: str = "mean") -> torch.Tensor:
    """Per prompt, what the untouched base makes of it. kind "mean": (N, D), the mean over its tokens of the
    last hidden state; "layers": (N, (L + 1) D), every layer's output at the last token, then that mean."""
    from workbench.rl.rollout import encode_prompt

    return token_features(base, [encode_prompt(tokenizer, p) for p in prompts], kind)


@torch.no_grad()
def token_features(base: Model, prompts: Sequence[Sequence[int]], kind: str = "mean") -> torch.Tensor:
    """``prompt_features`` of prompts already encoded (token ids, as a server receives them)."""
    if kind not in FEATURES:
        raise ValueError(f"prompt features must be one of {FEATURES}, got {kind!r}")
    captured: list[torch.Tensor] = []
    hooks = []
    if kind == "layers":
        hooks = [blk.register_forward_hook(lambda m, a, out: captured.append(out[0][0, -1])) for blk in base.layers]
    feats = []
    try:
        with eval_mode(base):
            for p in prompts:  # prompts differ in length; one at a time keeps the mean exact (no padding)
                captured.clear()
                ids = torch.tensor([list(p)], device=base.device)
                mean = base(ids, compute_mtp=False).hidden[0].float().mean(0)  # (D,)
                feats.append(torch.cat([*(c.float() for c in captured), mean]).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(feats)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, classes: int, hidden: int = 128, steps: int = 1500,
            seed: int = 0) -> torch.nn.Module:  # fmt: skip
    """A one-hidden-layer classifier of standardised features x (N, F) into ``classes`` (labels y (N,)), trained
    full-batch with Adam on cross-entropy, the classes weighted equally; deterministic for a seed."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    gen = torch.Generator().manual_seed(seed)
    lin1, lin2 = torch.nn.Linear(x.shape[1], hidden), torch.nn.Linear(hidden, classes)
    with torch.no_grad():
        for lin in (lin1, lin2):
            bound = 1 / lin.in_features**0.5
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen) * 2 * bound - bound)
            lin.bias.zero_()
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], x.shape[1]), lin1, torch.nn.GELU(), lin2)
    with torch.no_grad():  # the first layer is the standardisation, frozen
        net[0].weight.copy_(torch.diag(1 / sd))
        net[0].bias.copy_(-mu / sd)
    net[0].requires_grad_(False)
    counts = torch.bincount(y, minlength=classes).clamp(min=1).float()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y, weight=counts.sum() / counts).backward()
            opt.step()
    return net.requires_grad_(False).eval()


@dataclass
class DomainGate:
    """One probe per vertical on the base's prompt features: ``route(prompts)`` names each prompt's vertical."""

    base: Model
    tokenizer: object
    probes: dict[str, torch.Tensor] = field(default_factory=dict)  # vertical name -> w (D,); for "mlp": None
    probe: str = "linear"  # "linear" (one logistic probe per vertical) or "mlp" (one classifier of all)
    net: torch.nn.Module | None = None  # the "mlp" classifier: classes [old, *probes]

    @classmethod
    def fit(cls, base: Model, tokenizer, verticals: dict[str, Sequence[str]], old: Sequence[str],
            probe: str = "linear", seed: int = 0) -> DomainGate:  # fmt: skip
        """Fit the gate on each vertical's training prompts and the old domain's. "linear": one probe per
        vertical, its prompts against the old prompts and the other verticals'; "mlp": one classifier."""
        if probe not in GATES:
            raise ValueError(f"probe must be one of {GATES} (the gate's classifier), got {probe!r}")
        if not verticals:
            raise ValueError("give at least one vertical's training prompts to fit the gate")
        for name, prompts in [*verticals.items(), ("old", old)]:
            if len(prompts) < 2:
                raise ValueError(f"the gate needs at least 2 training prompts per domain; {name!r} has {len(prompts)}")
        kind = "mean" if probe == "linear" else "layers"
        feats = {name: prompt_features(base, p, tokenizer, kind) for name, p in verticals.items()}
        old_feats = prompt_features(base, old, tokenizer, kind)
        if probe == "mlp":
            x = torch.cat([old_feats, *feats.values()])
            y = torch.cat([torch.full((len(f),), i) for i, f in enumerate([old_feats, *feats.values()])])
            net = fit_mlp(x, y, 1 + len(feats), seed=seed)
            return cls(base, tokenizer, dict.fromkeys(feats), probe="mlp", net=net)
        probes = {}
        for name, x in feats.items():
            others = torch.cat([old_feats, *(f for n, f in feats.items() if n != name)])
            probes[name] = fit_probe(x, others)
        return cls(base, tokenizer, probes)

    def logits(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, V): per prompt, each vertical's logit against the base (columns in the order of ``probes``;
        positive: that vertical rather than the base)."""
        from workbench.rl.rollout import encode_prompt

        return self.logits_ids([encode_prompt(self.tokenizer, p) for p in prompts])

    def logits_ids(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """``logits`` for prompts already encoded (token ids)."""
        if self.probe == "mlp":
            with torch.no_grad():
                z = self.net(token_features(self.base, prompts, "layers"))  # (N, 1 + V)
            return z[:, 1:] - z[:, :1]
        x = token_features(self.base, prompts)
        return torch.stack([x @ w for w in self.probes.values()], dim=1)

    def route(self, prompts: Sequence[str]) -> list[str | None]:
        """Per prompt: the vertical with the largest positive logit, or None (the base)."""
        if not prompts:
            return []
        return self._pick(self.logits(prompts))

    def route_ids(self, prompts: Sequence[Sequence[int]]) -> list[str | None]:
        """``route`` for prompts already encoded (token ids)."""
        if not prompts:
            return []
        return self._pick(self.logits_ids(prompts))

    def _pick(self, z: torch.Tensor) -> list[str | None]:
        names = list(self.probes)
        best = z.argmax(dim=1)
        return [names[int(b)] if float(z[i, b]) > 0 else OLD for i, b in enumerate(best)]


def gated_choice(routes: Sequence[str | None], per_model: dict[str | None, Sequence[float]]) -> float:
    """Mean of the score the routed model got on each request (``per_model[route][i]``): gated accuracy from
    each model's per-request correctness, exactly what serving behind the gate would score."""
    if not routes:
        raise ValueError("no requests to score")
    return sum(float(per_model[r][i]) for i, r in enumerate(routes)) / len(routes)


class Verticals:
    """Several verticals on one base, each request answered by its own delta or by the base."""

    def __init__(self, base: Model, models: dict[str, Model], gate: DomainGate) -> None:
        unknown = set(gate.probes) - set(models)
        if unknown:
            raise ValueError(f"the gate routes to {sorted(unknown)} but no delta is loaded for them")
        self.base, self.models, self.gate = base, models, gate

    def model_for(self, route: str | None) -> Model:
        return self.base if route is OLD else self.models[route]

    def correctness(self, task, examples, tokenizer, max_new_tokens: int = 64) -> tuple[list[str | None], list[float]]:
        """Greedy correctness of each example, answered by the model its prompt is routed to."""
        from workbench.rl.rollout import evaluate

        routes = self.gate.route([task.prompt(ex) for ex in examples])
        out = [0.0] * len(examples)
        for r in set(routes):
            idx = [i for i, x in enumerate(routes) if x == r]
            res = evaluate(self.model_for(r), task, [examples[i] for i in idx], tokenizer,
                           max_new_tokens=max_new_tokens, return_samples=True)  # fmt: skip
            for i, s in zip(idx, res["samples"], strict=True):
                out[i] = float(s[2])
        return routes, out


__all__ = [
    "FEATURES",
    "GATES",
    "OLD",
    "DomainGate",
    "Verticals",
    "fit_mlp",
    "gated_choice",
    "prompt_features",
    "token_features",
]
