"""Add a vertical: grow a trained MoE by new experts, and train only them on a new domain.

The idea
--------
A Mixture-of-Experts model already divides its feed-forward knowledge among many small experts, and a
router decides, token by token, which ones run. That suggests a cheap way to teach a trained model a
new speciality (a new "vertical") without retraining it or damaging what it knows: **add an expert per
MoE layer, and train only the new experts and the router rows that send tokens to them.** Everything
else (attention, embeddings, shared experts, the old experts, the old router rows) stays frozen.

Three steps, each a function here:

1. ``add_expert(model, n, layers, init)`` grows each chosen MoE layer by ``n`` routed experts. Their
   weights start as a **copy** of an existing expert (by default the one the new domain already uses
   most), the **average** of the layer's experts, or **random** (the model's initialisation). Their
   router rows start the same way. Their balancing bias starts *dormant*: lower than any old expert's
   bias by more than the whole range of a sigmoid affinity, so the new experts are never selected and
   **the grown model computes exactly what the base computed**, token for token: in float64 the logits
   are identical (the tests check it). In float32 the router's matrix product has more rows, BLAS may
   sum in another order, and the two agree to rounding; a token whose k-th and (k+1)-th affinities tie
   within rounding can then pick the other expert. Layers not chosen still get the slots, since every
   layer of a config has the same number of experts, but there the new experts are *inactive*
   (``Router.active``, saved as ``config.inactive_experts``): never selected, never trained. The growing
   itself is the model's own seam, ``Model.grow_experts`` / ``MoE.grow``; this module decides what to
   grow from (the busiest expert of the new domain) and where the vertical lives.
2. ``wake_experts(model, added, new_ids, old_ids, old_rate)`` makes the new experts reachable for the
   new domain. Each new router row becomes a linear classifier of the new domain's tokens: logistic
   regression on the router's inputs x of new-domain against old-domain tokens (``fit_probe``; a router
   row computes ``sigmoid(x . w)``, exactly a logistic model without intercept). Then the dormant bias is
   raised, by bisection through the real router, as far as a *forgetting budget* allows: at most
   ``old_rate`` of the old domain's tokens may select a new expert (or, with ``rate``, until that share of
   new-domain tokens do). From here the old-domain function is no longer exact: it changes only where an
   old-domain token picks a new expert.
3. ``train_only_new_experts(model, added)`` is a context manager: inside it only the new experts, their
   router rows (and, if asked, the rows of new tokens in the embedding and the output head) receive
   gradients, and loss-free balancing moves only the new experts' biases. Any of our loops then trains
   the vertical: ``train_vertical`` (language modelling on the new domain mixed with replay of the old
   corpus: the cold start of the vertical's chain of thought, since its documents are worked traces),
   ``rl.sft.sft_train`` and ``rl.grpo.grpo_train`` (the chain of thought by RL). Because the experts
   are stored stacked, (E, I, D), freezing *some* experts of a tensor is done with gradient masks (a
   hook zeroes the old rows' gradients; AdamW with weight decay 0 then leaves them bit for bit
   unchanged, which the tests check).

What it buys: the trained parameters are a few percent of the model, the optimiser state shrinks in
proportion, and the backward pass skips the weight gradients of every frozen matrix (``VerticalReport``
reports trained vs total parameters and an estimate of the compute saved; lesson 9 measures the step
time).

What it cannot do: new experts are feed-forward networks. They learn new *mappings* of what attention
brings them, not new ways of *reading* the context. A vertical must lean on reading the base already does
(lesson 9: subtraction grown onto a model that adds works; Roman numerals grown onto ``data/tiny-model``,
which cannot copy a number out of its context, learn every letter and never the right digit).

Balancing: ``train_vertical`` keeps the new experts' bias where waking put it (``bias_update_speed`` 0
by default): loss-free balancing pushes every expert toward the mean load, and the only way for a new
expert to get it is to take old-domain tokens.

Where it simplifies
-------------------
Real systems that grow MoE models (e.g. "expert expansion" for new languages) also re-balance the
routers on a large replay set and sometimes unfreeze more; we keep the strict version so that what
changes is exactly what we added. With group-limited routing (``n_group > 1``) the new experts are
inserted at the end of each group, ``n / n_group`` per group, so that every old expert keeps its group;
so ``n`` must be a multiple of ``n_group``. The new tokens' rows (``<think>`` and friends) are the one
place the vertical touches shared weights, and only when ``train_tokens`` names them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.config import ConfigError
from workbench.io.files import CheckpointError, atomic_write_json, read_json
from workbench.model import Model
from workbench.model.moe import GrowthLayout, MoE
from workbench.util import eval_mode

INITS = ("copy", "average", "random")
DORMANT_MARGIN = 2.0  # dormant bias = min(old biases) - this; sigmoid affinities differ by less than 1
VERTICAL_FILE = "vertical.json"  # the description of what was added, saved next to a grown model


def moe_layers(model: Model) -> dict[int, MoE]:
    """Every MoE layer of the model by layer index (MTP layers have indices >= num_hidden_layers)."""
    return {b.mlp.layer_idx: b.mlp for b in [*model.layers, *model.mtp] if b.is_moe}


@dataclass
class AddedExperts:
    """What ``add_expert`` did: enough to train, inspect, save and reload the vertical."""

    n: int  # new experts per layer
    init: str
    layers: list[int]  # MoE layers whose new experts are live (trainable)
    absent_layers: list[int]  # MoE layers whose new slots are inactive (never routed; config.inactive_experts)
    new_experts: list[int]  # indices of the new experts in every grown layer
    old_to_new: list[int]  # old expert j now lives at index old_to_new[j]
    sources: dict[int, list[int]] = field(default_factory=dict)  # layer -> expert copied (copy init)
    experts_before: int = 0
    params_before: int = 0
    params_after: int = 0
    params_live: int = 0  # parameters of the live new experts and their router rows
    train_tokens: list[int] = field(default_factory=list)  # token ids whose embedding/head rows train

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    def describe(self) -> str:
        lines = [
            f"added {self.n} routed expert(s) per MoE layer ({self.experts_before} -> "
            f"{self.experts_before + self.n}), init={self.init!r}",
            f"live in layers {self.layers}"
            + (f", absent (never routed) in {self.absent_layers}" if self.absent_layers else ""),
            f"new expert indices {self.new_experts}",
            f"parameters {self.params_before:,} -> {self.params_after:,} (+{self.params_added:,}); "
            f"trainable in the vertical {self.params_live:,}",
        ]  # fmt: skip
        if self.sources:
            lines.append("copied from " + ", ".join(f"layer {k}: {v}" for k, v in sorted(self.sources.items())))
        return "\n".join(lines)

    def save(self, folder: str | Path) -> Path:
        """Write ``vertical.json`` into a model folder (atomically)."""
        path = Path(folder) / VERTICAL_FILE
        data = asdict(self)
        data["sources"] = {str(k): v for k, v in self.sources.items()}
        atomic_write_json(path, data)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> AddedExperts:
        path = Path(folder) / VERTICAL_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: this folder holds no grown model (save it with added.save)")
        data = read_json(path)
        data["sources"] = {int(k): v for k, v in data.get("sources", {}).items()}
        return cls(**data)


# =====================================================================================================
# 1. Growing the layers
# =====================================================================================================


@torch.no_grad()
def _expert_usage(model: Model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per MoE layer: how many routed slots each expert got on token ids (B, T)."""
    with eval_mode(model):
        out = model(ids.to(model.device), compute_mtp=len(model.mtp) > 0)
    return {s.layer_idx: s.counts.float().cpu() for s in out.routing}


