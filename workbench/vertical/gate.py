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

Where it simplifies: a linear probe on mean features separates domains whose prompts differ in shape (addition
vs a records lookup) perfectly, and same-shaped ones (subtraction with and without borrowing) only as well as
a mean feature can tell them apart: that is a digit comparison, and the probe misroutes some requests. A
production router would be a small trained classifier on more than mean features, or an explicit API route.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from workbench.model import Model
from workbench.util import eval_mode
from workbench.vertical.wake import fit_probe

OLD = None  # the route of a request that no vertical claims: the base


@torch.no_grad()
def prompt_features(base: Model, prompts: Sequence[str], tokenizer, batch: int = 64) -> torch.Tensor:
    """(N, D): per prompt, the mean over its tokens of the base's last hidden state."""
    from workbench.rl.rollout import encode_prompt

    return token_features(base, [encode_prompt(tokenizer, p) for p in prompts])


@torch.no_grad()
def token_features(base: Model, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """(N, D): ``prompt_features`` of prompts already encoded (token ids, as a server receives them)."""
    feats = []
    with eval_mode(base):
        for p in prompts:  # prompts differ in length; one at a time keeps the mean exact (no padding)
            ids = torch.tensor([list(p)], device=base.device)
            feats.append(base(ids, compute_mtp=False).hidden[0].float().mean(0).cpu())  # (D,)
    return torch.stack(feats)


@dataclass
class DomainGate:
    """One probe per vertical on the base's prompt features: ``route(prompts)`` names each prompt's vertical."""

    base: Model
    tokenizer: object
    probes: dict[str, torch.Tensor] = field(default_factory=dict)  # vertical name -> w (D,)

    @classmethod
    def fit(cls, base: Model, tokenizer, verticals: dict[str, Sequence[str]], old: Sequence[str]) -> DomainGate:
        """Fit one probe per vertical: its prompts against the old prompts and the other verticals' prompts."""
        if not verticals:
            raise ValueError("give at least one vertical's training prompts to fit the gate")
        for name, prompts in [*verticals.items(), ("old", old)]:
            if len(prompts) < 2:
                raise ValueError(f"the gate needs at least 2 training prompts per domain; {name!r} has {len(prompts)}")
        feats = {name: prompt_features(base, p, tokenizer) for name, p in verticals.items()}
        old_feats = prompt_features(base, old, tokenizer)
        probes = {}
        for name, x in feats.items():
            others = torch.cat([old_feats, *(f for n, f in feats.items() if n != name)])
            probes[name] = fit_probe(x, others)
        return cls(base, tokenizer, probes)

    def logits(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, V): each vertical's probe logit per prompt (columns in the order of ``probes``)."""
        x = prompt_features(self.base, prompts, self.tokenizer)
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
        x = token_features(self.base, prompts)
        return self._pick(torch.stack([x @ w for w in self.probes.values()], dim=1))

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


__all__ = ["OLD", "DomainGate", "Verticals", "gated_choice", "prompt_features", "token_features"]
