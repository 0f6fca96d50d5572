"""Ways to specialise a trained MoE, behind one recipe: which parameters a method trains, and how.

The methods (``Recipe.method``; parts joined with ``+`` combine, e.g. ``lora+lora_mlp+newexp``):

``full``
    Every parameter trains, the balancing bias keeps balancing: the ceiling, and the forgetting baseline.
    It changes the base, so it ships as a whole model, not a delta.
``esft_gate`` / ``esft_token``
    ESFT (``esft.py``): per MoE layer the experts whose normalised average gate score (or token-selection
    ratio) on the new domain first reaches ``esft_p``; only those rows of the stacked expert tensors train.
``newexp``
    ``grow.add_expert`` (``new_experts`` per layer, by default two per routing group), ``wake.wake_experts``
    (the forgetting budget ``old_rate``), and only the new experts and their router rows train.
``lora`` / ``lora_mlp`` / ``lora_exp``
    Low-rank adapters through ``peft`` (``inject_adapter_in_model`` on our plain module): on MLA's
    projections (``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``), on the dense
    MLP and the shared experts, or on the stacked routed experts (``target_parameters``). LoRA on attention
    is what lets a vertical learn a new way of *reading* the prompt, which experts (feed-forward networks)
    cannot.

Every method but ``full`` also trains the embedding and output-head rows of the tokens the base corpus
never contained (`` -``, `` borrow``...): without them a frozen model cannot even write the new symbols.
Every method but ``full`` freezes the balancing bias (the base's routing is part of the frozen base).
Row-trained tensors (expert rows, router rows, token rows) are masked with gradient hooks (``RowMasks``);
AdamW with weight decay 0 leaves the other rows bit for bit unchanged, so a method's *delta* is exactly
its trained rows and adapters (``delta.py``).

Where it simplifies: peft's LoRA factors are not shared across experts (``lora_exp`` costs r x (in + out)
per expert); the paper versions of these methods tune far more hyper-parameters than ``Recipe`` exposes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.config import ConfigError
from workbench.model import Model
from workbench.vertical.esft import esft_select
from workbench.vertical.freeze import new_token_ids
from workbench.vertical.grow import add_expert, moe_layers
from workbench.vertical.measure import domain_windows, old_windows
from workbench.vertical.wake import wake_experts

PARTS = ("full", "esft_gate", "esft_token", "newexp", "lora", "lora_mlp", "lora_exp")
ATTENTION = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "shared_experts.gate_proj",
             "shared_experts.up_proj", "shared_experts.down_proj")  # fmt: skip
ROUTED = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")
EXPERT_TENSORS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Recipe:
    """One specialisation run: the method, its knobs, the data mix and the budget (the same for every method)."""

    method: str = "lora+lora_mlp+newexp"  # parts of PARTS joined by '+' (full, esft_gate, esft_token, newexp, ...)
    task: str = "borrow"  # the new domain (a task of workbench.tasks)
    old_task: str = "add"  # what the base knows: its documents are replayed, its accuracy watched
    steps: int = 1000  # optimiser steps of the cold start
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 1e-2  # peak learning rate (warmup, then cosine)
    warmup_steps: int = 30
    replay: float = 0.0  # share of the training tokens replayed from the old task's corpus, in [0, 1)
    n_new_docs: int = 1000  # worked new-domain problems (train split) to train on
    rank: int = 8  # LoRA rank
    alpha: float = 0.0  # LoRA alpha (0: 2 x rank)
    esft_p: float = 0.2  # ESFT threshold: cumulative normalised score to cover per layer, in (0, 1]
    new_experts: int = 0  # experts added per MoE layer by newexp (0: two per routing group)
    old_rate: float = 0.05  # newexp's forgetting budget at wake-up (share of old tokens allowed on new experts)
    train_new_tokens: bool = True  # train the embedding/head rows of tokens the base never saw
    seed: int = 0
    eval_problems: int = 200  # held-out new-task problems (greedy)
    old_eval_problems: int = 1000  # held-out old-task problems (greedy; the same ones every run: paired)
    max_new_tokens: int = 64
    gate: bool = True  # also measure the delta behind the per-request gate (gate.py)
    grpo_steps: int = 0  # GRPO steps after the cold start, restricted to the method's parameters (0: none)
    grpo_lr: float = 3e-4  # measured on the delta of the grpo plan (a 1e-3 rate drifted below its cold start)
    grpo_temperature: float = 0.7
    grpo_beta: float = 0.0
    device: str = "cpu"

    def __post_init__(self) -> None:
        _ = self.parts  # validates the method
        for name in ("steps", "batch_size", "seq_len", "n_new_docs", "rank", "eval_problems", "old_eval_problems",
                     "max_new_tokens"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"recipe field {name} must be an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "new_experts", "grpo_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"recipe field {name} must be an integer >= 0, got {v!r}")
        for name in ("lr", "alpha", "esft_p", "old_rate", "replay", "grpo_lr", "grpo_temperature", "grpo_beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"recipe field {name} must be a finite number, got {v!r}")
        if self.lr <= 0:
            raise ConfigError(f"recipe field lr must be > 0, got {self.lr}")
        if not 0.0 < self.esft_p <= 1.0:
            raise ConfigError(f"esft_p must be in (0, 1] (the share of each layer's score to cover), got {self.esft_p}")
        if not 0.0 <= self.replay < 1.0:
            raise ConfigError(f"replay must be in [0, 1) (the share of replayed old-task tokens), got {self.replay}")
        if not 0.0 <= self.old_rate <= 1.0:
            raise ConfigError(f"old_rate must be in [0, 1], got {self.old_rate}")
        from workbench.tasks import task_names

        for name in ("task", "old_task"):
            if getattr(self, name) not in task_names():
                raise ConfigError(f"recipe field {name}: unknown task {getattr(self, name)!r}; "
                                  f"choose one of {', '.join(task_names())}")  # fmt: skip
        if self.task == self.old_task:
            raise ConfigError(f"task and old_task are both {self.task!r}; the vertical must be a new domain")

    @property
    def parts(self) -> list[str]:
        parts = self.method.split("+") if isinstance(self.method, str) else []
        unknown = [p for p in parts if p not in PARTS]
        if not parts or unknown:
            raise ConfigError(f"unknown method {self.method!r} (part {unknown[0] if unknown else ''!r}); a method is "
                              f"one or more of {', '.join(PARTS)} joined by '+', e.g. lora+newexp")  # fmt: skip
        if len(set(parts)) != len(parts):
            raise ConfigError(f"method {self.method!r} names a part twice; name each once")
        if "full" in parts and len(parts) > 1:
            raise ConfigError(f"method {self.method!r}: full already trains everything; use 'full' alone")
        if "lora_exp" in parts and any(p in parts for p in ("newexp", "esft_gate", "esft_token")):
            raise ConfigError(f"method {self.method!r}: lora_exp wraps the stacked expert tensors, which newexp and "
                              "ESFT train row by row; combine newexp or ESFT with lora / lora_mlp instead")  # fmt: skip
        if "esft_gate" in parts and "esft_token" in parts:
            raise ConfigError(f"method {self.method!r}: choose one ESFT score, esft_gate or esft_token")
        return parts

    @property
    def is_delta(self) -> bool:
        return self.parts != ["full"]

    @property
    def lora_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank


class RowMasks:
    """Tensors trained row by row: a hook multiplies each gradient by a 0/1 row mask (``rows`` (E,) bool)."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []
        self.rows: dict[str, torch.Tensor] = {}  # parameter name -> trained rows (bool); whole tensors: all True

    def add(self, model: Model, name: str, rows: torch.Tensor | None = None) -> None:
        p = dict(model.named_parameters())[name]
        rows = torch.ones(p.shape[0], dtype=torch.bool) if rows is None else rows.bool().cpu()
        if name in self.rows:  # two parts train rows of the same tensor: the union
            rows = rows | self.rows[name]
            self.remove_hook(name)
        p.requires_grad_(True)
        if not bool(rows.all()):
            mask = rows.to(device=p.device, dtype=p.dtype).view((-1,) + (1,) * (p.dim() - 1))
            self.hooks.append((name, p.register_hook(lambda g, m=mask: g * m)))
        self.rows[name] = rows

    def remove_hook(self, name: str) -> None:
        for n, h in [x for x in self.hooks if x[0] == name]:
            h.remove()
            self.hooks.remove((n, h))

    def count(self, model: Model) -> int:
        params = dict(model.named_parameters())
        return sum(int(r.sum()) * params[n][0].numel() for n, r in self.rows.items())

    def close(self) -> None:
        for _, h in self.hooks:
            h.remove()
        self.hooks = []