@torch.no_grad()
def add_expert(
    model: Model,
    n: int = 1,
    layers: Sequence[int] | None = None,
    init: str = "copy",
    *,
    source: int | None = None,
    probe_ids: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[Model, AddedExperts]:
    """A copy of ``model`` with ``n`` more routed experts in every MoE layer; returns (grown, added).

    layers: MoE layer indices whose new experts are live (default: every MoE layer of the main model;
        MTP layers only if listed). The other MoE layers get the slots too (one config, one expert
        count) with the new experts inactive (``Router.active``, recorded in ``config.inactive_experts``).
    init: "copy" (weights and router row of an existing expert), "average" (of the layer's experts),
        "random" (normal with the model's initializer_range, router row too).
    source: the expert to copy (an index of the base). Default: in each layer and group, the expert
        the tokens of ``probe_ids`` (B, T) use most, or the first expert of the group without them.
    The new experts start dormant (never selected): the grown model's outputs equal the base's.
    """
    config = model.config
    if init not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer (experts to add per layer), got {n!r}")
    moes = moe_layers(model)
    if not moes:
        raise ConfigError("the model has no MoE layer to grow (first_k_dense_replace covers every layer)")
    E, G = config.n_routed_experts, config.n_group
    if n % G:
        raise ConfigError(
            f"n={n} new experts do not split evenly over n_group={G} routing groups; the new experts go "
            f"n / n_group to each group so that old experts keep their group: use n={G * max(1, round(n / G))}"
        )
    main = [i for i in moes if i < config.num_hidden_layers]
    live = sorted(main if layers is None else set(layers))
    unknown = [i for i in live if i not in moes]
    if unknown:
        raise ConfigError(f"layers {unknown} are not MoE layers; the MoE layers are {sorted(moes)}")
    if source is not None and not 0 <= source < E:
        raise ConfigError(f"source={source} is not an expert index (the layers have {E} experts)")

    params_before = model.num_parameters()
    grown = copy.deepcopy(model)
    layout = GrowthLayout(E, n, G)
    per_old, per_new = E // G, n // G
    sources: dict[int, list[int]] = {}
    if init == "copy":  # per layer and new slot: the given source, else the group's busiest expert on the probe
        usage = _expert_usage(model, probe_ids) if probe_ids is not None and source is None else {}
        for idx in moes:
            srcs = []
            for slot in range(n):
                group = slot // per_new
                if source is not None:
                    srcs.append(source)
                elif idx in usage:
                    srcs.append(group * per_old + int(usage[idx][group * per_old : (group + 1) * per_old].argmax()))
                else:
                    srcs.append(group * per_old)
            sources[idx] = srcs
    grown.grow_experts(n, live, init, sources=sources, generator=torch.Generator().manual_seed(seed),
                       margin=DORMANT_MARGIN)  # fmt: skip
    old_to_new, new = layout.old_to_new, layout.new
    sources = {idx: srcs for idx, srcs in sources.items() if idx in live}

    per_expert = 3 * config.moe_intermediate_size * config.hidden_size + config.hidden_size  # + router row
    added = AddedExperts(
        n=n,
        init=init,
        layers=live,
        absent_layers=sorted(set(moes) - set(live)),
        new_experts=new,
        old_to_new=old_to_new,
        sources=sources,
        experts_before=E,
        params_before=params_before,
        params_after=grown.num_parameters(),
        params_live=per_expert * n * len(live),
    )
    return grown, added


# =====================================================================================================
# 2. Waking the new experts for the new domain
# =====================================================================================================


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


# =====================================================================================================
# 3. Training only what was added
# =====================================================================================================


@dataclass
class Trainable:
    """What ``train_only_new_experts`` leaves trainable."""

    parameters: int  # entries that receive gradient
    total: int  # all parameters of the model
    tensors: list[str]  # names of the tensors that carry a (masked) gradient
    balance_masks: list[torch.Tensor] = field(default_factory=list)  # per router: the experts balancing may move

    @property
    def fraction(self) -> float:
        return self.parameters / self.total


@contextlib.contextmanager
def train_only_new_experts(
    model: Model, added: AddedExperts, *, train_router: bool = True, train_tokens: Sequence[int] = ()
) -> Iterator[Trainable]:
    """Inside the block only the live new experts (and their router rows, and the embedding and output
    rows of ``train_tokens``) get gradients; ``Trainable.balance_masks`` are the masks that make balancing
    move only the new experts' biases (pass them to the loop: ``balance_masks=trainable.balance_masks``).

    Use AdamW with weight decay 0 (decoupled decay would shrink the frozen rows too): every loop here
    (``train_vertical``, ``sft_train``, ``grpo_train``) does by default. On exit everything is as before.
    """
    moes = moe_layers(model)
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    hooks: list[Any] = []
    names: list[str] = []
    balance_masks: list[torch.Tensor] = []
    count = 0
    device = model.device

    def masked(p: torch.nn.Parameter, name: str, rows: torch.Tensor) -> None:
        nonlocal count
        shape = (-1,) + (1,) * (p.dim() - 1)
        mask = rows.to(device=p.device, dtype=p.dtype).view(shape)
        p.requires_grad_(True)
        hooks.append(p.register_hook(lambda g, m=mask: g * m))
        names.append(name)
        count += int(rows.sum()) * (p[0].numel())

    try:
        model.requires_grad_(False)
        for i, moe in moes.items():
            rows = torch.zeros(moe.gate.n_experts, dtype=torch.bool)
            if i in added.layers:
                rows[added.new_experts] = True
                for name in ("gate_proj", "up_proj", "down_proj"):
                    masked(getattr(moe.experts, name), f"layer {i} experts.{name}", rows)
                if train_router:
                    masked(moe.gate.weight, f"layer {i} gate.weight", rows)
            balance_masks.append(rows.to(device))
        if train_tokens:
            rows = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            rows[list(train_tokens)] = True
            masked(model.embed_tokens.weight, "embed_tokens.weight", rows)
            if model.lm_head.weight is not model.embed_tokens.weight:
                masked(model.lm_head.weight, "lm_head.weight", rows)
        yield Trainable(parameters=count, total=model.num_parameters(), tensors=names, balance_masks=balance_masks)
    finally:
        for h in hooks:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved.get(name, True))


def new_token_ids(tokenizer, base_tokens: torch.Tensor, texts: Sequence[str]) -> list[int]:
    """Token ids that occur in ``texts`` but never in the base corpus's tokens: their rows are untrained."""
    seen = set(base_tokens.unique().tolist())
    found = {t for text in texts for t in tokenizer.encode(text)}
    return sorted(found - seen)


@dataclass
class VerticalConfig:
    """The knobs of ``train_vertical``: language modelling on the new domain with replay of the old."""

    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3  # only a few small matrices train, so a pre-training-sized rate is safe
    warmup_steps: int = 10
    replay_fraction: float = 0.5  # share of the training tokens drawn from the base corpus
    n_new_docs: int = 600  # new-domain documents: train-split problems with their worked traces
    n_old_docs: int = 1000  # base-corpus documents for replay and the old-domain measurements
    bias_update_speed: float | None = 0.0  # gamma for the new experts' bias (None: the model's); see above
    train_router: bool = True
    train_new_tokens: bool = True  # the embedding/head rows of tokens the base never saw (<think>, ...)
    eval_every: int = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
        for name in ("steps", "batch_size", "seq_len", "n_new_docs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def vertical_dataset(task, cfg: VerticalConfig, tokenizer, replay: Sequence | None = None):
    """A ``TokenDataset`` of the new domain (``task`` problems with their traces, domain = task name) and
    of replay documents from what the base was trained on, enough of them to make ``replay_fraction``
    of the tokens. replay: those documents (``data.Document``); default: the five-domain corpus, drawn
    with another seed than the one the shipped tiny model was trained on."""
    from workbench.data import Document, TokenDataset, generate_corpus

    problems = task.sample(cfg.n_new_docs, seed=cfg.seed)
    new_docs = [Document(task.name, task.prompt(ex) + task.trace(ex)) for ex in problems]
    old_docs = list(replay) if replay is not None else generate_corpus(cfg.n_old_docs, seed=1000 + cfg.seed)
    if not old_docs:
        raise ValueError("replay holds no documents; the old domains are needed to measure forgetting")
    if any(d.domain == task.name for d in old_docs):
        raise ValueError(f"the replay documents already contain the new domain {task.name!r}")
    if cfg.replay_fraction > 0:
        new_tokens = sum(len(tokenizer.encode(d.text)) + 2 for d in new_docs)
        sample = old_docs[:100]
        per_old = sum(len(tokenizer.encode(d.text)) + 2 for d in sample) / len(sample)
        wanted = math.ceil(cfg.replay_fraction / (1 - cfg.replay_fraction) * new_tokens / per_old)
        kept = old_docs[: max(2, min(len(old_docs), wanted))]
    else:
        kept = old_docs[: max(2, len(old_docs) // 10)]  # kept for the old-domain measurements only
    return TokenDataset.from_documents(new_docs + kept, tokenizer, val_fraction=0.1, seed=cfg.seed)


def replay_documents(task, n: int = 2000, *, seed: int = 0, think_fraction: float = 0.5) -> list:
    """Documents like an R1 base's pre-training corpus for ``task`` (``rl.base.base_documents``, drawn with
    another seed), labelled with the task's name as their domain: the replay of a vertical grown on it."""
    from workbench.data import Document
    from workbench.rl.base import base_documents

    return [Document(task.name, d.text) for d in base_documents(task, n, seed=seed, think_fraction=think_fraction)]


@dataclass
class VerticalReport:
    trainable: Trainable
    added: AddedExperts
    metrics: list[dict[str, Any]]
    seconds: float
    flops_saved: float  # estimated share of a full fine-tuning step's FLOPs that is skipped

    def summary(self) -> str:
        t = self.trainable
        return (
            f"trained {t.parameters:,} of {t.total:,} parameters ({100 * t.fraction:.2f}%); "
            f"optimizer state {2 * t.parameters * 4 / 1e6:.2f} MB instead of {2 * t.total * 4 / 1e6:.2f} MB; "
            f"about {100 * self.flops_saved:.0f}% of a full fine-tuning step's FLOPs skipped; {self.seconds:.0f} s"
        )


def flops_saved_estimate(model: Model, trainable: Trainable) -> float:
    """Share of training FLOPs skipped when only ``trainable`` parameters get weight gradients.

    Per token a full step costs about 6 x active parameters (2 forward, 2 for the gradients of the
    activations, 2 for the gradients of the weights). Frozen weights skip their 2; the activations'
    gradients are still needed below the first trainable layer's top, so they stay (an upper bound).
    """
    from workbench.model.accounting import count_params

    active = count_params(model.config)["active"]
    return (2 * active - 2 * min(trainable.parameters, active)) / (6 * active)


def train_vertical(
    model: Model,
    added: AddedExperts,
    task,
    cfg: VerticalConfig | None = None,
    *,
    dataset=None,
    tokenizer=None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> VerticalReport:
    """Teach the new experts the new domain (in place): LM training with ``workbench.train.train`` on
    the new domain's worked problems mixed with replay of the base corpus, everything else frozen."""
    from workbench.io.tokenizer import tokenizer_of
    from workbench.train import TrainConfig, train

    cfg = cfg or VerticalConfig()
    tok = tokenizer_of(model, tokenizer)
    dataset = dataset if dataset is not None else vertical_dataset(task, cfg, tok)
    tokens: list[int] = []
    if cfg.train_new_tokens:
        old = [d for d in dataset.domains if d != task.name]
        old_ids = torch.tensor([dataset.domains.index(d) for d in old])
        old_stream = dataset.tokens["train"][torch.isin(dataset.token_domains["train"], old_ids)]
        tokens = new_token_ids(tok, old_stream, [task.trace(ex) for ex in task.sample(50, seed=cfg.seed)])
    added.train_tokens = tokens
    tc = TrainConfig(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        weight_decay=0.0,  # decoupled decay would shrink the frozen rows of the stacked experts
        bias_update_speed=cfg.bias_update_speed,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        device=cfg.device,
    )
    t0 = time.perf_counter()
    with train_only_new_experts(model, added, train_router=cfg.train_router, train_tokens=tokens) as trainable:
        result = train(model.config, tc, out_dir, dataset=dataset, model=model, progress=progress, overwrite=True,
                       balance_masks=trainable.balance_masks)  # fmt: skip
    if out_dir is not None:
        added.save(Path(out_dir))
    return VerticalReport(
        trainable=trainable,
        added=added,
        metrics=result.metrics,
        seconds=time.perf_counter() - t0,
        flops_saved=flops_saved_estimate(model, trainable),
    )


@torch.no_grad()
def completion_loss(model: Model, task, n_problems: int = 64, *, tokenizer=None, split: str = "test") -> float:
    """Mean next-token loss of a task's worked completions (trace and answer) given their prompts, on
    held-out problems: what the model knows of the task, without the loss of guessing the question."""
    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.sft import sft_batch

    tok = tokenizer_of(model, tokenizer)
    pairs = [(task.prompt(ex), task.trace(ex)) for ex in task.sample(n_problems, seed=0, split=split)]
    ids, labels = sft_batch(tok, pairs)
    with eval_mode(model):
        loss = float(model(ids.to(model.device), labels=labels.to(model.device), compute_mtp=False).main_loss)
    return loss


@torch.no_grad()
def vertical_metrics(
    model: Model,
    task,
    dataset,
    added: AddedExperts | None = None,
    *,
    old_task=None,
    tokenizer=None,
    n_problems: int = 64,
    max_new_tokens: int = 64,
    n_batches: int = 4,
) -> dict[str, Any]:
    """Everything the lesson compares before and after: new-domain accuracy (greedy, held-out problems),
    the old task's (with ``old_task``), validation loss per domain; with ``added`` also the share of each
    domain's tokens that pick a new expert, per layer, and the load balance (MaxVio over the experts that
    exist) of each grown layer."""
    from workbench.io.tokenizer import tokenizer_of
    from workbench.rl.rollout import held_out_evaluator
    from workbench.train.measure import expert_usage_by_domain, loss_by_domain

    tok = tokenizer_of(model, tokenizer)

    def greedy(t) -> dict[str, Any]:
        return held_out_evaluator(t, tok, n_problems, max_new_tokens=max_new_tokens)(model)

    ev = greedy(task)
    out = {"accuracy": ev["accuracy"], "format": ev["format"], "length": ev["length"]}
    out["completion_loss"] = completion_loss(model, task, n_problems, tokenizer=tok)
    if old_task is not None:
        out["old_accuracy"] = greedy(old_task)["accuracy"]
        out["old_completion_loss"] = completion_loss(model, old_task, n_problems, tokenizer=tok)
    out["loss"] = loss_by_domain(model, dataset, n_batches=n_batches)
    if added is None:
        return out
    new_share: dict[int, dict[str, float]] = {layer: {} for layer in added.layers}
    for d in dataset.domains:  # share of each domain's tokens that send a slot to a new expert
        rates = selection_rate(model, added, domain_windows(dataset, d, 8 * n_batches).to(model.device))
        for layer, rate in rates.items():
            new_share[layer][d] = rate
    usage = expert_usage_by_domain(model, dataset, n_batches=n_batches)  # (main MoE layers, domains, E)
    main = [i for i in moe_layers(model) if i < model.config.num_hidden_layers]
    load = usage.mean(dim=1)  # (layers, E): share of the slots, the domains weighted equally
    maxvio = {}
    for li, layer in enumerate(main):
        if layer in added.layers:
            live = load[li][torch.isfinite(moe_layers(model)[layer].gate.e_score_correction_bias.cpu())]
            maxvio[layer] = float((live.max() - live.mean()) / live.mean())
    return {**out, "new_expert_share": new_share, "maxvio": maxvio}


def run_vertical(
    base: str | Path | Model | None = None,
    task_name: str = "sub",
    out: str | Path | None = None,
    *,
    replay_task: str | None = "add",
    scale: str = "laptop",
    n: int | None = None,
    layers: Sequence[int] | None = None,
    init: str = "copy",
    old_rate: float = 0.05,
    steps: int = 3000,
    replay: float = 0.75,
    lr: float = 3e-3,
    grpo_steps: int = 20,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole recipe (``python -m workbench vertical``): grow, wake, train the new experts on the new
    domain, GRPO them, measure before and after. Writes OUT/model and OUT/report.json.

    base: a model or a model folder; None pre-trains the R1 base of ``replay_task`` at ``scale``
        (``rl.pipeline.make_base``, about two minutes on a laptop for ``add``).
    replay_task: the task the base was trained on: its documents are the replay, and its held-out
        accuracy is the old-domain accuracy. None: the base is a five-domain model such as
        ``data/tiny-model``, and the replay is the generated corpus.
    """
    from workbench.io.hf import load_hf
    from workbench.io.tokenizer import load_tokenizer
    from workbench.rl.grpo import GRPOConfig, grpo_train
    from workbench.rl.pipeline import get_scale, make_base
    from workbench.tasks import get_task
    from workbench.util import resolve_device

    out = Path(out) if out is not None else None
    if out is not None and (out / "model").exists() and not overwrite:
        raise CheckpointError(f"{out / 'model'} exists; pass overwrite=True (--overwrite) or choose another folder")
    tok, task = load_tokenizer(), get_task(task_name)
    old_task = get_task(replay_task) if replay_task is not None else None
    if isinstance(base, Model):
        model = base
    elif base is not None:
        model = load_hf(base, device=resolve_device(device))
    elif old_task is not None:
        model = make_base(old_task, scale, seed=seed, progress=progress)
    else:
        raise ValueError("give a base model (a folder), or a replay_task whose R1 base to pre-train")
    cfg = VerticalConfig(steps=steps, replay_fraction=replay, lr=lr, eval_every=0, seed=seed, device=device)
    docs = None
    if old_task is not None:
        docs = replay_documents(old_task, seed=seed + 7, think_fraction=get_scale(scale).think_fraction)
    dataset = vertical_dataset(task, cfg, tok, replay=docs)
    measure = dict(old_task=old_task, tokenizer=tok)
    before = vertical_metrics(model, task, dataset, **measure)
    new_ids = domain_windows(dataset, task.name, 16, seed=seed).to(model.device)
    old_ids = old_windows(dataset, task.name, 32, seed=seed).to(model.device)
    n = n or 2 * model.config.n_group  # two per routing group: what lesson 9 found enough for subtraction
    grown, added = add_expert(model, n, layers, init, probe_ids=new_ids, seed=seed)
    woken = wake_experts(grown, added, new_ids, old_ids, old_rate=old_rate)
    report = train_vertical(grown, added, task, cfg, dataset=dataset, tokenizer=tok, progress=progress)
    stages = {"base": before, "cold_start": vertical_metrics(grown, task, dataset, added, **measure)}
    if grpo_steps:
        g = GRPOConfig(steps=grpo_steps, eval_every=0, lr=1e-4, beta=0.04, seed=seed, device=device,
                       bias_update_speed=cfg.bias_update_speed)  # fmt: skip
        with train_only_new_experts(grown, added) as trainable:
            grpo_train(grown, task, g, tokenizer=tok, progress=progress, balance_masks=trainable.balance_masks)
        stages["grpo"] = vertical_metrics(grown, task, dataset, added, **measure)
    last = stages[list(stages)[-1]]
    summary = {
        "added": added.describe(),
        "trained": report.summary(),
        "accuracy": {k: v["accuracy"] for k, v in stages.items()},
        "old_accuracy": {k: v.get("old_accuracy") for k, v in stages.items()},
        "old_completion_loss": {k: v.get("old_completion_loss") for k, v in stages.items()},
        "old_domain_loss_change": {
            d: last["loss"][d] / before["loss"][d] - 1 for d in before["loss"] if d != task.name
        },
    }
    result = {"summary": summary, "stages": stages, "wake": woken, "added": asdict(added), "seconds": report.seconds}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_vertical(grown, added, out / "model")
        atomic_write_json(out / "report.json", json.loads(json.dumps(result, default=str)))
    result["model"] = grown
    return result


def save_vertical(model: Model, added: AddedExperts, folder: str | Path) -> Path:
    """The grown model as a Hugging Face folder (like any other) plus ``vertical.json``."""
    from workbench.io.hf import save_hf

    folder = Path(folder)
    save_hf(model, folder)
    added.save(folder)
    return folder


def load_vertical(folder: str | Path) -> tuple[Model, AddedExperts]:
    from workbench.io.hf import load_hf

    return load_hf(folder), AddedExperts.load(folder)


def domain_windows(dataset, domain: str, n: int = 8, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, seq_len) validation windows of one domain of a ``TokenDataset``."""
    ids, _ = dataset.domain_batch(domain, "val", n, seq_len, torch.Generator().manual_seed(seed))
    return ids


def old_windows(dataset, new_domain: str, n: int = 8, seq_len: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, seq_len) validation windows spread over every domain but ``new_domain``."""
    old = [d for d in dataset.domains if d != new_domain]
    rng = random.Random(seed)
    rows = [domain_windows(dataset, rng.choice(old), 1, seq_len, seed + i) for i in range(n)]
    return torch.cat(rows)


__all__ = [
    "DORMANT_MARGIN",
    "INITS",
    "PROBES",
    "AddedExperts",
    "Trainable",
    "VerticalConfig",
    "VerticalReport",
    "add_expert",
    "domain_windows",
    "fit_probe",
    "completion_loss",
    "flops_saved_estimate",
    "load_vertical",
    "run_vertical",
    "vertical_metrics",
    "moe_layers",
    "new_token_ids",
    "old_windows",
    "replay_documents",
    "save_vertical",
    "selection_rate",
    "train_only_new_experts",
    "train_vertical",
    "vertical_dataset",
    "wake_experts",
]