@dataclass
class Prepared:
    """A copy of the base made trainable for a recipe: the model, what trains, and how to rebuild its shape."""

    model: Model
    masks: RowMasks
    structure: dict[str, Any]  # what delta.apply_delta repeats on the base: growth, adapters
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def trained_parameters(self) -> int:
        return self.masks.count(self.model)


def lora_targets(model: Model, parts: list[str]) -> tuple[list[str], list[str]]:
    """peft ``target_modules`` and ``target_parameters`` for the LoRA parts present in the model."""
    modules = [*(ATTENTION if "lora" in parts else ()), *(DENSE_MLP if "lora_mlp" in parts else ())]
    names = [n for n, _ in model.named_modules()]
    present = [t for t in modules if any(n.endswith("." + t) for n in names)]  # q_proj is absent with q_lora_rank
    params = list(ROUTED) if "lora_exp" in parts else []
    return present, params


def inject_lora(model: Model, structure: dict[str, Any]) -> Model:
    """Inject the adapters ``structure["lora"]`` describes (in place; peft's init drawn from its own seed)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError(
            "the lora methods of workbench.vertical use the peft library, which is not installed; "
            'install it with: pip install -e ".[vertical]"'
        ) from None

    spec = structure["lora"]
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=spec["modules"] or [],
                     target_parameters=spec["parameters"] or None)  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG: keep runs reproducible
        torch.manual_seed(spec["seed"])
        return inject_adapter_in_model(cfg, model)


def grow_like(model: Model, structure: dict[str, Any]) -> Model:
    """Grow ``model`` (in place) exactly as ``structure["grow"]`` records (same slots, same initial rows)."""
    from workbench.vertical.grow import DORMANT_MARGIN

    g = structure["grow"]
    model.grow_experts(g["n"], g["layers"], g["init"], sources={int(k): v for k, v in g["sources"].items()},
                       generator=torch.Generator().manual_seed(g["seed"]), margin=DORMANT_MARGIN)  # fmt: skip
    return model


def prepare(base: Model, recipe: Recipe, dataset, tokenizer) -> Prepared:
    """A copy of ``base`` with exactly the recipe's parameters trainable (everything else frozen)."""
    from workbench.tasks import get_task

    parts, task = recipe.parts, get_task(recipe.task)
    model = copy.deepcopy(base)
    masks, structure, info = RowMasks(), {"grow": None, "lora": None}, {}
    if parts == ["full"]:
        model.requires_grad_(True)
        for name, _ in model.named_parameters():
            masks.add(model, name)
        info["trained_experts"] = {str(i): list(range(m.gate.n_experts)) for i, m in moe_layers(model).items()}
        return Prepared(model, masks, structure, info)
    added = None
    if "newexp" in parts:
        new_ids = domain_windows(dataset, task.name, 16, seed=recipe.seed)
        old_ids = old_windows(dataset, task.name, 32, seed=recipe.seed)
        n = recipe.new_experts or 2 * model.config.n_group
        model, added = add_expert(model, n, None, "copy", probe_ids=new_ids, seed=recipe.seed)
        info["wake"] = wake_experts(model, added, new_ids, old_ids, old_rate=recipe.old_rate)
        structure["grow"] = {"n": n, "layers": added.layers, "init": "copy", "seed": recipe.seed,
                             "sources": {str(k): v for k, v in added.sources.items()}}  # fmt: skip
    modules, params = lora_targets(model, parts)
    if modules or params:
        structure["lora"] = {"r": recipe.rank, "alpha": recipe.lora_alpha, "modules": modules, "parameters": params,
                             "seed": recipe.seed}  # fmt: skip
        model = inject_lora(model, structure)
    model.requires_grad_(False)
    names = dict(model.named_parameters())
    moes = moe_layers(model)

    trained_experts: dict[str, set[int]] = {}  # per MoE layer, the routed experts whose weights change

    def expert_rows(layer: int, experts: list[int], router: bool) -> None:
        moe = moes[layer]
        trained_experts.setdefault(str(layer), set()).update(int(e) for e in experts)
        rows = torch.zeros(moe.gate.n_experts, dtype=torch.bool)
        rows[experts] = True
        for t in EXPERT_TENSORS:
            p = getattr(moe.experts, t)
            masks.add(model, next(n for n, q in names.items() if q is p), rows)
        if router:
            masks.add(model, next(n for n, q in names.items() if q is moe.gate.weight), rows)

    if added is not None:
        for layer in added.layers:
            expert_rows(layer, added.new_experts, router=True)
        info["added"] = added.describe()
    esft = [p for p in parts if p.startswith("esft_")]
    if esft:
        ids = domain_windows(dataset, task.name, 32, seed=recipe.seed)
        selected = esft_select(model, ids, esft[0].removeprefix("esft_"), recipe.esft_p)
        for layer, experts in selected.items():
            expert_rows(layer, experts, router=False)
        info["esft"] = {str(k): v for k, v in selected.items()}
    if "lora_exp" in parts:  # an adapter on every expert's stacked tensors
        for layer, moe in moes.items():
            trained_experts.setdefault(str(layer), set()).update(range(moe.gate.n_experts))
    info["trained_experts"] = {k: sorted(v) for k, v in sorted(trained_experts.items())}
    for name in names:
        if "lora_" in name:
            masks.add(model, name)
    if recipe.train_new_tokens:
        old = torch.tensor([dataset.domains.index(d) for d in dataset.domains if d != task.name])
        stream = dataset.tokens["train"][torch.isin(dataset.token_domains["train"], old)]
        texts = [task.prompt(ex) + task.trace(ex) for ex in task.sample(200, seed=recipe.seed)]
        tokens = new_token_ids(tokenizer, stream, texts)
        info["new_tokens"] = [tokenizer.decode([t]) for t in tokens]
        if tokens:
            rows = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            rows[tokens] = True
            masks.add(model, "embed_tokens.weight", rows)
            if model.lm_head.weight is not model.embed_tokens.weight:
                masks.add(model, "lm_head.weight", rows)
    return Prepared(model, masks, structure, info)


__all__ = ["PARTS", "Prepared", "Recipe", "RowMasks", "grow_like", "inject_lora", "lora_targets", "prepare"]
